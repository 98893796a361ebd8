# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
export OMP_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg

.PHONY: run test test-all bench lint format dryrun-paper clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps mdanalysistests==2.11.0
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	source $(VENV)/bin/activate && snakemake --cores $(CORES) --rerun-incomplete
	source $(VENV)/bin/activate && snakemake --cores $(CORES) --report results/report.zip
	@echo "report: results/report.zip"

test: $(VENV)/.installed
	source $(VENV)/bin/activate && python -m pytest -q -ra

test-all: $(VENV)/.installed
	source $(VENV)/bin/activate && python -m pytest -q -ra -m "" 

bench: $(VENV)/.installed
	source $(VENV)/bin/activate && python bench/eval_overhead.py && python bench/parse_speed.py && python bench/plan_speed.py

lint: $(VENV)/.installed
	source $(VENV)/bin/activate && ruff check . && ruff format --check . && snakefmt --check workflow rules && snakemake --lint

dryrun-paper: $(VENV)/.installed
	source $(VENV)/bin/activate && time snakemake -n --configfile config/paper.yaml --quiet rules

clean:
	rm -rf results logs benchmarks .snakemake
