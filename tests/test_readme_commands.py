"""Every snakemake command in the README works as typed: each parses and dry-runs from a checkout-like
folder, with the README's own my_runs.yaml pointed at a tiny SAP tree."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
CHECKOUT = ("Snakefile", "rules", "config", "profiles", "workflow_scripts", "envs", ".venv")


def readme_commands() -> list[str]:
    """snakemake command lines of the README: lines of its bash blocks and inline code spans; the
    placeholders (`<target>`) are left out."""
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines()]
    lines += re.findall(r"`((?:\.venv/bin/)?snakemake [^`]+)`", README)
    return [c for c in dict.fromkeys(lines) if re.match(r"(\.venv/bin/)?snakemake ", c) and "<" not in c.split("|")[0]]


def test_the_readme_has_the_commands_this_test_checks():
    commands = readme_commands()
    assert any("--configfile my_runs.yaml" in c for c in commands)
    assert any("--dag" in c for c in commands) and len(commands) >= 5


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder laid out like a fresh clone (links to this one) holding the README's my_runs.yaml, with its
    dataset_root replaced by a tiny SAP tree, and data/sap for the built-in full run."""
    root = tmp_path_factory.mktemp("checkout")
    for name in CHECKOUT:
        (root / name).symlink_to(REPO / name)
    runs = yaml.safe_load(re.search(r"```yaml\n# my_runs.yaml\b.*?\n(.*?)```", README, re.S).group(1))
    for split in ("Train", "Dev"):
        (root / "data" / "sap" / split / "spk").mkdir(parents=True)
    for entry in runs["runs"].values():
        entry["dataset_root"] = str(root / "data" / "sap")
    (root / "my_runs.yaml").write_text(yaml.safe_dump(runs))
    return root


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_dry_runs_as_typed(checkout, command):
    snakemake_part = command.split("|")[0]
    args = shlex.split(snakemake_part)
    if "profiles/slurm" in args and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("the SLURM executor plugin comes with `make test-slurm` (the quick pipeline on this profile)")
    if args[0] == "snakemake":
        args[0] = str(REPO / ".venv" / "bin" / "snakemake")  # the README's bare form assumes the venv is active
    if "--report" in args:  # needs a finished run (built in test_workflow's report test): check it parses
        i = args.index("--report")
        del args[i:i + 2]
    if "--dag" not in args:
        args.append("-n")  # a dry run: the DAG, settings and profile parse; nothing is computed
    proc = subprocess.run(args, cwd=checkout, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command}\n{out[-3000:]}"
    if "--dag" in args:
        assert proc.stdout.lstrip().startswith(("digraph", "---", "flowchart")), proc.stdout[:300]
    else:
        assert "Job stats" in out or "Nothing to be done" in out, out[-2000:]
