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

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The whole layout matrix: every pair of parallel dimensions x every architecture family.
parity: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m parity

clean-venv:
	rm -rf $(VENV)
