"""The JSON description that accompanies a vfio-user backend program.

The spec ("Backend Program Conventions" in
https://www.qemu.org/docs/master/interop/vfio-user.html) asks for a JSON file under
``/usr/share/vfio-user`` beside each backend program and leaves its schema to do,
"similar to docs/interop/vhost-user.json". We take vhost-user's ``VhostUserBackend``
fields as they are there:

* ``description``: human-readable, for management software to show or not;
* ``type``: ``"pci"``, the one device type vfio-user defines (vhost-user names a
  virtio device type here);
* ``binary``: the absolute path of the program;
* ``tags``: auxiliary strings for development and debugging only (management software
  ignores them): the PCI identity and this package's version.

and add one field vhost-user does not need: ``args``, the arguments that go before the
spec's ``--socket-path=PATH`` / ``--fd=N``. vhost-user has one program per backend; here
one program serves every example, so the device is named in ``args`` (``serve gpio``).
The command to launch is ``[binary, *args, "--socket-path=PATH"]``.

``vfio-user-trio describe gpio > /usr/share/vfio-user/50-vfiouser-trio-gpio.json``
installs one (vhost-user's double-digit prefix keeps the files sorted).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from . import __version__
from .server.device import Device

#: The program name ``pip install`` puts beside the interpreter.
PROGRAM = "vfio-user-trio"


def program() -> list[str]:
    """The absolute command that runs this package's CLI: the console script of this
    installation if there is one, else the interpreter running the CLI module."""
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), PROGRAM)
    found = beside if os.access(beside, os.X_OK) else shutil.which(PROGRAM)
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "vfiouser_trio.cli"]


def describe(spec: str, device: Device) -> dict[str, Any]:
    """The description of ``vfio-user-trio serve SPEC``, ``device`` being what it serves."""
    binary, *prefix = program()
    doc = (type(device).__doc__ or "").strip().splitlines()
    summary = doc[0] if doc else type(device).__name__
    identity = device.identity
    return {
        "description": f"vfiouser_trio {device.name}: {summary}",
        "type": "pci",
        "binary": binary,
        "args": [*prefix, "serve", spec],
        "tags": [
            f"vendor-id={identity.vendor_id:#06x}",
            f"device-id={identity.device_id:#06x}",
            f"class-code={identity.class_code:#08x}",
            f"vfiouser-trio={__version__}",
        ],
    }
