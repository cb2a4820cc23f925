# Quickstart: `make demo` (the main job, offline) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# The CPU build of torch comes first through constraints.txt: an unpinned torch pulls a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,demo,onnx]'
	$(BIN)/python -c "from obert.runtime import kernels; kernels.build()"
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/one_shot.py

clean:
	rm -rf $(VENV) runs .pytest_cache
