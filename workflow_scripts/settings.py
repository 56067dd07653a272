"""Run settings: schema defaults < hardware file < run entry, validated against config/schema.yaml.

The Snakefile and every stage CLI resolve settings through this module, so a stage run by hand
(`python -m workflow_scripts.<stage> --settings ...`) sees the same defaults as one run by Snakemake.
Stages receive only the sections they use (see `stage_settings`), so changing, say, an eval batch
size does not make Snakemake rerun the embeddings.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"

# Keys of a run that every stage may read; sections are added per stage.
COMMON_KEYS = ("base_model", "seed", "encoder_window_s", "num_experts", "skip_pretraining", "etiologies", "precision")


class SettingsError(ValueError):
    """A config problem, worded for the person who edits the config file."""


def load_schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _run_defaults(schema: dict) -> dict:
    """Defaults of every run key, sections expanded to their own property defaults."""
    out: dict[str, Any] = {}
    for key, spec in schema["$defs"]["run"]["properties"].items():
        if spec.get("type") == "object" and "properties" in spec:
            out[key] = {k: copy.deepcopy(v.get("default")) for k, v in spec["properties"].items()}
        else:
            out[key] = copy.deepcopy(spec.get("default"))
    return out


def default_run() -> dict:
    """Every run key at its schema default (data percentages unscaled)."""
    return _run_defaults(load_schema())


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _validate_run(entry: dict, schema: dict, where: str) -> None:
    run_schema = dict(schema["$defs"]["run"])
    run_schema["$defs"] = schema["$defs"]
    errors = sorted(jsonschema.Draft202012Validator(run_schema).iter_errors(entry), key=str)
    if errors:
        err = errors[0]
        path = ".".join(str(p) for p in err.absolute_path)
        if err.validator == "additionalProperties":
            # A misspelt key: name it and list what the section accepts.
            unknown = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            section = f"section {path}" if path else "a run"
            raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)} in {section}; valid keys: "
                                f"{', '.join(sorted(err.schema.get('properties', {})))}. See config/schema.yaml.")
        raise SettingsError(f"{where}: key {path or '(top level)'}: {err.message}. "
                            "See config/schema.yaml for allowed values.")


def with_schema_defaults(entry: dict, where: str) -> dict:
    """A partial run entry, validated against the schema, with every key it leaves out at its schema default.

    For a stage's own settings, which its CLI may be given by hand with only the keys it reads.
    """
    schema = load_schema()
    _validate_run(entry, schema, where)
    return _merge(_run_defaults(schema), entry)


def check_runs(config: dict) -> None:
    """Every run entry against the schema, with an error that names the run and the key first (Snakemake's
    own validation would print the whole schema before the key)."""
    schema = load_schema()
    for name, entry in (config.get("runs") or {}).items():
        _validate_run(entry or {}, schema, f"config runs.{name}")


def load_hardware(path: str) -> dict:
    """The profile's hardware file: a partial run entry applied to every run.

    A relative path is taken from the working directory, else from the repository (profiles name
    their file relative to the repository root).
    """
    if not path:
        return {}
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = SCHEMA_PATH.parent.parent / p
    if not p.is_file():
        raise SettingsError(f"hardware file {path} does not exist (set by a profile's `config: [hardware=...]`).")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    return data


def resolve_run(config: dict, run: str) -> dict:
    """Full settings of one run: every key present, validated, data percentages scaled."""
    schema = load_schema()
    runs = config.get("runs") or {}
    if run not in runs:
        known = ", ".join(sorted(runs)) or "none"
        raise SettingsError(
            f"run '{run}' is not in config `runs` (known: {known}); add it to config/config.yaml "
            f"or a file passed with --configfile."
        )
    hardware = load_hardware(config.get("hardware", ""))
    _validate_run(hardware, schema, f"hardware file {config.get('hardware')}")
    entry = runs[run] or {}
    _validate_run(entry, schema, f"config runs.{run}")
    settings = _merge(_merge(_run_defaults(schema), hardware), entry)
    settings["name"] = run
    # Derived, not a config key: the inference stages need the precision but not the rest of `training`.
    settings["precision"] = precision_setting(settings["training"])
    # Derived too: the data stage picks the eval utterances but must not rerun when an eval setting changes.
    settings["split_as_kit"] = split_as_kit(settings)
    data = settings["data"]
    scale = (data["data_percent"] or 100.0) / 100.0
    for key in ("embedding_percent", "expert_percent", "asr_percent"):
        data[key] = data[key] * scale
    return settings


def precision_setting(training: dict) -> str:
    """The run's precision before the device is known: training.precision, else the seed's fp16 flag
    (true = fp16, false = fp32), else auto. Every stage that runs the encoder uses it."""
    if training.get("precision", "auto") != "auto":
        return training["precision"]
    return {True: "fp16", False: "fp32"}.get(training.get("fp16", "auto"), "auto")


def split_as_kit(settings: dict) -> bool:
    """eval.split_as_kit with auto resolved: the kit's selection for an SAP tree, not for a generated corpus."""
    setting = settings["eval"]["split_as_kit"]
    if setting == "auto":
        return not settings["dataset_root"].startswith("synthetic:")
    return setting


def stage_settings(settings: dict, *sections: str) -> dict:
    """The common keys plus the named sections: what one stage reads."""
    out = {key: settings[key] for key in COMMON_KEYS}
    for section in sections:
        out[section] = settings[section]
    return out


def parse_settings_arg(value: str) -> dict:
    """--settings takes inline JSON or the path of a JSON/YAML file."""
    if value.lstrip().startswith("{"):
        return json.loads(value)
    with open(value) as f:
        return yaml.safe_load(f)
