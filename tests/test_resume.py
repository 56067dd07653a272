"""Crash recovery inside a stage: a job killed midway resumes from its own checkpoint and ends with
exactly what an uninterrupted job produces (the research code's "resume" only skipped whole stages)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from workflow_scripts import asr, embeddings, training
from workflow_scripts.gate_mlp import read_gate_file
from workflow_scripts.settings import default_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Crash(RuntimeError):
    pass


def crash_after(n_calls: int, fn):
    """Wrap fn so that call number n_calls + 1 raises, like a job killed mid-stage."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise Crash(f"simulated crash at call {calls['n']}")
        return fn(*args, **kwargs)

    return wrapped


def run_settings(**overrides) -> dict:
    settings = default_run()
    settings.update(base_model="tiny-random", encoder_window_s=10, num_experts=3, skip_pretraining=True, seed=7)
    settings["lora"].update(r=4, alpha=8)
    settings["asr"].update(epochs=2, batch_size=2)
    settings["training"].update(gradient_accumulation_steps=2, checkpoint_every_steps=1)
    settings["embeddings"].update(batch_size=2, checkpoint_every=2)
    for section, values in overrides.items():
        settings[section].update(values)
    return settings


@pytest.fixture(scope="module")
def uninterrupted(utterance_files, tiny_random, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted joint training with run_settings(): the reference the crashed runs must equal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    record = asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random), out / "a",
                       out / "work_a", run_settings())
    return out / "a", record


def test_joint_training_resumes_mid_epoch_to_the_same_model(utterance_files, tiny_random, tmp_path, monkeypatch,
                                                            caplog, uninterrupted):
    settings = run_settings()
    train, val = utterance_files / "train.json", utterance_files / "val.json"
    reference, reference_record = uninterrupted

    # 8 utterances, batch 2, accumulation 2: 2 optimizer steps per epoch, 4 in all; run_batch also
    # serves the one validation batch per epoch. Call 8 is the third batch of epoch 2, right after
    # its first optimizer step (step 3) and that step's checkpoint.
    run_batch = asr.run_batch
    monkeypatch.setattr(asr, "run_batch", crash_after(7, run_batch))
    with pytest.raises(Crash):
        asr.train(train, val, str(tiny_random), tmp_path / "b", tmp_path / "work_b", copy.deepcopy(settings))
    assert (tmp_path / "work_b" / "resume.pt").exists()
    assert not (tmp_path / "b").exists()  # nothing half-written where the output belongs
    monkeypatch.undo()
    # The resumed run serves only what was left: the last two training batches of epoch 2 and its
    # validation batch. A run that logged the resume but started over would serve 10.
    served = []
    monkeypatch.setattr(asr, "run_batch", lambda *a, **k: served.append(1) or run_batch(*a, **k))
    with caplog.at_level(logging.INFO, logger="training"):
        record = asr.train(train, val, str(tiny_random), tmp_path / "b", tmp_path / "work_b", copy.deepcopy(settings))
    monkeypatch.undo()
    assert len(served) == 3
    assert "resuming from" in caplog.text and "epoch 2, step 3" in caplog.text
    assert record["history"][-1]["step"] == 4
    # The epoch the crash cut keeps its whole means and expert usage, not only the batches after the checkpoint.
    assert record["history"] == reference_record["history"]
    # The per-step curve has no duplicate steps: what was logged after the checkpoint is written once.
    steps = [[json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
             for out in (reference, tmp_path / "b")]
    assert steps[0] == steps[1] == sorted(set(steps[0]))

    for k in range(3):
        a = load_file(reference / f"expert_{k}" / "adapter_model.safetensors")
        b = load_file(tmp_path / "b" / f"expert_{k}" / "adapter_model.safetensors")
        for name in a:
            np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    gate_a, _ = read_gate_file(reference / "gate.safetensors")
    gate_b, _ = read_gate_file(tmp_path / "b" / "gate.safetensors")
    for (name, pa), pb in zip(gate_a.state_dict().items(), gate_b.state_dict().values(), strict=True):
        np.testing.assert_allclose(pa.numpy(), pb.numpy(), rtol=0, atol=1e-6, err_msg=name)


def _embeddings_crashed_after_two_batches(utts, tiny_random, tmp_path, monkeypatch, settings) -> None:
    """An uninterrupted extraction into a/, and one into b/ that crashes after two saved batches of two."""
    embeddings.extract(utts, str(tiny_random), tmp_path / "a", tmp_path / "work_a", settings)
    # Audio is decoded by the DataLoader's dataset (training.AudioDataset), here in this process.
    monkeypatch.setattr(training, "load_audio", crash_after(5, training.load_audio))
    with pytest.raises(Crash):
        embeddings.extract(utts, str(tiny_random), tmp_path / "b", tmp_path / "work_b", settings)
    assert not (tmp_path / "b" / "mapping.json").exists()
    monkeypatch.undo()


def test_embeddings_resume_from_partial_rows(utterance_files, tiny_random, tmp_path, monkeypatch):
    settings = run_settings()
    utts = utterance_files / "train.json"
    _embeddings_crashed_after_two_batches(utts, tiny_random, tmp_path, monkeypatch, settings)
    # Two batches of two were saved before the crash: the rerun decodes only the other four clips.
    counted = crash_after(10**6, training.load_audio)
    calls = []
    monkeypatch.setattr(training, "load_audio", lambda path: calls.append(path) or counted(path))
    embeddings.extract(utts, str(tiny_random), tmp_path / "b", tmp_path / "work_b", settings)
    assert len(calls) == 4
    a, b = np.load(tmp_path / "a" / "embeddings.npy"), np.load(tmp_path / "b" / "embeddings.npy")
    assert a.dtype == np.float16 and a.shape == (8, 64)
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    assert not (tmp_path / "work_b").exists()  # partial rows are removed once the output is complete


def test_damaged_partial_embeddings_start_over(utterance_files, tiny_random, tmp_path, monkeypatch, caplog):
    settings = run_settings()
    utts = utterance_files / "train.json"
    _embeddings_crashed_after_two_batches(utts, tiny_random, tmp_path, monkeypatch, settings)
    partial = tmp_path / "work_b" / "partial.npy"
    partial.write_bytes(partial.read_bytes()[:100])
    with caplog.at_level(logging.INFO, logger="embeddings"):
        embeddings.extract(utts, str(tiny_random), tmp_path / "b", tmp_path / "work_b", settings)
    assert "are damaged" in caplog.text and "resuming" not in caplog.text
    a, b = np.load(tmp_path / "a" / "embeddings.npy"), np.load(tmp_path / "b" / "embeddings.npy")
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


def _crashed_run(utterance_files, tiny_random, work, monkeypatch, settings) -> None:
    train, val = utterance_files / "train.json", utterance_files / "val.json"
    monkeypatch.setattr(asr, "run_batch", crash_after(7, asr.run_batch))
    with pytest.raises(Crash):
        asr.train(train, val, str(tiny_random), work / "out", work / "work", copy.deepcopy(settings))
    monkeypatch.undo()


def test_harmless_setting_changes_resume_instead_of_restarting(utterance_files, tiny_random, tmp_path, monkeypatch,
                                                                caplog, uninterrupted):
    """Workers, validation and checkpoint intervals do not change what training computes: a crashed run
    whose profile changed them carries on from its checkpoint and ends where it would have ended."""
    settings = run_settings()
    train, val = utterance_files / "train.json", utterance_files / "val.json"
    _crashed_run(utterance_files, tiny_random, tmp_path / "b", monkeypatch, settings)
    changed = run_settings(training={"num_workers": 1, "save_every_n_epochs": 1, "patience": 9})
    with caplog.at_level(logging.INFO, logger="training"):
        asr.train(train, val, str(tiny_random), tmp_path / "b" / "out", tmp_path / "b" / "work", changed)
    assert "resuming from" in caplog.text and "starting fresh" not in caplog.text
    a = load_file(uninterrupted[0] / "expert_0" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "expert_0" / "adapter_model.safetensors")
    for name in a:
        np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_changed_learning_rate_restarts_and_says_why(utterance_files, tiny_random, tmp_path, monkeypatch, caplog):
    settings = run_settings()
    _crashed_run(utterance_files, tiny_random, tmp_path, monkeypatch, settings)
    faster = run_settings(asr={"lr": 2 * settings["asr"]["lr"]})
    train, val = utterance_files / "train.json", utterance_files / "val.json"
    with caplog.at_level(logging.INFO, logger="training"):
        record = asr.train(train, val, str(tiny_random), tmp_path / "out", tmp_path / "work", faster)
    assert "starting fresh" in caplog.text and "resuming from" not in caplog.text
    assert f"asr.lr: {settings['asr']['lr']} -> {faster['asr']['lr']}" in caplog.text
    assert record["utterance_passes"] == 2 * 8  # both epochs trained from the start


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_resumes_mid_epoch_to_the_same_model(utterance_files, tiny_random, tmp_path, monkeypatch,
                                                             precision):
    """The CPU runs the mixed-precision paths through autocast; under fp16 the GradScaler's state (its
    scale and growth tracker) is part of the checkpoint, so a resumed run scales as the uninterrupted one."""
    settings = run_settings(training={"precision": precision})
    train, val = utterance_files / "train.json", utterance_files / "val.json"
    asr.train(train, val, str(tiny_random), tmp_path / "a", tmp_path / "work_a", copy.deepcopy(settings))
    _crashed_run(utterance_files, tiny_random, tmp_path / "b", monkeypatch, settings)
    state = training.read_checkpoint(tmp_path / "b" / "work" / "resume.pt")
    assert bool(state["scaler"]) == (precision == "fp16")  # bf16 needs no loss scaling
    record = asr.train(train, val, str(tiny_random), tmp_path / "b" / "out", tmp_path / "b" / "work",
                       copy.deepcopy(settings))
    assert record["precision"] == precision
    for k in range(3):
        a = load_file(tmp_path / "a" / f"expert_{k}" / "adapter_model.safetensors")
        b = load_file(tmp_path / "b" / "out" / f"expert_{k}" / "adapter_model.safetensors")
        for name in a:
            np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_a_damaged_checkpoint_resumes_from_the_previous_one_to_the_same_model(utterance_files, tiny_random, tmp_path,
                                                                              monkeypatch, caplog, uninterrupted):
    """A crash that also damaged the newest checkpoint (cut short, as a write on a filesystem without
    atomic rename can leave it) costs one more checkpoint interval, never the result."""
    settings = run_settings()
    train, val = utterance_files / "train.json", utterance_files / "val.json"
    _crashed_run(utterance_files, tiny_random, tmp_path / "b", monkeypatch, settings)
    newest = tmp_path / "b" / "work" / "resume.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.INFO, logger="training"):
        asr.train(train, val, str(tiny_random), tmp_path / "b" / "out", tmp_path / "b" / "work",
                  copy.deepcopy(settings))
    assert f"{newest} is damaged" in caplog.text
    assert "previous.pt (epoch 2, step 2)" in caplog.text  # one step before the damaged one (step 3)
    for k in range(3):
        a = load_file(uninterrupted[0] / f"expert_{k}" / "adapter_model.safetensors")
        b = load_file(tmp_path / "b" / "out" / f"expert_{k}" / "adapter_model.safetensors")
        for name in a:
            np.testing.assert_allclose(a[name].numpy(), b[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
