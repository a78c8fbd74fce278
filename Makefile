# `make test` takes a fresh machine to a passing test suite: venv, install, pytest.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: test install clean

$(VENV)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the CPU wheel on local disk, never the multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,tfds,onnx,app]'
	# jax2onnx without its dependency metadata (it pins orbax-checkpoint<0.11.37; see setup.py's ONNX).
	$(PIP) install -q --no-deps jax2onnx==0.17.1
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/python -m pytest -q -n 2 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info
