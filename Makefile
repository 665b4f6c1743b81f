# `make demo` runs the main job on the embedded default; `make test` runs the tests, `make test-fast`
# the fast tier of them (docs/testing.md).
# Both create .venv/ first when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A machine without an NVIDIA GPU takes PyTorch's CPU build (set TORCH_SPEC to pin another).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast lint bench eval synth-eval clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/shardgen demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The tests that start no Ray, subprocess or server, and no bench or training run (docs/testing.md):
# under two minutes, for every change before the whole suite.
test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check pipeline jobs tests

bench: setup
	$(BIN)/shardgen bench

# Prompt adherence (training template and held-out phrasings), super-resolution PSNR, inpainting and
# the unconditional DDPM's clean-shape share of the trained shape models.
eval: setup
	$(BIN)/shardgen train eval

# The synthetic-data experiment (docs/synthetic-data.md): generate through shardgen, filter, train
# small classifiers, test on held-out real renders; writes its table into the doc. CPU only.
synth-eval: setup
	$(BIN)/python -m pipeline.synth.evaluate --work synth-eval --doc docs/synthetic-data.md --json synth-eval/figures.json $(SYNTH_EVAL_ARGS)

clean:
	rm -rf demo-output .pytest_cache

# Debian's Chromium, which tests/test_report.py opens the HTML report in (through Playwright, whose
# own browser download is not used). Installed only where /usr/bin/chromium is absent.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }
