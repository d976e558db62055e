"""The machine a run measured: printed with every table, since ratios depend on it too."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

import trio


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gcc_version() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        return "not found"
    try:
        out = subprocess.run(
            [gcc, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (how busy the shared machine was)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Machine:
    cpu: str
    cores: int
    usable_cores: int
    kernel: str
    python: str
    trio: str
    gcc: str
    load_average: str

    @classmethod
    def here(cls) -> Machine:
        return cls(
            cpu=_cpu_model(),
            cores=os.cpu_count() or 0,
            usable_cores=len(os.sched_getaffinity(0)),
            kernel=f"{platform.system()} {platform.release()}",
            python=f"{platform.python_implementation()} {platform.python_version()}",
            trio=trio.__version__,
            gcc=_gcc_version(),
            load_average=load_average(),
        )

    def markdown(self) -> str:
        return "\n".join(
            [
                f"- CPU: {self.cpu}",
                f"- cores: {self.cores} ({self.usable_cores} usable by this process)",
                f"- kernel: {self.kernel}",
                f"- Python: {self.python}; trio {self.trio}; {self.gcc}",
                f"- load average at start: {self.load_average}",
            ]
        )
