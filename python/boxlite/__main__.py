"""``python -m boxlite``: the ``boxlite`` command line."""

import sys

from .cli import main

sys.exit(main())
