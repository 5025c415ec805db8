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

# Every bench/*.py but the _helpers with its defaults (stdout -> outputs/bench/NAME.txt, its last line, one JSON object,
# -> outputs/bench/NAME.json), then the WFVAE at 65 frames and at the released widths (issue 20).
bench: setup
	mkdir -p outputs/bench
	for script in bench/[!_]*.py; do \
	    name=$$(basename $$script .py); echo "== $$script"; \
	    MM_BACKEND=cpu $(PY) $$script > outputs/bench/$$name.txt || exit 1; \
	    cat outputs/bench/$$name.txt; tail -n 1 outputs/bench/$$name.txt > outputs/bench/$$name.json; \
	done
	MM_BACKEND=cpu $(PY) bench/wfvae.py --frames 65 --out outputs/bench/wfvae_65.json
	MM_BACKEND=cpu $(PY) bench/wfvae.py --released-dims --size 256 --frames 33 --out outputs/bench/wfvae_released_33.json

clean:
	rm -rf $(VENV) outputs
