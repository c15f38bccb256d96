# Everything runs inside .venv, created on first use, so a fresh machine needs only python3 + pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-ray conformance lint typecheck bench bench-quick clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

# torch first and by exact version, so the [torch] extra inside [test] finds it installed and
# pip never fetches a CUDA build.
$(VENV)/.test: $(VENV)/.core
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	touch $@

$(VENV)/.viz: $(VENV)/.core
	$(PIP) install --quiet -e '.[viz]'
	touch $@

demo: $(VENV)/.viz
	$(PY) -m feedline demo

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(VENV)/.test
	$(VENV)/bin/mypy

# The tf.data conformance suite runs within it, against the TensorFlow the [test] extra
# installs: FEEDLINE_CONFORMANCE=required makes a TensorFlow that cannot be imported fail the
# run rather than skip the suite.
test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	FEEDLINE_CONFORMANCE=required $(PY) -m pytest -q -m "not ray"

# feedline.ray against local Ray clusters on 127.0.0.1: their own step, as CI runs them.
test-ray: $(VENV)/.test
	$(PY) -m pytest -q -m ray tests/ray

# tf.data conformance alone.
conformance: $(VENV)/.test
	FEEDLINE_CONFORMANCE=required $(PY) -m pytest -q tests/conformance

# Peers for `make bench`. torch goes first and by exact version: that picks the local CPU wheel,
# and anything installed after it that depends on torch is then satisfied without pulling a
# CUDA build from the registry.
$(VENV)/.bench: $(VENV)/.core
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[bench]'
	touch $@

# Every (system, workload) pair in its own subprocess; writes benchmarks/results/latest.{json,md,png}.
# Then the changing-load table: AUTOTUNE (worst of 3 runs) against the best fixed setting,
# phase by phase; writes benchmarks/results/changing_load.{json,md}.
bench: $(VENV)/.bench
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.changing_load
	$(PY) -m benchmarks.formats_tfrecord
	$(PY) -m benchmarks.formats_columnar
	$(PY) -m benchmarks.conversion
	$(PY) -m benchmarks.ray_distribute

# The same comparison with reduced element counts and grids: about 6 minutes.
bench-quick: $(VENV)/.bench
	$(PY) -m benchmarks.run --quick
	$(PY) -m benchmarks.changing_load --quick
	$(PY) -m benchmarks.conversion --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
