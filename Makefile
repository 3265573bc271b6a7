# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned everywhere: an unpinned torch pulls gigabytes of CUDA wheels.
TORCH  := torch==2.13.0

.PHONY: demo test test-slow bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[export,data,dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m runtime.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check runtime export devices tests

clean:
	rm -rf $(VENV) build *.egg-info runs
