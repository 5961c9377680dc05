"""``python -m vesuvius_monai ...``: the ``vesuvius-monai`` command, also for ``torchrun -m vesuvius_monai``."""

import sys

from vesuvius_monai.cli import main

if __name__ == "__main__":
    sys.exit(main())
