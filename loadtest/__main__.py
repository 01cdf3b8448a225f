"""`python -m loadtest --help`: see loadtest/cli.py."""

import sys

from loadtest.cli import main

sys.exit(main())
