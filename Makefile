# The two set-up commands: `make demo` (the main job on the embedded tiny default) and `make test`.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean device-check

setup: $(STAMP)

# Idempotent: re-runs only when a requirements file changes.
$(STAMP): requirements.txt requirements-megatron.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps --ignore-requires-python -r requirements-megatron.txt
	$(PY) -c "import mm.ops as o; o.select_backend('cpu'); import megatron.core; print('megatron-core', megatron.core.__version__, 'ready on the cpu backend')"
	touch $(STAMP)

test: setup
	MM_BACKEND=cpu $(PY) -m pytest -q

demo: setup
	MM_BACKEND=cpu $(PY) -m mm.demo

# Backend contract tests (CPU) + device tests and a timing table on a GPU/NPU -> outputs/device_check.json
device-check: setup
	$(PY) tests/backends/run_device_check.py --out outputs/device_check.json

bench: setup
	$(PY) bench/attention.py
	$(PY) bench/wfvae.py

clean:
	rm -rf $(VENV) outputs
