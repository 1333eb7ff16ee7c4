# boxlite: `make demo` runs a box, `make test` runs every check. Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := demo

VENV       := .venv
PY         := $(VENV)/bin/python
BUILD      := build
STAMPS     := $(BUILD)/stamps
GUEST_OUT  := $(BUILD)/guest
PKG_GUEST  := python/boxlite/guest
DEMO_IMAGE := $(BUILD)/images/busybox
AGENT      := target/guest/x86_64-unknown-linux-gnu/release/boxlite-guest
PY_DEPS    := maturin>=1.7,<2 pytest>=8 pytest-asyncio>=0.23 pytest-timeout>=2.3 mypy>=1.10 ruff>=0.5 pypiserver>=2 nbclient>=0.10 nbformat>=5.9 ipykernel>=6.29 mcp>=2.3,<3 langchain-core>=1.0,<2 smolagents>=1.26,<2 openai-agents>=0.24 fastapi>=0.115 uvicorn>=0.35 websockets>=13,<17 httpx>=0.27 schemathesis>=4,<5 ray>=2.9 pyyaml>=6

RUST_SOURCES  := Cargo.toml Cargo.lock $(shell find rust -name '*.rs' -o -name Cargo.toml)
GUEST_SOURCES := $(shell find rust/boxlite-guest rust/boxlite-proto -name '*.rs' -o -name Cargo.toml)

.PHONY: demo test guest develop lint rust-test py-test stubtest image test-images clean bench

demo: develop guest image
	$(PY) scripts/demo.py $(DEMO_IMAGE)

test: develop guest image test-images lint rust-test stubtest py-test

# The benchmark suite (no pass/fail); FIGURE=name[,name] runs only those. See docs/benchmarks.md.
bench: develop guest image test-images
	$(PY) bench/run.py $(if $(FIGURE),--only $(FIGURE))

$(STAMPS)/system:
	scripts/install-system-deps.sh
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: $(STAMPS)/system Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(foreach d,$(PY_DEPS),'$(d)')
	@touch $@

# virtio-fs daemon of boxes with volumes: Rust virtiofsd from crates.io, pinned, built into a
# project-local root (Debian 12 has no package for it) and shipped beside the shim.
VIRTIOFSD_VERSION := 1.14.0
VIRTIOFSD         := $(BUILD)/tools/bin/virtiofsd
$(STAMPS)/virtiofsd-$(VIRTIOFSD_VERSION): $(STAMPS)/system
	cargo install -q --locked --root $(BUILD)/tools virtiofsd@$(VIRTIOFSD_VERSION)
	@touch $@

# The extension module, installed into the venv (editable: python/ is imported directly),
# and the per-box supervisor binary it starts, shipped inside the package.
$(STAMPS)/develop: $(STAMPS)/venv $(STAMPS)/virtiofsd-$(VIRTIOFSD_VERSION) $(RUST_SOURCES) pyproject.toml
	cargo build --release -q -p boxlite --bin boxlite-shim
	install -D -m 755 target/release/boxlite-shim python/boxlite/bin/boxlite-shim
	install -D -m 755 $(VIRTIOFSD) python/boxlite/bin/virtiofsd
	source $(VENV)/bin/activate && maturin develop --release -q --features test-hooks
	@touch $@

develop: $(STAMPS)/develop

# The guest agent: a static binary, built apart so its flags never invalidate host builds.
$(AGENT): $(GUEST_SOURCES) Cargo.lock
	RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/guest \
	  cargo build --release -q -p boxlite-guest --target x86_64-unknown-linux-gnu

$(GUEST_OUT)/manifest.json: $(AGENT) guest/build.sh guest/kernel.lock guest/modules.txt guest/modules-volumes.txt $(STAMPS)/system
	guest/build.sh $(AGENT) $(GUEST_OUT)

$(PKG_GUEST)/manifest.json: $(GUEST_OUT)/manifest.json
	rm -rf $(PKG_GUEST) && mkdir -p $(PKG_GUEST)
	cp $(GUEST_OUT)/vmlinuz $(GUEST_OUT)/initramfs.cpio $(GUEST_OUT)/manifest.json $(PKG_GUEST)/

guest: $(PKG_GUEST)/manifest.json

$(DEMO_IMAGE)/index.json: images/busybox_layout.py testkit/images.py testkit/oci.py $(STAMPS)/system
	python3 images/busybox_layout.py $(DEMO_IMAGE)

image: $(DEMO_IMAGE)/index.json

# The test kit's images (alpine/python stand-ins from Debian packages, a multi-layer image,
# multi-platform indexes), built once per machine: cached under build/test-images/<builder hash>.
test-images: $(STAMPS)/system
	python3 tests/images/build.py $(BUILD)/test-images

lint: $(STAMPS)/venv
	cargo fmt --all --check
	cargo clippy -q --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests scripts images examples bench testkit
	$(VENV)/bin/ruff format --check python tests scripts images examples bench testkit

rust-test:
	cargo test -q --workspace

stubtest: develop
	$(PY) -m mypy.stubtest boxlite._native
	$(VENV)/bin/mypy

py-test: develop guest image test-images
	BOXLITE_TEST_IMAGE=$(abspath $(DEMO_IMAGE)) \
	BOXLITE_TEST_IMAGES=$$(python3 tests/images/build.py $(BUILD)/test-images) $(VENV)/bin/pytest -q

clean:
	rm -rf $(BUILD) $(PKG_GUEST) python/boxlite/bin target
