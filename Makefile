# Two entry points; both create/reuse .venv and install what they need.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

.PHONY: demo test bench
demo: $(STAMP)  ## task-vector layer sweep on the bundled Gemma 3 270M, all 23 tasks
	$(VENV)/bin/icl-circuits task-vectors --model gemma-3-270m --tasks all --out runs/task_vectors

test: $(STAMP)  ## the whole test suite (CI runs exactly this)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_steering.py
