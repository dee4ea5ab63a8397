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

.PHONY: demo test bench saes sae-eval
demo: $(STAMP)  ## task-vector layer sweep on the bundled Gemma 3 270M, all 23 tasks
	$(VENV)/bin/icl-circuits task-vectors --model gemma-3-270m --tasks all --out runs/task_vectors

test: $(STAMP) chromium  ## the whole test suite (CI runs exactly this)
	$(VENV)/bin/python -m pytest -q

# Headless Chromium for tests/test_browser.py: Debian's packages, installed only when missing (sudo only if
# not root). If it cannot be installed the browser tests skip and say why.
.PHONY: chromium
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if command -v apt-get >/dev/null; then \
			SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
			$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
				|| echo "warning: could not install chromium; the browser tests will skip"; \
		else echo "warning: no apt-get; install chromium and chromedriver to run the browser tests"; fi; \
	fi

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_steering.py
	$(VENV)/bin/python benchmarks/bench_harvest.py
	$(VENV)/bin/python benchmarks/bench_sae_training.py
	$(VENV)/bin/python benchmarks/bench_examples.py
	$(VENV)/bin/python benchmarks/bench_circuits.py
	$(VENV)/bin/python benchmarks/bench_tvc.py

saes: $(STAMP)  ## retrain the shipped starter suite (CPU: ~25 min for 600k tokens), then `make sae-eval`
	$(VENV)/bin/icl-circuits sae train --model gemma-3-270m --saes resid:11,resid:12,attn:11,attn:12,transcoder:11,transcoder:12 \
		--corpus generated:512+python-docs --out runs/saes_starter --d-sae 4096 --tokens 600000 --batch-tokens 512 \
		--eval-docs 64 --dead-window 200 --dead-steps 400 --b-dec-init mean --norm-centered --l1 30 --l1-kind transcoder=4 --checkpoint-every 50 --no-eval
	$(VENV)/bin/icl-circuits sae export runs/saes_starter src/icl_circuits/data/saes/gemma-3-270m

sae-eval: $(STAMP)  ## evaluate the starter suite on 24 held-out documents
	$(VENV)/bin/icl-circuits sae eval --model gemma-3-270m --starter --corpus generated:512+python-docs --eval-docs 24 --out runs/sae_eval.json
