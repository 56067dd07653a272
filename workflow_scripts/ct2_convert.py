"""CTranslate2 Whisper -> `transformers` Whisper: read a `model.bin`, rename its weights, rebuild the processor.

faster-whisper pip packages ship Whisper as a CTranslate2 `model.bin` (format version 6) plus
tokenizer.json, vocabulary.json/txt and config.json. `ct2_to_transformers` turns that into a
`WhisperForConditionalGeneration` and `WhisperProcessor` with the same weights, tokens and greedy
decoding settings; base_model.py finds the packages and saves the result.
"""

from __future__ import annotations

import json
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

from workflow_scripts.model_specs import BaseModelError
from workflow_scripts.whisper_io import is_multilingual
from workflow_scripts.windows import POSITIONS_PER_SECOND

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.float64}


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
        **special_ids(token_ids),
    )


# ----------------------------------------------------------------------------- tokenizer / generation
def special_ids(token_ids: dict[str, int]) -> dict[str, int]:
    """The WhisperConfig / GenerationConfig ids of the start and end tokens (the end token also pads)."""
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
    if is_multilingual(len(vocabulary)):
        tokenizer.set_prefix_tokens(language="en", task="transcribe")
    extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=window_s)
    return WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def build_generation_config(tokenizer: WhisperTokenizer, ct2_config: dict, max_length: int) -> GenerationConfig:
    """Whisper generation settings; English-only models get no language/task tokens."""
    ids = tokenizer.get_vocab()
    multilingual = is_multilingual(len(tokenizer))
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
        **special_ids(ids),
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


# -------------------------------------------------------------------------------------- conversion
def ct2_to_transformers(data: bytes | memoryview, assets: Path, source: str = "model.bin",
                        ) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Model and processor from a CTranslate2 `model.bin` (`data`) and the folder of its tokenizer assets."""
    weights = read_ct2_model(data, source)
    ct2_config = json.loads((assets / "config.json").read_text())
    window_s = weights["encoder/position_encodings/encodings"].shape[0] // POSITIONS_PER_SECOND
    processor = build_processor(assets, weights["encoder/conv1/weight"].shape[1], window_s)
    config = _config_from_ct2(weights, processor.tokenizer.get_vocab())
    if config.vocab_size != len(processor.tokenizer):
        raise BaseModelError(f"{source}: model vocab {config.vocab_size} != tokenizer {len(processor.tokenizer)} "
                             f"({assets})")
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(_state_dict(weights, config.encoder_layers, config.decoder_layers), strict=True)
    model.generation_config = build_generation_config(processor.tokenizer, ct2_config, config.max_target_positions)
    return model.eval(), processor
