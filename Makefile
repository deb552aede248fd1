# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test parity setup clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pretrain demo

# Test files run on TEST_WORKERS pytest-xdist workers (a file stays on one worker: its
# module fixtures launch torchrun once); most tests leave a core idle on their own.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The whole layout matrix: every pair of parallel dimensions x every architecture family.
parity: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m parity

clean-venv:
	rm -rf $(VENV)
