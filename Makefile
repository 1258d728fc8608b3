# Two commands do everything on a fresh machine:
#   make demo   install, train recipes/stdlib_tiny on the Python standard library, print a sample
#   make test   install, run the whole test suite (CI runs this through .ci/run)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
RUN_DIR ?= runs/stdlib_tiny

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.train --recipe stdlib_tiny --run-dir $(RUN_DIR)

# Exit status 5 (pytest collected no tests) fails here like any other failure.
test: $(STAMP)
	$(PY) -m pytest -q

# Skips the slow end-to-end and multi-device tests (CI runs everything).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
