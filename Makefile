# The two commands the README promises: `make demo` and `make test`.
SHELL := /bin/bash
STRATA_CACHE ?= $(HOME)/.cache/strata
# Builds are cached outside the clone, so a fresh clone (and CI) reuses compiled dependencies.
export CARGO_TARGET_DIR ?= $(STRATA_CACHE)/target
export STRATA_CACHE
FEATURES := --features failpoints

.PHONY: demo test lint unit integration bench services-start services-stop tools build

demo:
	cargo run --quiet --bin strata -- demo

tools:
	scripts/install-tools.sh

lint:
	cargo fmt --check
	cargo clippy --all-targets $(FEATURES) -- -D warnings

# Everything CI runs: tools, services, lint, all tests; services are stopped even when a step fails.
test: tools
	cargo fmt --check
	cargo build --tests $(FEATURES)
	scripts/services.sh start
	set -a; source $(STRATA_CACHE)/services/env; set +a; \
	status=0; \
	cargo clippy --all-targets $(FEATURES) -- -D warnings || status=$$?; \
	if [ $$status -eq 0 ]; then cargo test $(FEATURES) -- --test-threads=2 || status=$$?; fi; \
	scripts/services.sh stop; \
	exit $$status

unit:
	cargo test --lib $(FEATURES)

bench: tools build
	scripts/bench.sh

build:
	cargo build --release --bin strata
