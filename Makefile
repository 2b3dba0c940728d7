# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first
# use and reuse it afterwards (the stamp file records a finished install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck install clean figure1

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dessilbi train --config digits --out runs --report

# The paper's Figure 1: LeNet-5 on MNIST with DessiLBI and SGD, reported side by side (about
# 8 minutes on one CPU thread; DATA is the folder holding mnist/).
DATA ?= ../shared/data
figure1: $(STAMP)
	$(VENV)/bin/dessilbi train --config mnist_lenet5_figure1 --data-dir $(DATA) --run-name fig1-lbi --quiet
	$(VENV)/bin/dessilbi train --config mnist_lenet5_figure1 --data-dir $(DATA) --optimizer sgd --run-name fig1-sgd --quiet
	$(VENV)/bin/dessilbi report runs/fig1-lbi --compare runs/fig1-sgd --epochs 5,10,20

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks tools
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
