"""``python -m dessilbi``: the command line (also under ``torchrun -m dessilbi``)."""

import sys

from dessilbi.cli import main

sys.exit(main())
