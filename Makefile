# The README's commands. Each one creates or reuses the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install search retrain test lint bench

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

search: install  ## the whole pipeline on the embedded default: search, derive, retrain, report
	$(VENV)/bin/oneshot-search $(ARGS)

retrain: install
	$(VENV)/bin/oneshot-retrain $(ARGS)

test: install  ## the full test suite, slow end-to-end tests included
	$(VENV)/bin/pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/search_step.py
