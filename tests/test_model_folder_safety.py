"""Nothing executable in a model folder: a trained asr_best whose files are, one at a time, replaced by a
pickle that creates a marker file when unpickled is refused by eval and transcribe with one line naming
the file, or the file is never read; a planted resume checkpoint is refused or skipped unread; and sizes,
counts and names out of range are refused before anything is allocated. The marker never appears.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import pickle
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workflow_scripts import asr, training, transcribe
from workflow_scripts import eval as eval_stage
from workflow_scripts.model_files import ModelFolderError, read_training_record
from workflow_scripts.sap_data import read_utterances, write_utterances
from workflow_scripts.settings import default_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Plant:
    """Unpickling this runs `touch marker`: what a hostile model file would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def as_pickle(marker: Path) -> bytes:
    return pickle.dumps(Plant(marker))


def as_torch_zip(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Plant(marker), buffer)
    return buffer.getvalue()


PLANTS: dict[str, Callable[[Path], bytes]] = {"pickle": as_pickle, "torch_save": as_torch_zip}

# Every file a trained asr_best holds (the table must match the folder: see the first test), and what
# eval and transcribe do with a hostile one in its place.
REFUSED = "refused"
NOT_READ = "not read"
FILES = {
    "training.json": REFUSED,
    "moe_config.json": REFUSED,
    "gate.safetensors": REFUSED,
    **{f"{adapter}/{name}": REFUSED for adapter in ("expert_0", "expert_1", "shared")
       for name in ("adapter_config.json", "adapter_model.safetensors")},
    "README.md": NOT_READ,  # the model card, for people
    "metrics.jsonl": NOT_READ,  # training curves
    "tensorboard/events.out.tfevents.*": NOT_READ,
    # The processor saved with the model is for other tools: eval and transcribe take the base model's.
    "processor_config.json": NOT_READ,
    "tokenizer.json": NOT_READ,
    "tokenizer_config.json": NOT_READ,
}


def run_settings() -> dict:
    s = default_run()
    s.update(base_model="tiny-random", encoder_window_s=10, num_experts=2, skip_pretraining=True, seed=5)
    s["lora"].update(r=4, alpha=8, shared=True)  # shared/ too: every kind of file a folder can hold
    s["asr"].update(epochs=1, batch_size=4)
    s["training"].update(select_best_by="loss")
    s["eval"].update(batch_size=2, baseline=False)
    return s


@pytest.fixture(scope="module")
def trained(utterance_files, tiny_random, tmp_path_factory) -> dict:
    """A real asr_best (two experts, a shared adapter, a gate), one eval utterance and its audio."""
    folder = tmp_path_factory.mktemp("trained")
    train = folder / "train.json"
    write_utterances(train, read_utterances(utterance_files / "train.json")[:4])
    asr.train(train, utterance_files / "val.json", str(tiny_random), folder / "asr_best", folder / "work",
              run_settings())
    utts = read_utterances(utterance_files / "val.json")[:1]
    write_utterances(folder / "eval.json", utts)
    return {"asr_best": folder / "asr_best", "eval": folder / "eval.json", "wav": utts[0].wav,
            "base": str(tiny_random)}


def copy_of(trained: dict, tmp_path: Path) -> Path:
    model = tmp_path / "asr_best"
    shutil.copytree(trained["asr_best"], model)
    return model


def folder_files(model: Path) -> list[str]:
    return sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())


def test_the_table_lists_every_file_a_trained_folder_holds(trained):
    files = folder_files(trained["asr_best"])
    matches = {pattern: [f for f in files if fnmatch.fnmatch(f, pattern)] for pattern in FILES}
    assert all(len(found) == 1 for found in matches.values()), matches
    assert sorted(f for found in matches.values() for f in found) == files


@pytest.mark.parametrize("kind", PLANTS)
def test_the_planted_files_run_code_when_unpickled(tmp_path, kind):
    """The payload is live: anything that unpickled it would have created the marker."""
    marker = tmp_path / "marker"
    payload = PLANTS[kind](marker)
    if kind == "pickle":
        pickle.loads(payload)
    else:
        torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


def one_line_naming(message: str, path: Path) -> bool:
    return str(path) in message and "\n" not in message.strip()


@pytest.mark.parametrize("kind", PLANTS)
@pytest.mark.parametrize("pattern", FILES)
def test_a_hostile_file_is_refused_or_never_read(trained, tmp_path, pattern, kind):
    model = copy_of(trained, tmp_path)
    (planted,) = [model / f for f in folder_files(model) if fnmatch.fnmatch(f, pattern)]
    marker = tmp_path / "marker"
    planted.write_bytes(PLANTS[kind](marker))
    out = tmp_path / "eval"
    if FILES[pattern] == REFUSED:
        with pytest.raises((ModelFolderError, FileNotFoundError)) as err:
            eval_stage.evaluate(model, trained["eval"], trained["base"], out, run_settings())
        assert one_line_naming(str(err.value), planted), err.value
        with pytest.raises(SystemExit) as exit_:
            transcribe.main([str(model), trained["wav"]])
        assert one_line_naming(str(exit_.value.code), planted), exit_.value.code
        assert not out.exists()
    else:
        metrics = eval_stage.evaluate(model, trained["eval"], trained["base"], out, run_settings())
        assert metrics["overall"]["n"] == 1
        assert transcribe.main([str(model), trained["wav"]]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("kind", PLANTS)
@pytest.mark.parametrize("where", ["resume.pt", "resume.previous.pt"])
@pytest.mark.parametrize("checksum", [True, False], ids=["with_checksum", "without_checksum"])
def test_a_planted_resume_checkpoint_is_never_unpickled(tmp_path, kind, where, checksum):
    """Without save_resume's checksum trailer the file counts as damaged and is skipped unread; with it,
    loading refuses (weights_only) with one line naming the file, whether it is the newest checkpoint or
    the previous one a damaged newest falls back to."""
    marker = tmp_path / "marker"
    payload = PLANTS[kind](marker)
    if checksum:
        payload += hashlib.sha256(payload).digest() + training.CHECKPOINT_TAG
    work = tmp_path / "work"
    work.mkdir()
    if where == "resume.previous.pt":
        (work / "resume.pt").write_bytes(b"cut short")
    (work / where).write_bytes(payload)
    if checksum:
        with pytest.raises(ValueError) as err:
            training.load_resume(work / "resume.pt", identity={})
        assert one_line_naming(str(err.value), work / where) and "delete it" in str(err.value)
    else:
        assert training.load_resume(work / "resume.pt", identity={}) is None
    assert not marker.exists()


def test_joint_training_refuses_a_planted_resume_checkpoint(trained, utterance_files, tmp_path):
    marker = tmp_path / "marker"
    payload = as_torch_zip(marker)
    work = tmp_path / "work"
    work.mkdir()
    (work / "resume.pt").write_bytes(payload + hashlib.sha256(payload).digest() + training.CHECKPOINT_TAG)
    with pytest.raises(ValueError, match="resume.pt holds more than tensors"):
        asr.train(trained["eval"], utterance_files / "val.json", trained["base"], tmp_path / "out", work,
                  run_settings())
    assert not marker.exists() and not (tmp_path / "out").exists()


def edit_json(name: str, key: str, value) -> Callable[[Path], Path]:
    def edit(model: Path) -> Path:
        data = json.loads((model / name).read_text())
        data[key] = value
        (model / name).write_text(json.dumps(data))
        return model / name

    return edit


def edit_gate(config: dict | None = None, tensor: tuple[str, tuple[int, ...]] | None = None):
    def edit(model: Path) -> Path:
        path = model / "gate.safetensors"
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        metadata["config"] = json.dumps({**json.loads(metadata["config"]), **(config or {})})
        if tensor:
            tensors[tensor[0]] = torch.zeros(tensor[1])
        save_file(tensors, path, metadata=metadata)
        return path

    return edit


def wider_adapter(model: Path) -> Path:
    path = model / "expert_1" / "adapter_model.safetensors"
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("lora_A.weight"))
    tensors[name] = torch.zeros(4096, tensors[name].shape[1])  # rank 4096 declared where the config says 4
    save_file(tensors, path)
    return path


def stray_expert(model: Path) -> Path:
    shutil.copytree(model / "expert_1", model / "expert_2")
    return model / "expert_2"


def missing_expert(model: Path) -> Path:
    edit_json("moe_config.json", "num_experts", 3)(model)
    return model / "expert_2"


def nan_alpha(model: Path) -> Path:
    path = model / "moe_config.json"
    path.write_text(path.read_text().replace('"alpha": 8', '"alpha": NaN'))
    return path


OUT_OF_RANGE = {
    "moe num_experts": (edit_json("moe_config.json", "num_experts", 10**6), "num_experts"),
    "moe r": (edit_json("moe_config.json", "r", 10**9), "r="),
    "moe alpha NaN": (nan_alpha, "not a JSON file"),
    "moe target regex": (edit_json("moe_config.json", "target_modules", "(a+)+$"), "target_modules"),
    "moe target name": (edit_json("moe_config.json", "target_modules", ["q_proj; rm -rf"]), "target_modules"),
    "moe shared": (edit_json("moe_config.json", "shared", "yes"), "shared"),
    "moe unknown key": (edit_json("moe_config.json", "trust_remote_code", True), "trust_remote_code"),
    "stray expert folder": (stray_expert, "not an expert of moe_config.json"),
    "missing expert folder": (missing_expert, "is missing"),
    "gate input_dim": (edit_gate(config={"input_dim": 10**6}), "input_dim"),
    "gate hidden_dim": (edit_gate(config={"hidden_dim": 10**7}), "hidden_dim"),
    "gate num_experts": (edit_gate(config={"num_experts": 0}), "num_experts"),
    "gate tensor shape": (edit_gate(tensor=("net.0.weight", (3, 3))), "net.0.weight"),
    "adapter shape": (wider_adapter, "lora_A.weight has shape (4096"),
    "adapter r": (edit_json("expert_0/adapter_config.json", "r", 4096), "r=4096"),
    "record num_experts": (edit_json("training.json", "num_experts", 10**6), "num_experts"),
    "record routing": (edit_json("training.json", "routing", "os.system"), "routing"),
    "record pooling": (edit_json("training.json", "pooling", ["mean"] * 10), "pooling"),
    "record window": (edit_json("training.json", "encoder_window_s", 1e9), "encoder_window_s"),
    "record layer": (edit_json("training.json", "layer", 10**9), "layer"),
    "record base_model": (edit_json("training.json", "base_model", "x" * 10**5), "base_model"),
}


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_out_of_range_sizes_counts_and_names_are_refused_before_allocation(trained, tmp_path, case):
    edit, key = OUT_OF_RANGE[case]
    model = copy_of(trained, tmp_path)
    path = edit(model)
    with pytest.raises((ModelFolderError, FileNotFoundError)) as err:
        transcribe.load_model(model)
    assert one_line_naming(str(err.value), path) and key in str(err.value), err.value


def test_the_comparison_reads_a_passes_budget_that_is_range_checked(trained, tmp_path):
    """compare's lora_same_steps trains for the mixture's utterance passes: a huge count would size its plan."""
    model = copy_of(trained, tmp_path)
    path = edit_json("training.json", "utterance_passes", 10**15)(model)
    with pytest.raises(ModelFolderError) as err:
        read_training_record(model)
    assert one_line_naming(str(err.value), path) and "utterance_passes" in str(err.value)


def test_a_folder_with_the_old_pickled_gate_is_refused(trained, tmp_path):
    model = copy_of(trained, tmp_path)
    (model / "gate.safetensors").rename(model / "gate.pt")
    with pytest.raises(ModelFolderError, match=r"gate.pt is a gate in the old pickle format.*rerun the asr stage"):
        transcribe.load_model(model)
