# xmx — two commands are all a fresh machine needs:
#   make run    set up (once) and run the default experiment (a synthetic CPU demo)
#   make test   set up (once) and run the test suite
# The virtualenv lives outside the clone, keyed on a hash of the install files, so reruns skip the install.

PYTHON ?= python3
INSTALL_HASH := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/xmx/venv-$(INSTALL_HASH)
VPY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup run test test-fast lint bench-smoke clean-venv

setup: $(VENV)/.installed

# The venv's name carries the hash of the install files, so the marker needs no file prerequisites (a fresh clone's
# new mtimes must not force a reinstall). It is written last: an interrupted install is redone from scratch.
# Commands run from the checkout, whose own source wins over the venv's editable install (which may point at
# the clone that created the venv).
$(VENV)/.installed:
	rm -rf "$(VENV)"
	$(PYTHON) -m venv "$(VENV)"
	"$(VPY)" -m pip install --quiet --upgrade pip
	"$(VPY)" -m pip install --quiet -e '.[test]'
	touch "$@"

run: setup
	"$(VPY)" -m xmx.run $(ARGS)

# The suite is mostly single-threaded Python: one pytest-xdist worker per core the process may use
# (TEST_WORKERS=0 runs it in one process).
TEST_WORKERS ?= auto
test: setup
	"$(VPY)" -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The unit tests only (no whole runs, subprocesses or benchmark smoke modes: the `slow` marker, tests/conftest.py).
test-fast: setup
	"$(VPY)" -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# pyflakes + pycodestyle errors ([tool.ruff] in pyproject.toml); .ci/run runs it before the tests.
lint: setup
	"$(VPY)" -m ruff check .

clean-venv:
	rm -rf "$(VENV)"
