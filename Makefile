# make demo   the whole method on CPU in minutes: digits + vit-mae-tiny, three routes, mean ± std
# make demo-text   the text half the same way: Debian's fortunes (real English texts, a category a label) + roberta-tiny
# make test   the whole test suite (CPU, tiny models): tests/, tests/unit/ included; what CI runs
# make test-fast   the unit tests of the rooms alone (tests/unit/, about a minute on 2 cores): while you work
# make reproduce-small   the paper's claims at small scale on CPU, protocol 2 of SMALL_REPRODUCTION.md (~50-90 min on
#                        2 cores; downloads 1.4 GB of Debian packages into data/.downloads/ on its first run)
PYTHON := .venv/bin/python
VENV := .venv/.installed
DEMO_DIR := runs/demo
# The demo's settings: a tiny model on 32x32 digits, so larger learning rates and far fewer steps than the
# paper's ViT-B/16 recipe; everything else (masking, losses, schedules, weight decay) is the recipe. It runs
# through run_all.sh, as the full table does: 2 single-thread runs side by side (JOBS=2; --threads auto is 1 on
# the CPU), the MAE stages beside the initial model's fine-tuning seeds, then the two other routes. Fine-tuning:
# 400 steps at lr 3e-3, long enough for every route to fit digits, 3 seeds per route. Measured times and the
# table: README, BENCHMARKS.md.
DEMO_ENV := STEPS=200 FINETUNE_STEPS=400 SEEDS="1 2 3" JOBS=2 MAE_FLAGS="--lr 1e-3" \
	FINETUNE_FLAGS="--lr 3e-3 --warmup_steps 40"
DEMO_FLAGS := --model_name vit-mae-tiny --checkpoint_dir $(DEMO_DIR)/checkpoints --results_dir $(DEMO_DIR)/results \
	--workers 1 --log_every 100

.PHONY: demo test test-fast clean-demo

# The text demo's data: Debian's fortunes package (BSD licence, docs/data.md), fetched at build time with
# `apt-get download` and unpacked with `dpkg-deb -x` into $(DATA_DIR)/.downloads/ (make reproduce-small's download
# folder; git ignores both it and the built dataset), then built into $(DATA_DIR)/fortunes/ by data.prepare
# (data/text_sources.py: the category files, a category a label, a seeded train/test split). Built once: a
# complete build leaves counts.json, and `make fortunes` does nothing while it is there.
DATA_DIR := data
FORTUNES := $(DATA_DIR)/fortunes/counts.json
$(FORTUNES): | $(VENV)
	$(PYTHON) -m data.prepare fortunes --out $(DATA_DIR) --download_dir $(DATA_DIR)/.downloads

.PHONY: fortunes demo-text clean-demo-text
fortunes: $(FORTUNES)

# The text demo: the three routes on fortunes with the tiny built-in RoBERTa, through run_all.sh as make demo. The
# text recipe (TAPT's, text_common.py) with a tiny model's settings: texts cut at 128 tokens (bytes: half the
# fortunes are shorter), batch 16, lr 1e-3, 300 MLM steps for each MAE-like stage, 1000 fine-tuning steps (~5.7
# epochs; 400 gave mean macro-F1 16.6-18.4 per route, 1000 gives 21.7-25.9), 3 seeds. Measured time and table: README.
DEMO_TEXT_DIR := runs/demo-text
DEMO_TEXT_ENV := STEPS=300 FINETUNE_STEPS=1000 SEEDS="1 2 3" JOBS=2 MAE_FLAGS="--batch_size 16 --lr 1e-3" \
	FINETUNE_FLAGS="--batch_size 16 --lr 1e-3"
DEMO_TEXT_FLAGS := --model_name roberta-tiny --max_length 128 --data_dir $(DATA_DIR) \
	--checkpoint_dir $(DEMO_TEXT_DIR)/checkpoints --results_dir $(DEMO_TEXT_DIR)/results --workers 1 --log_every 100

demo-text: $(VENV) $(FORTUNES)
	$(DEMO_TEXT_ENV) bash run_all.sh cpu fortunes $(DEMO_TEXT_FLAGS)

clean-demo-text:
	rm -rf $(DEMO_TEXT_DIR)

# The environment: requirements.txt (lower bounds) under constraints.txt (the exact versions a green `make test`
# used), so a new clone installs what CI tested. CONSTRAINTS= (empty) resolves the newest allowed versions instead:
# make CONSTRAINTS= test. After a green make test on newer versions: make constraints (rewrites constraints.txt).
CONSTRAINTS ?= constraints.txt
$(VENV): requirements.txt $(CONSTRAINTS)
	python3 -m venv .venv
	$(PYTHON) -m pip install --quiet -r requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

.PHONY: constraints
constraints: $(VENV)
	{ echo "# The exact versions a green \`make test\` used ($$(date +%F): Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'))."; \
	  echo "# \`make\` installs requirements.txt under these; \`make CONSTRAINTS= test\` resolves the newest versions"; \
	  echo "# requirements.txt allows instead. Regenerate after a green make test: make constraints"; \
	  $(PYTHON) -m pip freeze --exclude-editable; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

demo: $(VENV)
	$(DEMO_ENV) bash run_all.sh cpu digits $(DEMO_FLAGS)

# Every test file under tests/ runs in `make test` (tests/conftest.py stops the session when one is not collected);
# tests/unit/ holds the fast tier, the rest of tests/ runs the stages, launchers and tools end to end.
test: $(VENV)
	$(PYTHON) -m pytest -q tests

test-fast: $(VENV)
	$(PYTHON) -m pytest -q tests/unit

# make gpu-check   the speed paths against the eager step, then the bench, on this machine's GPU (~8 min on an
# H100/H200): runs/gpu-check/report.md, see BENCHMARKS.md. Where torch sees no GPU it stops and says so; the CPU
# part alone (vit-mae-tiny): make gpu-check GPU_CHECK_FLAGS="--device cpu". It uses .venv when there is one and
# python3 otherwise, without installing anything (a GPU machine may have no network); GPU_CHECK_FLAGS passes flags,
# e.g. make gpu-check GPU_CHECK_FLAGS="--parts finetune"
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) -m lab.gpu_check $(GPU_CHECK_FLAGS)

clean-demo:
	rm -rf $(DEMO_DIR)

.PHONY: reproduce-small
reproduce-small: $(VENV)
	bash run_small_reproduction.sh
