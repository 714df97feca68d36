# The two set-up commands of the README. Each creates the virtual environment it needs (.venv) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv

.PHONY: demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/tapestry demo

test: $(VENV)/.installed
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) *.egg-info
