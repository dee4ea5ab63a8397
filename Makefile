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

.PHONY: demo paper test bench saes saes-10-17 sae-eval sae-eval-10-17
demo: $(STAMP)  ## the headline in <= 15 min on 2 cores: TV sweep, TVC + baselines on 4 tasks, a heatmap; prints the claims
	$(VENV)/bin/icl-circuits reproduce --recipe demo --model gemma-3-270m --out runs/demo

# Every experiment of the paper on the bundled model (hours on 2 cores; resumes after any interruption).
# Two stages run side by side, one core each; the report and figures land in docs/results/gemma-3-270m.
paper: $(STAMP)  ## icl-circuits reproduce --recipe paper: the claims table, figures and tables of every section
	$(VENV)/bin/icl-circuits reproduce --recipe paper --model gemma-3-270m --out runs/paper --docs docs/results/gemma-3-270m --jobs 2

test: $(STAMP) chromium  ## the whole test suite (CI runs exactly this)
	$(VENV)/bin/python -m pytest -q

# Headless Chromium for tests/viz/test_browser.py: Debian's packages, installed only when missing (sudo only if
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
	$(VENV)/bin/python benchmarks/bench_negative.py

# Starter suite v2 (docs/saes.md): one harvest feeds every SAE; two training processes share the 2 cores.
# The same commands (these targets' options, their own folders under runs/saes/) are the stages of the recipe
# src/icl_circuits/experiments/recipes/saes.toml: icl-circuits reproduce --recipe saes --out runs/saes --docs docs/results/saes --jobs 2
# (tests/experiments/test_recipe.py checks that they stay the same; change both together).
SUITE_RESID := resid:6,resid:10,resid:11,resid:12,resid:13
SUITE_OTHER := attn:11,attn:12,transcoder:11,transcoder:12
SUITE_RECIPE := --arch topk --k 64 --d-sae 4096 --tokens 2000000 --batch-tokens 1024 --b-dec-init mean --norm-centered \
	--dead-window 200 --dead-steps 400 --trainer ghost_grads=false --checkpoint-every 100 --threads 1 --no-eval
saes: $(STAMP)  ## rebuild the starter suite v2: harvest 2M tokens (~25 min), train 9 SAEs (~45 min), evaluate, export
	$(VENV)/bin/icl-circuits sae harvest --saes $(SUITE_RESID),$(SUITE_OTHER) --tokens 2000000 --eval-docs 400 \
		--out runs/acts_v2 --threads 2
	$(VENV)/bin/icl-circuits sae train --cache runs/acts_v2 --saes $(SUITE_RESID) $(SUITE_RECIPE) --out runs/saes_v2_resid & \
	$(VENV)/bin/icl-circuits sae train --cache runs/acts_v2 --saes $(SUITE_OTHER) $(SUITE_RECIPE) --out runs/saes_v2_other; wait
	$(VENV)/bin/icl-circuits sae eval --cache runs/acts_v2 --sae runs/saes_v2_resid/saes/resid_6 --sae runs/saes_v2_resid/saes/resid_10 \
		--sae runs/saes_v2_resid/saes/resid_11 --sae runs/saes_v2_resid/saes/resid_12 --sae runs/saes_v2_resid/saes/resid_13 \
		--sae runs/saes_v2_other/saes/attn_11 --sae runs/saes_v2_other/saes/attn_12 --sae runs/saes_v2_other/saes/transcoder_11 \
		--sae runs/saes_v2_other/saes/transcoder_12 --eval-ce-docs 16 --dead-rows 500000 --out runs/saes_v2_eval.json --threads 2
	$(VENV)/bin/icl-circuits sae export runs/saes_v2_resid src/icl_circuits/data/saes/gemma-3-270m --eval runs/saes_v2_eval.json --cache runs/acts_v2
	$(VENV)/bin/icl-circuits sae export runs/saes_v2_other src/icl_circuits/data/saes/gemma-3-270m --eval runs/saes_v2_eval.json --cache runs/acts_v2

# The layers the shipped suite lacks for SFC over the paper's range (`circuit --layers 10-17`): 16 more SAEs
# with the same recipe, trained once from one harvest (~56 GB of bf16 rows under runs/acts_10_17; delete it
# afterwards) and exported into the user cache, where starter_sae finds them (they are not shipped).
EXTRA_A := resid:14,resid:15,resid:16,resid:17,attn:10,attn:13,attn:14,attn:15
EXTRA_B := attn:16,attn:17,transcoder:10,transcoder:13,transcoder:14,transcoder:15,transcoder:16,transcoder:17
saes-10-17: $(STAMP)  ## train and cache the 16 starter SAEs of layers 10-17 the package does not ship (~2 h)
	$(VENV)/bin/icl-circuits sae harvest --saes $(EXTRA_A),$(EXTRA_B) --tokens 2000000 --eval-docs 400 --out runs/acts_10_17 --threads 1
	$(VENV)/bin/icl-circuits sae train --cache runs/acts_10_17 --saes $(EXTRA_A) $(SUITE_RECIPE) --out runs/saes_10_17_a & \
	$(VENV)/bin/icl-circuits sae train --cache runs/acts_10_17 --saes $(EXTRA_B) $(SUITE_RECIPE) --out runs/saes_10_17_b; wait
	$(VENV)/bin/icl-circuits sae export runs/saes_10_17_a --cache runs/acts_10_17
	$(VENV)/bin/icl-circuits sae export runs/saes_10_17_b --cache runs/acts_10_17

sae-eval-10-17: $(STAMP)  ## CE loss recovered, dead latents and ICL-token FVE of the 16 cached SAEs of `make saes-10-17`
	$(VENV)/bin/icl-circuits sae eval --cache runs/acts_10_17 --sae $(EXTRA_A),$(EXTRA_B) --eval-ce-docs 16 --dead-rows 500000 --out runs/sae_eval_10_17.json

sae-eval: $(STAMP)  ## evaluate the starter suite on the held-out documents of `make saes`'s harvest
	$(VENV)/bin/icl-circuits sae eval --starter --cache runs/acts_v2 --eval-ce-docs 16 --dead-rows 500000 --out runs/sae_eval.json
