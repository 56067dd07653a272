"""What a model folder may hold, checked before anything it describes is allocated.

A model folder (a run's asr_best/, an expert, the gating stage's gate) travels: people share them and
load ones they did not train. So nothing in one is executable: tensors are safetensors, everything
else is JSON (resume checkpoints, which stay in a run's own _work/, are loaded with weights_only=True).
And every size, count and name read from one is range-checked here, with one line naming the file and
the key, before a tensor is allocated: a crafted file can neither run code nor exhaust memory.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open

from workflow_scripts.windows import window_ladder

# Upper bounds well above any real Whisper (large-v3: d_model 1280, 32 layers per stack) that still keep a
# hostile file from sizing a tensor of many GiB.
MAX_GATE_INPUT_DIM = 8192  # mean_std pooling doubles d_model (2560 on large)
MAX_GATE_HIDDEN_DIM = 65536
MAX_EXPERTS = 256
MAX_LORA_RANK = 4096  # a rank above a projection's width (1280 on large) adds nothing
MAX_LORA_ALPHA = 1e6
MAX_TARGET_MODULES = 64
MAX_ENCODER_LAYER = 256
MAX_UTTERANCE_PASSES = 10**9  # SAP's Train split is 320k utterances
MAX_NAME_CHARS = 4096
# JSON is read whole: a model folder's small files are far below these.
MAX_CONFIG_BYTES = 1 << 20
MAX_RECORD_BYTES = 64 << 20  # training.json carries one history entry per epoch
# A PEFT target_modules entry: a module name or a dotted suffix of one (q_proj, self_attn.v_proj).
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
POOLINGS = ("mean", "mean_std")
TRAINED_ROUTINGS = ("gate", "random_speaker", "etiology")  # asr.routing's values
REDO = "the folder is damaged or was not written by this workflow: rerun the stage that writes it, or get it again"


class ModelFolderError(ValueError):
    """A file in a model folder that this workflow will not load: malformed, out of range or foreign."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(path: str | Path, key: str, value: object, want: str) -> ModelFolderError:
    return ModelFolderError(f"{path}: {key}={_short(value)} is not {want}; {REDO}")


def check_int(value: object, path: str | Path, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise fail(path, key, value, f"an integer in [{lo}, {hi}]")
    return value


def check_number(value: object, path: str | Path, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (lo < value if lo_open else lo <= value) or value > hi:
        raise fail(path, key, value, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(value) if isinstance(value, float) else value


def check_choice(value: object, path: str | Path, key: str, choices: Collection) -> object:
    if isinstance(value, bool) or value not in choices:
        raise fail(path, key, value, f"one of {sorted(map(str, choices))}")
    return value


def check_string(value: object, path: str | Path, key: str, max_chars: int = MAX_NAME_CHARS) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_chars or "\0" in value:
        raise fail(path, key, value, f"a non-empty string of at most {max_chars} characters")
    return value


def check_keys(cfg: object, path: str | Path, required: Collection[str], optional: Collection[str] = ()) -> dict:
    """`cfg` is a JSON object holding every `required` key and no key outside required + optional."""
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{path}: holds a {type(cfg).__name__}, not a JSON object; {REDO}")
    missing = sorted(set(required) - cfg.keys())
    unknown = sorted(cfg.keys() - set(required) - set(optional))
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown key(s) {_short(unknown)}"
        raise ModelFolderError(f"{path}: {what}; {REDO}")
    return cfg


def read_json(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> object:
    """A JSON file of at most `max_bytes` (NaN and Infinity refused), or a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {REDO}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelFolderError(f"{path}: {size} bytes, more than the {max_bytes} such a file can hold; {REDO}")

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ModelFolderError(f"{path} is not a JSON file ({type(err).__name__}: {_short(str(err))}); {REDO}") from err


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, shape of each tensor) from a safetensors file's header; no tensor is read. The
    safetensors library refuses a header whose shapes do not match the bytes the file holds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {REDO}")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise ModelFolderError(f"{path} is not a safetensors file ({_short(str(err))}); {REDO}") from err


def check_shapes(path: str | Path, shapes: Mapping[str, tuple[int, ...]],
                 expected: Mapping[str, tuple[int, ...]]) -> None:
    """The file holds exactly the tensors `expected` names, each of the expected shape."""
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise ModelFolderError(f"{path} holds other tensors than expected: missing {_short(missing)}, "
                               f"unexpected {_short(unexpected)}; {REDO}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ModelFolderError(f"{path}: {name} has shape {tuple(shapes[name])}, expected {tuple(shape)}; {REDO}")


def check_gate_config(cfg: object, path: str | Path) -> dict:
    """GateMLP's sizes, each in range."""
    cfg = check_keys(cfg, f"{path} (gate config)", ("input_dim", "num_experts", "hidden_dim", "dropout"))
    return {"input_dim": check_int(cfg["input_dim"], path, "input_dim", 1, MAX_GATE_INPUT_DIM),
            "num_experts": check_int(cfg["num_experts"], path, "num_experts", 1, MAX_EXPERTS),
            "hidden_dim": check_int(cfg["hidden_dim"], path, "hidden_dim", 1, MAX_GATE_HIDDEN_DIM),
            "dropout": check_number(cfg["dropout"], path, "dropout", 0, 1)}


def check_layer(value: object, path: str | Path, key: str = "layer") -> str | int:
    return value if value == "last" else check_int(value, path, key, 0, MAX_ENCODER_LAYER)


def check_moe_config(cfg: object, path: str | Path, weightings: Collection[str]) -> dict:
    """moe_config.json: what MoEWhisper(...) is built with, each value in range; target_modules a list of
    module names (not a regex: one that backtracks catastrophically would hang the loader)."""
    cfg = check_keys(cfg, path, ("num_experts", "r", "alpha", "dropout", "target_modules", "weighting", "shared"))
    targets = cfg["target_modules"]
    if not isinstance(targets, list) or not 0 < len(targets) <= MAX_TARGET_MODULES:
        raise fail(path, "target_modules", targets, f"a list of 1 to {MAX_TARGET_MODULES} module names")
    for name in targets:
        if not isinstance(name, str) or len(name) > 128 or not MODULE_NAME.fullmatch(name):
            raise fail(path, "target_modules", name, "a module name such as q_proj")
    if not isinstance(cfg["shared"], bool):
        raise fail(path, "shared", cfg["shared"], "true or false")
    return {"num_experts": check_int(cfg["num_experts"], path, "num_experts", 1, MAX_EXPERTS),
            "r": check_int(cfg["r"], path, "r", 1, MAX_LORA_RANK),
            "alpha": check_number(cfg["alpha"], path, "alpha", 0, MAX_LORA_ALPHA, lo_open=True),
            "dropout": check_number(cfg["dropout"], path, "dropout", 0, 1),
            "target_modules": list(targets),
            "weighting": check_choice(cfg["weighting"], path, "weighting", weightings),
            "shared": cfg["shared"]}


def check_expert_folders(moe_dir: Path, num_experts: int, shared: bool) -> None:
    """expert_<k>/ for k in range(num_experts), shared/ exactly when the config says so, and no other
    expert folder: one more or fewer means moe_config.json does not describe this folder."""
    want = {f"expert_{k}" for k in range(num_experts)} | ({"shared"} if shared else set())
    have = {p.name for p in moe_dir.iterdir() if p.is_dir() and re.fullmatch(r"expert_\d+|shared", p.name)}
    for name in sorted(want - have):
        raise FileNotFoundError(f"{moe_dir / name} is missing but moe_config.json lists it; {REDO}")
    for name in sorted(have - want):
        raise ModelFolderError(f"{moe_dir / name} is not an expert of moe_config.json (num_experts={num_experts}, "
                               f"shared={str(shared).lower()}); {REDO}")


def check_adapter_config(cfg: object, path: str | Path, want: Mapping[str, object]) -> dict:
    """adapter_config.json of a PEFT LoRA folder: the values `want` names (r, alpha, ...) as the MoE has them."""
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{path}: holds a {type(cfg).__name__}, not a JSON object; {REDO}")
    for key, value in want.items():
        if cfg.get(key, value) != value:
            raise ModelFolderError(f"{path}: {key}={_short(cfg.get(key))} but this MoE needs {key}={value!r}; "
                                   "train the adapter with the MoE's LoRA settings or build the MoE to match")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ModelFolderError(f"{path}: rank_pattern/alpha_pattern are not supported by the MoE")
    return cfg


def read_training_record(model_dir: str | Path) -> dict:
    """A trained folder's training.json with every field that loading or routing reads range-checked."""
    path = Path(model_dir) / "training.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: give a folder written by the asr stage (results/<run>/asr_best)")
    record = read_json(path, MAX_RECORD_BYTES)
    if not isinstance(record, dict):
        raise ModelFolderError(f"{path}: holds a {type(record).__name__}, not a JSON object; {REDO}")
    for key in ("base_model", "encoder_window_s", "num_experts", "routing", "pooling"):
        if key not in record:
            raise ModelFolderError(f"{path}: lacks {key}; {REDO}")
    check_string(record["base_model"], path, "base_model")
    windows = record["encoder_window_s"]
    values = windows if isinstance(windows, list) and len(windows) <= 64 else [windows]
    for value in values:
        check_number(value, path, "encoder_window_s", 0, 30, lo_open=True)
    try:
        window_ladder(windows)
    except ValueError as err:
        raise ModelFolderError(f"{path}: {err}; {REDO}") from err
    check_int(record["num_experts"], path, "num_experts", 1, MAX_EXPERTS)
    check_choice(record["routing"], path, "routing", TRAINED_ROUTINGS)
    check_choice(record["pooling"], path, "pooling", POOLINGS)
    if "layer" in record:
        check_layer(record["layer"], path)
    if "seed" in record:
        check_int(record["seed"], path, "seed", 0, 2**63 - 1)
    etiologies = record.get("etiologies", [])
    if not isinstance(etiologies, list) or len(etiologies) > MAX_EXPERTS:
        raise fail(path, "etiologies", etiologies, f"a list of at most {MAX_EXPERTS} names")
    for name in etiologies:
        check_string(name, path, "etiologies", 256)
    for key in ("utterance_passes", "pretraining_utterance_passes"):
        if key in record:
            check_int(record[key], path, key, 0, MAX_UTTERANCE_PASSES)
    return record


def check_adapter(peft_dir: str | Path, want: Mapping[str, object], expected: Mapping[str, tuple[int, ...]],
                  targets: object) -> Path:
    """A PEFT LoRA folder whose config has the values `want` names and whose weights file declares exactly
    the tensors `expected` names, of those shapes; returns the weights file, not yet read."""
    peft_dir = Path(peft_dir)
    cfg_path, w_path = peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} missing: {peft_dir} is not a PEFT adapter folder")
    cfg = check_adapter_config(read_json(cfg_path), cfg_path, want)
    shapes = read_header(w_path)[1]
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise ModelFolderError(f"{w_path} targets other modules than this MoE (MoE target_modules={targets!r}, "
                               f"adapter target_modules={_short(cfg.get('target_modules'))}); "
                               f"missing {_short(missing)}, unexpected {_short(unexpected)}")
    check_shapes(w_path, shapes, expected)
    return w_path
