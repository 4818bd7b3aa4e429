"""`python -m refpeft` runs the command line."""

import sys

from refpeft.cli import main

sys.exit(main())
