# Two commands do everything on a fresh machine:
#   make demo   install, train recipes/stdlib_tiny on the Python standard library, print a sample
#   make test   install, run the whole test suite (CI runs this through .ci/run)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
RUN_DIR ?= runs/stdlib_tiny

.PHONY: demo test test-tree test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.train --recipe stdlib_tiny --run-dir $(RUN_DIR)

# The model, decode, train-step (LoRA and eval) and LoRA tests, again in NNX tree mode, and the Hugging
# Face imports that build a model (the file's refusals and config round trips build none).
HF_TREE = $(addprefix tests/hf/test_hf_model.py::test_,imported_logits_match_transformers \
  export_loads_in_transformers_unchanged_with_same_logits sliding_window_in_cached_decode_equals_full_forward)
TREE_TESTS ?= tests/model tests/infer/test_decode.py tests/test_lora.py tests/train/test_loop.py $(HF_TREE)

# Exit status 5 (pytest collected no tests) fails here like any other failure.
# Two pytest-xdist workers (a CI machine has 2 cores); a test module stays on one worker (conftest.py).
XDIST ?= -n 2 --dist loadgroup
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=25
	NNX_LM_TREE_MODE=1 $(PY) -m pytest -q $(XDIST) $(TREE_TESTS)

# Only the tree-mode pass.
test-tree: $(STAMP)
	NNX_LM_TREE_MODE=1 $(PY) -m pytest -q $(XDIST) $(TREE_TESTS)

# Skips the slow end-to-end and multi-device tests (CI runs everything).
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

clean:
	rm -rf $(VENV) runs wandb .pytest_cache
