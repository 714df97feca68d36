# The two set-up commands of the README (make demo, make test), and make lint. Each creates the virtual environment
# it needs (.venv) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
SOURCES := tapestry_p2p tests scripts

.PHONY: demo test test-fast lint clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/tapestry demo

test: $(VENV)/.installed
	$(VENV)/bin/pytest

# the unit tests alone (seconds): no DHT node, p2pd or tapestry process is started
test-fast: $(VENV)/.installed
	$(VENV)/bin/pytest -m "not e2e"

# style, formatting, types (basic mode) and the layer contracts of docs/ARCHITECTURE.md
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) *.egg-info
