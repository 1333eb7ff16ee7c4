#!/usr/bin/env python3
"""Build the image stand-ins the tests and benchmarks use (see `testkit.images`).

    tests/images/build.py [OUT_ROOT]        (default: build/test-images)

Prints the directory that holds the layouts, OUT_ROOT/<key>/ (alpine/, python/, node/,
layers/, multiarch/, foreign/), built once per machine and reused until the test kit's image builder
changes. `make test-images` and the ext4 crate's stand-in test run this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from testkit.images import main

if __name__ == "__main__":
    sys.exit(main())
