# The two set-up commands of the README, each on a local virtualenv:
#   make demo   install + train teacher, student (CE), student (KD) on the
#               embedded synthetic ECGs and print the metrics table
#   make test   install with [dev] extras + run the default test suite
# `make test-slow` runs the checks behind the `slow` marker.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: setup.py | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	PYTHON=$(PY) launch/demo.sh $(WORKDIR)

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdir
