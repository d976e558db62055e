"""``python -m bench``: run the benchmarks and print a markdown table (see bench/run.py).

``python -m bench nvme ...`` is the NVMe guest benchmark instead (bench/figures/nvme.py): it
boots a QEMU guest, so it is not one of the default figures.
"""

import sys

if sys.argv[1:2] == ["nvme"]:
    from bench.figures.nvme import main as nvme_main

    sys.exit(nvme_main(sys.argv[2:]))

from bench.run import main

sys.exit(main())
