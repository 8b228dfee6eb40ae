# One entry point for set-up, tests and benchmarks. Every target creates .venv if needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: install test lint bench demo down clean guidellm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first so no dependency can pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check platform tests jobs deployments benchmarks scripts
	$(BIN)/ruff format --check platform tests jobs deployments benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python docs/gen_benchmarks_page.py

# Optional: guidellm's sweep against the running demo server (make demo), in its own virtualenv.
guidellm:
	test -x .venv-guidellm/bin/python || $(PY) -m venv .venv-guidellm
	.venv-guidellm/bin/pip install --quiet "$(TORCH)" "guidellm==0.8.1"
	.venv-guidellm/bin/python benchmarks/guidellm_sweep.py

# Fresh clone -> served model: local Ray head, prepare -> pretrain -> finetune -> evaluate as Ray jobs,
# `serve deploy`, one chat request. Reruns reuse finished stages. `make down` stops it all.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

down:
	$(BIN)/python scripts/demo.py --down

clean:
	rm -rf $(VENV) .venv-guidellm .pytest_cache
