# gpufleet — two commands on a fresh machine:
#   make demo   lab up, the real deploy over SSH through the DigitalOcean emulator, a completion
#   make test   every test: unit tests and the end-to-end tests on the lab
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
LAB_ENV = /var/tmp/gpufleet-lab/gf/lab.env

.PHONY: tools venv demo lab-up lab-down lab-status test unit lint lowest bench clean

$(BIN)/gpufleet: pyproject.toml lab/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e ./lab
	touch $@

venv: $(BIN)/gpufleet

# the Debian packages the lab needs (lab/src/gpufleet_lab/host_tools.txt), installed if missing
tools:
	sh lab/install-tools.sh

demo: tools venv
	$(BIN)/gpufleet-lab up
	set -a && . $(LAB_ENV) && set +a && \
	  PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pyinfra -y inventories/do.py deploys/llama3.py
	set -a && . $(LAB_ENV) && set +a && $(BIN)/gpufleet-lab ask "Say hello to the fleet."
	@echo "The lab is still up: 'make lab-down' takes it down."

lab-up: tools venv
	$(BIN)/gpufleet-lab up

lab-down: venv
	$(BIN)/gpufleet-lab down

lab-status: venv
	$(BIN)/gpufleet-lab status

test: tools venv
	$(BIN)/pytest

unit: venv
	$(BIN)/pytest -m "not lab"

# ruff, and deptry: every import declared, nothing declared unused (product and lab apart)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/deptry src deploys inventories
	cd lab && ../$(BIN)/deptry src

# the unit tests on the lowest versions pyproject.toml allows, in a venv of their own
LOWEST ?= .venv-lowest
lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q uv
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct \
	  -e '.[dev]' -e ./lab
	$(LOWEST)/bin/pytest -m "not lab and not realvllm" -q

bench: venv
	$(BIN)/python bench/lab_bench.py

clean:
	rm -rf $(VENV) $(LOWEST) build dist *.egg-info
