# Two entry points, each setting up its own virtual environment:
#   make example   run participant then group level on bids_examples/ds-ect
#   make test      lint and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXAMPLE ?= bids_examples/ds-ect
OUT ?= out/ds-ect
WORK ?= work/ds-ect
# cheap settings so the example finishes in minutes; EXAMPLE_ARGS= runs the real defaults
EXAMPLE_ARGS ?= --sloppy

.PHONY: example test test-slow venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

example: venv
	$(BIN)/trajectome $(EXAMPLE) $(OUT) participant -w $(WORK) $(EXAMPLE_ARGS)
	$(BIN)/trajectome $(EXAMPLE) $(OUT) group

test: venv
	$(BIN)/ruff check pipeline workflows tests bench scripts docker
	$(BIN)/python -m pytest

# Ground-truth runs too long for every CI stop (anatomy on 2 mm data: ~10 min on 2 cores)
test-slow: venv
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) out work
