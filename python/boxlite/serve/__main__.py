"""``python -m boxlite.serve [flags]``: the same as ``boxlite serve [flags]``."""

import sys

from ..cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
