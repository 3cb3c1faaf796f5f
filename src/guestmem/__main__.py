"""``python -m guestmem``: the same command line as ``guestmem``."""

import sys

from .cli import main

sys.exit(main())
