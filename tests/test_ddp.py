"""Joint training in two processes (gloo, as torchrun starts them) equals one process on the same global batch,
including steps where a rank routes nothing to some expert."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from workflow_scripts.settings import default_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run_asr(utterance_files, tiny_random, out, processes: int, batch_size: int) -> dict:
    s = default_run()
    # Three experts and two utterances per rank and step: every step, each rank leaves an expert unrouted.
    s.update(base_model="tiny-random", num_experts=3, skip_pretraining=True, seed=11)
    s["lora"].update(r=4, alpha=8, dropout=0.0)  # no dropout draws, which differ between processes
    s["asr"].update(epochs=2, batch_size=batch_size)
    s["training"].update(select_best_by="loss", gpus=processes)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*(launcher if processes > 1 else [sys.executable]), "-m", "workflow_scripts.asr",
           "--train", str(utterance_files / "train.json"), "--val", str(utterance_files / "val.json"),
           "--base-model", str(tiny_random), "--out", str(out / "asr_best"), "--work-dir", str(out / "work"),
           "--threads", "1", "--settings", json.dumps(s)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "asr_best" / "training.json").read_text())


def test_two_processes_train_the_model_one_process_trains(utterance_files, tiny_random, tmp_path):
    one = run_asr(utterance_files, tiny_random, tmp_path / "one", processes=1, batch_size=4)
    two = run_asr(utterance_files, tiny_random, tmp_path / "two", processes=2, batch_size=2)
    assert one["utterance_passes"] == two["utterance_passes"] == 2 * one["n_train"]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    moved = 0
    for k in range(3):
        single = load_file(tmp_path / "one" / "asr_best" / f"expert_{k}" / "adapter_model.safetensors")
        ddp = load_file(tmp_path / "two" / "asr_best" / f"expert_{k}" / "adapter_model.safetensors")
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], atol=2e-5, rtol=1e-4)
            moved += int(single[name].abs().sum() > 0 and "lora_B" in name)
    assert moved > 0  # the experts trained (lora_B starts at zero)
