"""`python -m lenslab` runs the command line."""

import sys

from lenslab.cli import main

sys.exit(main())
