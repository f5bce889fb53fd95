"""`python -m pybus`: the same as the `pybus` console script."""

import sys

from pybus.cli import main

sys.exit(main())
