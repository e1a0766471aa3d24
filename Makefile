# spyrus-hsm — every target installs what it needs first, so a fresh Debian 12 machine (as root)
# needs only `make run` or `make test`.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BUILD := .build
BIN := $(VENV)/bin
SHIM := $(BUILD)/libp11shim.so
# leaf devices' TLS clients (mbedTLS, wolfSSL) that tests/service/test_leaf_stacks.py runs
LEAFSTACKS := $(BUILD)/mbedtls_client $(BUILD)/wolfssl_client
# the C leaf example (examples/c-mbedtls), run by tests/service/test_leaf_examples.py
LEAF_EXAMPLES := $(BUILD)/leaf_mbedtls
# iotedgedev (manifest generation) and hadolint, in a virtualenv of their own
TOOLS := $(BUILD)/iotedgedev
DOCKERFILES := Dockerfile.amd64 Dockerfile.arm64v8 .devcontainer/Dockerfile

.PHONY: all deps venv tools shim run test lint unit docs image-test bench lock clean

all: test

deps:
	@bash scripts/install-system-deps.sh

$(BIN)/.installed: requirements.lock pyproject.toml | deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

venv: deps $(BIN)/.installed

$(TOOLS)/.installed: requirements-iotedgedev.lock | deps
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --disable-pip-version-check -r requirements-iotedgedev.lock
	@touch $@

tools: deps $(TOOLS)/.installed

$(SHIM): tests/p11shim/p11shim.c | deps
	@mkdir -p $(BUILD)
	$(CC) -shared -fPIC -O2 -Wall -Wextra -Werror -I/usr/include/p11-kit-1 -I/usr/include/PCSC -o $@ $< -ldl -lpthread

shim: $(SHIM)

$(BUILD)/mbedtls_client: tests/leafstacks/mbedtls_client.c | deps
	@mkdir -p $(BUILD)
	$(CC) -O2 -Wall -Wextra -Werror -o $@ $< -lmbedtls -lmbedx509 -lmbedcrypto

$(BUILD)/wolfssl_client: tests/leafstacks/wolfssl_client.c | deps
	@mkdir -p $(BUILD)
	$(CC) -O2 -Wall -Wextra -Werror -o $@ $< -lwolfssl

$(BUILD)/leaf_mbedtls: examples/c-mbedtls/leaf.c | deps
	@mkdir -p $(BUILD)
	$(CC) -O2 -Wall -Wextra -Werror -o $@ $< -lmbedtls -lmbedx509 -lmbedcrypto

run: venv
	@bash scripts/dev-run.sh

lint: venv tools
	$(BIN)/ruff check modules tests bench scripts
	$(BIN)/mypy
	$(TOOLS)/bin/hadolint $(DOCKERFILES)
	$(BIN)/python scripts/runtime_lock.py --check
	promtool check rules deployments/prometheus/alerts.yml
	cd deployments/prometheus && promtool test rules alerts.test.yml
	$(BIN)/lint-imports --no-cache

# Three processes: a PKCS#11 module is loaded once per process, the `shim` tests need the
# fault-injection shim as their module, and the `token_matrix` tests run once more on a
# tpm2-pkcs11 token over a software TPM (see tests/conftest.py, tests/token_matrix.py).
unit: venv shim tools $(LEAFSTACKS) $(LEAF_EXAMPLES)
	SPYRUS_TOOLS_REQUIRED=1 $(BIN)/python -m pytest -q --durations=15 tests
	SPYRUS_TEST_VIA_SHIM=1 $(BIN)/python -m pytest -q --durations=15 -m shim tests
	SPYRUS_TEST_TOKEN=tpm2 $(BIN)/python -m pytest -q --durations=15 -m token_matrix tests

# The documentation site, built strictly (a broken link or anchor, or a page missing from the
# navigation, fails it) into .build/site; scripts/mkdocs_hooks.py adds the reference pages it
# generates from the code (scripts/gen_reference.py).
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(BUILD)/site

test: lint docs unit

# Builds the amd64 image with podman (installed if missing) and tests it: scripts/image-test.sh.
image-test: venv shim
	@bash scripts/image-test.sh

# The same for Dockerfile.arm64v8 on this (amd64) machine, under qemu-user-static.
.PHONY: image-test-arm64
image-test-arm64: venv
	@bash scripts/image-test.sh --arch arm64

bench: venv shim
	$(BIN)/python bench/hsm_throughput.py
	$(BIN)/python bench/api_throughput.py
	$(BIN)/python bench/audit_stall.py
	$(BIN)/python bench/admission.py
	$(BIN)/python bench/admission.py

lock:
	rm -rf $(BUILD)/lockenv && $(PYTHON) -m venv $(BUILD)/lockenv
	$(BUILD)/lockenv/bin/pip install -q -r requirements.in
	(echo "# Locked with Debian 12's python3 (3.11) from requirements.in; regenerate with 'make lock'."; \
	 $(BUILD)/lockenv/bin/pip freeze --all | grep -v '^pip==' | sort -f) > requirements.lock
	$(BUILD)/lockenv/bin/python scripts/runtime_lock.py
	rm -rf $(BUILD)/lockenv && $(PYTHON) -m venv $(BUILD)/lockenv
	$(BUILD)/lockenv/bin/pip install -q -r requirements-iotedgedev.in
	(echo "# Locked with Debian 12's python3 (3.11) from requirements-iotedgedev.in; regenerate with 'make lock'."; \
	 $(BUILD)/lockenv/bin/pip freeze --all | grep -v '^pip==' | sort -f) > requirements-iotedgedev.lock

clean:
	rm -rf $(VENV) $(BUILD) .state
