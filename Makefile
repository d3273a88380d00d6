# parma-sandbox: `make run` runs the example group, `make test` runs the default test tiers.
# Both install what they need first (Debian packages via sudo when not root, then a venv in .venv).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PS := $(BIN)/parma-sandbox
PYTEST := $(BIN)/pytest
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help host-packages setup run test test-unit test-tools test-vm test-snp test-slow lint bench kernel uvm firmware-snp \
        example-images clean

help: ## Show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

host-packages:
	@scripts/install-host-packages.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup: host-packages ## Install Debian packages (if missing) and the venv (idempotent)
	@$(MAKE) --no-print-directory $(STAMP)

example-images: setup ## Build the example images (build/images/busybox) from Debian packages
	$(BIN)/python images/examples/busybox.py build/images/busybox

run: setup example-images ## Run the example group (examples/hello) in a confidential UVM
	$(PS) up examples/hello/group.json

test: setup lint ## Lint (ruff, mypy), then run the default tiers: unit, tools and vm
	$(PYTEST) -m "(unit or tools or vm) and not slow" tests

test-unit: setup ## Pure tests only (seconds)
	$(PYTEST) -m "unit and not slow" tests

test-tools: setup ## Tests that drive real external tools and services
	$(PYTEST) -m "tools and not slow" tests

test-vm: setup ## Tests that boot the real UVM under QEMU
	$(PYTEST) -m "vm and not slow" tests

test-snp: setup ## Tests that need SEV-SNP hardware (they skip elsewhere)
	$(PYTEST) -m snp tests

test-slow: setup ## Long-running tests (reproducibility rebuilds, boot loops)
	$(PYTEST) -m slow tests

lint: setup ## ruff on everything; mypy (pyproject.toml: strict on sandbox/shared and sandbox/guest)
	$(BIN)/ruff check sandbox tests bench
	$(BIN)/mypy

bench: setup ## Benchmarks, each printing JSON with its reference and ratio (PARMA_SANDBOX_TAR2EXT4: hcsshim's tar2ext4)
	@for b in bench/bench_*.py; do echo "== $$b" >&2; $(BIN)/python $$b || exit 1; done

kernel: setup ## Build (or reuse) the UVM kernel from kernel_configs/
	$(PS) build kernel

firmware-snp: setup ## Build (or reuse) the AmdSev OVMF for SEV-SNP launches (about 4 min)
	$(PS) build firmware-snp

uvm: setup ## Build (or reuse) the whole UVM: kernel, rootfs, firmware, build/uvm/manifest.json
	$(PS) build uvm

clean: ## Remove build outputs (not the cache in ~/.cache/parma-sandbox)
	rm -rf build
