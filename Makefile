# The two commands the README promises: `make demo` and `make test`.
SHELL := /bin/bash
STRATA_CACHE ?= $(HOME)/.cache/strata
# Builds are cached outside the clone, so a fresh clone (and CI) reuses compiled dependencies.
export CARGO_TARGET_DIR ?= $(STRATA_CACHE)/target
export STRATA_CACHE
FEATURES := --features failpoints,demo

.PHONY: demo test lint unit integration bench services-start services-stop tools build-deps build chaos

# The first build compiles about 400 crates (arrow, parquet, deltalake, librdkafka): about 12 minutes
# on 2 cores, once; later runs start in seconds. `make test` reuses the same compiled dependencies.
demo: build-deps
	@if [ ! -x "$(CARGO_TARGET_DIR)/debug/strata" ]; then \
	  echo "make demo: first build of strata and its dependencies, about 12 minutes on 2 cores (once; progress below)"; \
	fi
	cargo build --bin strata --features demo
	"$(CARGO_TARGET_DIR)/debug/strata" demo

tools:
	scripts/install-tools.sh

# The C libraries the binary links (OpenSSL, Cyrus SASL, libcurl, zlib), from Debian's packages.
build-deps:
	scripts/install-tools.sh build-deps

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
	if [ $$status -eq 0 ]; then \
	  cargo test $(FEATURES) -- --test-threads=2 2>&1 | tee $(STRATA_CACHE)/last-test.log; status=$${PIPESTATUS[0]}; \
	  awk '/^test result:/ { p += $$4; f += $$6 } END { printf "all suites: %d passed, %d failed\n", p, f }' $(STRATA_CACHE)/last-test.log; \
	fi; \
	scripts/services.sh stop; \
	exit $$status

unit:
	cargo test --lib $(FEATURES)

# The long chaos runs: 3 replicas, records flowing, a random replica SIGKILLed or SIGTERMed
# STRATA_CHAOS_RESTARTS times (make test runs 4), for Silver and for Gold (salting on).
# STRATA_CHAOS_SEED replays a run.
STRATA_CHAOS_RESTARTS ?= 12
chaos: tools
	cargo build --tests $(FEATURES)
	scripts/services.sh start
	set -a; source $(STRATA_CACHE)/services/env; set +a; \
	STRATA_CHAOS_RESTARTS=$(STRATA_CHAOS_RESTARTS) cargo test $(FEATURES) --test chaos -- --nocapture; status=$$?; \
	STRATA_CHAOS_RESTARTS=$(STRATA_CHAOS_RESTARTS) cargo test $(FEATURES) --test gold -- --nocapture random_restarts || status=$$?; \
	scripts/services.sh stop; \
	exit $$status

# Release builds get their own target directory, so they never hold the lock of the test build.
bench: tools
	CARGO_TARGET_DIR=$(STRATA_CACHE)/target-release cargo bench --features demo --bench decode --bench gold
	CARGO_TARGET_DIR=$(STRATA_CACHE)/target-release scripts/bench.sh

build: build-deps
	CARGO_TARGET_DIR=$(STRATA_CACHE)/target-release cargo build --release --bin strata
