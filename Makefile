# The two commands: `make train` (the main job) and `make test`. Each sets up .venv first,
# with the versions CI tests (constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
TASK ?= merged
DATA_DIR ?=
ARGS ?=

.PHONY: train test test-slow serve clean-venv

$(VENV)/.installed: setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

train: $(VENV)/.installed  ## train TASK (default merged) with its study preset, then evaluate it on the test split
	$(VENV)/bin/tf-emnist train --task $(TASK) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

test: $(VENV)/.installed  ## the test suite (fake data; real-data tests run when TF_EMNIST_DATA_DIR is set)
	$(PY) -m pytest

test-slow: $(VENV)/.installed  ## the slow tier: real processes, servers and a browser; JAX across processes; the GPU script's smoke mode
	$(PY) -m pytest -m slow

serve: $(VENV)/.installed  ## serve the shipped model on http://127.0.0.1:8501/
	$(VENV)/bin/tf-emnist serve saved_models/merged

clean-venv:
	rm -rf $(VENV)
