# The README's commands. Each one creates or reuses the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install search retrain test lint bench

$(VENV)/.installed: pyproject.toml
	@# Graphviz's `dot` draws the cell pictures; without it (not root, no apt) they fall back to matplotlib.
	@command -v dot >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q graphviz >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q graphviz >/dev/null; }; }; } || \
	  echo "note: graphviz not installed; cell pictures fall back to matplotlib"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,sweep,onnx,nb201]'
	touch $@

install: $(VENV)/.installed

search: install  ## the whole pipeline on the embedded default: search, derive, retrain, report
	$(VENV)/bin/oneshot-search $(ARGS)

retrain: install
	$(VENV)/bin/oneshot-retrain $(ARGS)

test: install  ## the full test suite, slow end-to-end tests included, one worker per core (pytest-xdist)
	$(VENV)/bin/pytest -n auto --dist loadfile --durations=30 $(ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/search_step.py
