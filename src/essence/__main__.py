"""`python -m essence` (and `accelerate launch -m essence ...`) runs the command line."""

import sys

from essence.cli import main

sys.exit(main())
