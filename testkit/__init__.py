"""The test kit: what the tests, the benchmarks and `make image` share: images, registries, wheels.

- `testkit.oci`: one deterministic OCI image layout writer (layer tars, blobs, manifests,
  configs, indexes), the helpers that derive a layout from another (patch its config, add a
  crafted layer) and readers for layouts (digests, blob sizes, `umoci unpack`).
- `testkit.images`: the image stand-ins, built from Debian packages and cached under
  `build/test-images/<hash of the builder>/`: an alpine-like busybox image, a python:slim-like
  image with pip, a node:slim-like image on the same base, a multi-layer image of unpacking's
  hard cases and two multi-platform indexes.
- `testkit.registry`: Debian's `docker-registry` on a free 127.0.0.1 port (optionally behind
  htpasswd), filled with `skopeo`, and a proxy that counts, corrupts, slows down or demands a
  bearer token.
- `testkit.wheels`: minimal pure-Python wheels for the boxes' pip.

Standard library only: `images/busybox_layout.py` and `tests/images/build.py` run it with the
system's python3. The repository root must be on `sys.path` (tests/conftest.py, bench/run.py,
bench/profile.py and both scripts put it there).
"""
