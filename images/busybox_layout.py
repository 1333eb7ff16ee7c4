#!/usr/bin/env python3
"""Build a tiny, reproducible OCI image layout holding a busybox image (what `make image` runs).

    images/busybox_layout.py OUT_DIR [--tag latest] [--busybox /bin/busybox]

The image has one gzip layer: the static busybox binary (Debian's busybox-static) at
/bin/busybox, a symlink to it for every applet, a few users and groups (root, nobody,
app 1000:1000 with supplementary group extra 2000) and the usual empty directories.
Tests use it as a small, offline stand-in for busybox/alpine images (the test kit's alpine
stand-in is the same image): push it to a local registry (skopeo copy oci:OUT_DIR:TAG
docker://...) or read the layout directly.

Same inputs give byte-identical blobs and so identical digests. Prints the manifest digest on
stdout. The image is `testkit.images.busybox_image`; Python standard library only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testkit.images import BUSYBOX, busybox_layout


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="OCI layout directory (created; other tags in it are kept)")
    ap.add_argument("--tag", default="latest", help="ref name in index.json (default: latest)")
    ap.add_argument("--busybox", type=Path, default=BUSYBOX, help=f"static busybox binary (default: {BUSYBOX})")
    args = ap.parse_args()
    print(busybox_layout(args.out_dir, args.tag, args.busybox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
