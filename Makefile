# The two commands: `make train` (the main job) and `make test`. Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
TASK ?= merged
DATA_DIR ?=
ARGS ?=

.PHONY: train test tune bench clean-venv

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

train: $(VENV)/.installed  ## train TASK (default merged) with its study preset, then evaluate on the test split
	$(VENV)/bin/tf-emnist train --task $(TASK) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

test: $(VENV)/.installed  ## the test suite (fake data; real-data tests run when TF_EMNIST_DATA_DIR is set)
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
