# make install: .venv with the package and its dev extras (CPU torch where there is no CUDA)
# make test:    the test suite        make demo: a tiny checkpoint, then generate on it (no network)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := $(VENV)/tiny-demo

.PHONY: install test lint demo bench clean

install: $(BIN)/olmo2kit

$(BIN)/olmo2kit: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: on a machine without CUDA this takes the CPU wheel; an
	# unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e '.[dev,eval,datasets]'
	touch $(BIN)/olmo2kit

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/olmo2kit tiny $(DEMO_DIR) --seed 0
	$(BIN)/olmo2kit generate "Language modeling is " --model $(DEMO_DIR) --max-new-tokens 24 --seed 0

bench: install
	$(BIN)/python benchmarks/bench_startup.py
	$(BIN)/python benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
