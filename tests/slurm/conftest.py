"""tests/slurm needs a running SLURM cluster (.ci/slurm_setup.sh): `make test-slurm` sets MOE_SLURM_TEST=1.
Without it, `pytest tests` does not collect this folder at all."""

import os

collect_ignore_glob = [] if os.environ.get("MOE_SLURM_TEST") == "1" else ["test_*.py"]
