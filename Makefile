# Quickstart: `make demo` (the main job, offline) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-floor bench clean

setup: $(VENV)/.installed

# The CPU build of torch comes first through constraints.txt: an unpinned torch pulls a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,demo,onnx]'
	$(BIN)/python -c "from obert import native; native.build()"
	touch $@

demo: setup
	$(BIN)/python scripts/demo.py

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The suite again on the oldest Transformers pyproject.toml declares: a venv that sees .venv's
# packages (a .pth file) with that release, and what it needs, installed over them.
FLOOR := transformers==5.6.0
FLOOR_VENV := .venv-floor
test-floor: setup
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0]); print('$(CURDIR)/src')" > \
		"$$($(FLOOR_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz-obert-base.pth"
	$(FLOOR_VENV)/bin/python -m pip install -q -c constraints.txt "$(FLOOR)"
	$(FLOOR_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(FLOOR)'.split('==')[1]"
	$(FLOOR_VENV)/bin/python -m pytest

bench: setup
	$(BIN)/python benchmarks/one_shot.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs .pytest_cache
