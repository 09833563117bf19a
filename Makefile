# qmpshadow: `make demo` runs the main job, `make test` runs the tests. Both set up what
# they need first, idempotently: Debian packages, a venv, the Cython build, the guest.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := $(shell sed -e 's/\#.*//' deps/apt-packages.txt)
PYX := $(shell find cython -name '*.pyx')

.PHONY: demo test deps venv build guest linux-guest lint typecheck unit integration bench clean

demo: deps venv build guest
	$(VENV)/bin/qmpshadow demo

test: deps venv build guest linux-guest lint typecheck
	$(PY) -m pytest -q
	QMPSHADOW_NO_EXTENSIONS=1 $(PY) -m pytest -q tests/unit

# Debian packages: installs only what is missing.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
	  | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=69" wheel "Cython>=3.1"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

# Compiled twins, in place (setup.py maps cython/<sub>/<name>_c.pyx to qmpshadow/<sub>/).
build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(PYX) setup.py
	$(PY) setup.py -q build_ext --inplace
	touch $@

guest:
	$(MAKE) -s -C qemu-scripts/guest

# The Linux guest of the network output-commit test and bench (its packages come with
# `deps`; rebuilt, ~1 s, only when its inputs changed).
linux-guest: build/linux-guest/initramfs.cpio.gz
build/linux-guest/initramfs.cpio.gz: qemu-scripts/build-linux-guest.sh qemu-scripts/linux-guest/init
	qemu-scripts/build-linux-guest.sh --no-install >/dev/null

lint: venv
	$(VENV)/bin/ruff check qmpshadow tests bench

typecheck: venv
	$(VENV)/bin/mypy

unit: venv build
	$(PY) -m pytest -q tests/unit

integration: deps venv build guest
	$(PY) -m pytest -q tests/integration

bench: venv build guest
	$(PY) bench/stream_ingest.py

clean:
	rm -rf build $(VENV) *.egg-info
	find . -name '*.so' -path './qmpshadow/*' -delete
	find cython -name '*.c' -delete
