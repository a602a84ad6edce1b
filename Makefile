# Every target that runs Python creates or refreshes .venv itself, so any of them works as the
# first command on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed

# torch first: DeepSpeed builds against the torch already in the environment.
TORCH := torch==2.14.1 torchvision==0.29.2
# Bytecode compiled once at install: every Ray worker process imports torch, timm, DeepSpeed and Ray Train,
# and where .pyc files are missing and cannot be written (PYTHONDONTWRITEBYTECODE, as on this machine and
# in CI) each process compiled them again: 12.6 s to import the train loop, 5.7 s with them.
UV_INSTALL := $(UV) pip install --python $(PY) --quiet --compile-bytecode

.PHONY: venv demo test test-fast bench lint docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv
	$(UV_INSTALL) setuptools wheel ninja $(TORCH)
	$(UV_INSTALL) --no-build-isolation-package deepspeed -e '.[dev]'
	$(PY) -m compileall -q hlip_ray
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hlip_ray.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -x

bench: $(STAMP)
	@for bench in benchmarks/bench_*.py; do echo "# $$bench" >&2; $(PY) $$bench || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check hlip_ray tests benchmarks

# The user's guide into site/ (warnings are errors, as in tests/test_docs.py); `.venv/bin/mkdocs serve` to read it.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
