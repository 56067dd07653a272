"""Run settings: defaults from the schema, the profile's hardware file, the run entry, in that order."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_scripts.settings import SettingsError, resolve_run, stage_settings

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def test_precedence_schema_then_hardware_then_run():
    config = {"hardware": "profiles/a100_40gb/hardware.yaml",
              "runs": {"mine": {"dataset_root": "/data/sap", "asr": {"batch_size": 1}}}}
    settings = resolve_run(config, "mine")
    hardware = yaml.safe_load((REPO / "profiles" / "a100_40gb" / "hardware.yaml").read_text())
    assert settings["asr"]["batch_size"] == 1  # the run wins
    assert settings["gating"]["batch_size"] == hardware["gating"]["batch_size"]  # then the profile
    assert settings["training"]["gradient_accumulation_steps"] == hardware["training"]["gradient_accumulation_steps"]
    assert settings["asr"]["lr"] == 0.0005  # then the schema default
    assert settings["dataset_root"] == "/data/sap"


def test_data_percent_scales_stage_fractions_proportionally():
    settings = resolve_run({"runs": {"p": {"data": {"data_percent": 10}}}}, "p")
    assert (settings["data"]["embedding_percent"], settings["data"]["expert_percent"],
            settings["data"]["asr_percent"]) == pytest.approx((0.5, 1.5, 10.0))


@pytest.mark.parametrize(("entry", "key"), [
    ({"batch_size": 2}, "batch_size"),
    ({"asr": {"batchsize": 2}}, "batchsize"),
    ({"clustering": {"algorithm": "kmedoids"}}, "clustering.algorithm"),
])
def test_bad_run_keys_name_the_key(entry, key):
    with pytest.raises(SettingsError, match=re.escape(key)):
        resolve_run({"runs": {"r": entry}}, "r")


def test_unknown_run_names_the_known_ones():
    with pytest.raises(SettingsError, match="quick"):
        resolve_run({"runs": {"quick": {}}}, "qiuck")


def test_stage_settings_carry_only_their_sections():
    settings = resolve_run({"runs": {"r": {}}}, "r")
    gating = stage_settings(settings, "gating")
    assert "gating" in gating and "asr" not in gating and gating["seed"] == settings["seed"]


def test_profile_batch_sizes_reach_the_stage_commands(tmp_path):
    for split in ("Train", "Dev"):  # an SAP tree's layout: <Split>/<speaker>/
        (tmp_path / "sap" / split / "spk").mkdir(parents=True)
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump({"runs": {"x": {"dataset_root": "sap", "base_model": "v2"}}}))
    proc = subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
                           "--profile", str(REPO / "profiles" / "h100_80gb"), "--configfile",
                           str(tmp_path / "runs.yaml"), "-n", "-p", "results/x/gating.safetensors"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hardware = yaml.safe_load((REPO / "profiles" / "h100_80gb" / "hardware.yaml").read_text())
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "workflow_scripts.gating train" in line]
    assert lines, proc.stdout[-3000:]
    argv = shlex.split(lines[0])
    settings = json.loads(argv[argv.index("--settings") + 1])
    assert settings["gating"]["batch_size"] == hardware["gating"]["batch_size"]
