# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
export OMP_NUM_THREADS ?= 1
export MPLBACKEND ?= Agg

.PHONY: run test test-all bench lint format dryrun-paper clean venv lock archive

# The environment is locked: every package, with hashes (lock/requirements.txt; lock/nodeps.txt
# holds the packages installed without their dependencies). `make lock` refreshes both from
# pyproject.toml. torch is the CPU build: this machine keeps its wheel in /opt/wheels; elsewhere
# it comes from PyTorch's CPU wheel index.
LOCK := lock/requirements.txt
LOCK_NODEPS := lock/nodeps.txt
UV_VERSION := 0.13.8
TORCH_CPU_WHEELS ?= /opt/wheels
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAVE_TORCH_WHEEL := $(wildcard $(TORCH_CPU_WHEELS)/torch-*+cpu-*.whl)
PIP_TORCH := $(if $(HAVE_TORCH_WHEEL),--find-links $(TORCH_CPU_WHEELS),--extra-index-url $(TORCH_CPU_INDEX))
UV_TORCH := $(if $(HAVE_TORCH_WHEEL),--find-links $(TORCH_CPU_WHEELS),--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match)
UV_COMPILE := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command "make lock" --quiet

$(VENV)/.installed: pyproject.toml $(LOCK) $(LOCK_NODEPS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes $(PIP_TORCH) -r $(LOCK)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK_NODEPS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

lock:
	test -x $(VENV)/bin/uv || { test -x $(PY) || python3 -m venv $(VENV); $(PY) -m pip install -q uv==$(UV_VERSION); }
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --constraint lock/constraints.txt $(UV_TORCH) $(UV_COMPILE) -o $(LOCK)
	$(VENV)/bin/uv pip compile lock/nodeps.in --no-deps $(UV_COMPILE) -o $(LOCK_NODEPS)

run: $(VENV)/.installed
	source $(VENV)/bin/activate && snakemake --cores $(CORES) --rerun-incomplete
	source $(VENV)/bin/activate && snakemake --cores $(CORES) --report results/report.zip
	@echo "report: results/report.zip"

test: $(VENV)/.installed
	source $(VENV)/bin/activate && python -m pytest -q -ra

test-all: $(VENV)/.installed
	source $(VENV)/bin/activate && python -m pytest -q -ra -m "" 

# code (git archive of the current tree), config used, lock, provenance and RERUN.md, after `make run`
archive: $(VENV)/.installed
	source $(VENV)/bin/activate && equipipe archive --out results/archive.tar.gz

bench: $(VENV)/.installed
	source $(VENV)/bin/activate && python bench/eval_overhead.py && python bench/parse_speed.py && python bench/plan_speed.py

lint: $(VENV)/.installed
	source $(VENV)/bin/activate && ruff check . && ruff format --check . && snakefmt --check workflow rules && snakemake --lint && mypy

dryrun-paper: $(VENV)/.installed
	source $(VENV)/bin/activate && time snakemake -n --configfile config/paper.yaml --quiet rules

clean:
	rm -rf results logs benchmarks .snakemake
