# lazysnap — developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Debian packages the tests drive for real: containerd + runc run containers, docker-registry
# serves images on loopback, skopeo/umoci handle OCI images, fuse3 and stargz-snapshotter
# (ctr-remote) come with lazy pulling, erofs-utils (fsck.erofs, dump.erofs) checks the EROFS
# images lazysnap writes, busybox-static fills test images.
APT_PACKAGES := containerd runc docker-registry skopeo umoci fuse3 stargz-snapshotter erofs-utils \
	busybox-static util-linux ca-certificates systemd

.PHONY: help setup setup-apt setup-venv proto proto-check lint format unit test demo bench clean

help:
	@echo "make setup   install system packages and the Python venv (idempotent)"
	@echo "make demo    a lazily started container next to a normally pulled one, with timings"
	@echo "make test    setup, then lint, generated-code check and the whole test suite"
	@echo "make bench   cold-start benchmark over shaped links (results in benchmarks/results/)"
	@echo "make proto   regenerate snapshotter/api from proto/"
	@echo "make lint    ruff + mypy;  make format  ruff format"

setup: setup-apt setup-venv

setup-apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The venv is rebuilt when pyproject.toml changes.
setup-venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

proto: setup-venv
	$(PY) scripts/genproto.py

proto-check: setup-venv
	$(PY) scripts/genproto.py --check

lint: setup-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup-venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

unit: setup-venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# The whole suite runs on the default file-system backend (EROFS, where the kernel can), then the
# end-to-end tests once more on the per-file FUSE backend.
test: setup proto-check lint
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)
	LAZYSNAP_TEST_BACKEND=fuse $(PY) -m pytest -q -rs -m "not erofs_only" tests/e2e $(PYTEST_ARGS)

# Both need root: they run containerd, mount FUSE and overlayfs, and drop the page cache.
demo: setup
	$(PY) -m benchmarks.demo

# Default: profile cloud, all images and modes, 3 reps, micro-benchmarks (~20 min once the images
# are cached in /var/tmp/lazysnap-bench, ~35 the first time). More: BENCH_ARGS="--profiles all" (~90 min),
# "--big", "--peer NAME=CMD"; see `$(PY) -m benchmarks.run --help`.
BENCH_ARGS ?=
bench: setup
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
