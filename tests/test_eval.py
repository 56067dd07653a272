"""The eval stage on a trained mixture: it decodes the utterances it is given, its metrics rescore from its own
per_utterance.tsv, it records who went to which expert per etiology, an utterance takes the expert at eval that it
took in training, and `mean_std` pooling carries a doubled gate input from the embeddings stage to eval.

One tiny mixture per pooling is built by the stages themselves: embeddings stage -> gating stage -> joint
training (with the embeddings stage's rows as gate inputs) -> eval of the training utterances. The gating
stage's gate gets its output bias moved into the widest gap between the training utterances' logit
differences, so by construction it sends them to both experts with a margin that float16 rounding cannot cross.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import soundfile as sf
import torch

from workflow_scripts import asr, compare, embeddings, gating
from workflow_scripts import eval as eval_stage
from workflow_scripts.gate_mlp import read_gate_file, save_gate
from workflow_scripts.sap_data import DataReport, Utterance, read_split, read_utterances, write_utterances
from workflow_scripts.scoring import read_pairs, score_corpus, score_utterance
from workflow_scripts.settings import default_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
D_MODEL = 64  # tiny-random's encoder width


class Pipeline(NamedTuple):
    settings: dict
    folder: Path
    asr_best: Path
    emb_dir: Path
    train_utts: list[Utterance]
    trained_routes: list[int]  # the expert joint training routed each training utterance to
    trained_rows: torch.Tensor  # the gate inputs joint training routed them with
    eval_rows: torch.Tensor  # the gate inputs eval computed for the same utterances
    eval_metrics: dict  # eval of the training utterances


def run_settings(pooling: str) -> dict:
    s = default_run()
    s.update(base_model="tiny-random", encoder_window_s=10, num_experts=2, skip_pretraining=False, seed=7)
    s["lora"].update(r=4, alpha=8)
    # A gate learning rate too small to move a float32 weight: the gate that routed in training is the
    # one eval loads, so "same weights" holds and any difference in routes is the code's.
    s["asr"].update(epochs=1, batch_size=4, gate_lr=1e-12, load_balance_weight=0.0, gate_supervision_weight=0.0)
    s["training"].update(select_best_by="loss")
    # Dropout 0.9 in the gate (kept by the saved model): a route that drew dropout would reshuffle experts.
    s["gating"].update(hidden_dim=16, dropout=0.9, epochs=20)
    s["embeddings"].update(pooling=pooling, batch_size=5)  # three different batchings: 5, 4 (training), 8 (eval)
    s["eval"].update(batch_size=8, baseline=False)
    return s


def split_gate_at_widest_gap(gate_path: Path, rows: torch.Tensor) -> None:
    """Move the gate's expert-0 bias so the rows split into two groups of >= 2 at the widest gap."""
    gate, extra = read_gate_file(gate_path)
    with torch.no_grad():
        logits = gate.route_logits(rows)
        diff = (logits[:, 0] - logits[:, 1]).sort().values
        gaps = diff[2:-1] - diff[1:-2]  # splits leaving at least two rows on either side
        j = int(gaps.argmax()) + 1
        gate.net[-1].bias[0] -= (diff[j] + diff[j + 1]) / 2
    save_gate(gate, gate_path, extra)


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def build_pipeline(pooling: str, utterance_files: Path, tiny_random: Path, folder: Path) -> Pipeline:
    s = run_settings(pooling)
    base = str(tiny_random)
    train_json, val_json = utterance_files / "train.json", utterance_files / "val.json"
    train_utts = read_utterances(train_json)
    emb_dir = folder / "embeddings"
    embeddings.extract(train_json, base, emb_dir, folder / "work_emb", s)
    speakers = sorted({u.speaker for u in train_utts})
    np.save(folder / "labels.npy", np.array([speakers.index(u.speaker) % 2 for u in train_utts]))
    gating.train(emb_dir, folder / "labels.npy", folder / "gating.safetensors", folder / "gating_metrics.json", s)
    split_gate_at_widest_gap(folder / "gating.safetensors",
                             torch.from_numpy(np.load(emb_dir / "embeddings.npy").astype(np.float32)))

    routes: dict[int, int] = {}
    rows: list[torch.Tensor] = []
    run_batch = asr.run_batch

    def recording_run_batch(moe, batch, ctx):
        out = run_batch(moe, batch, ctx)
        if moe.training:  # a training step, not validation
            routes.update(zip(batch["index"], out["expert_idx"].tolist(), strict=True))
            rows.append(ctx.gate_rows)
        return out

    eval_rows: list[torch.Tensor] = []
    gate_inputs = eval_stage.gate_inputs

    def recording_gate_inputs(*args, **kwargs):
        eval_rows.append(gate_inputs(*args, **kwargs))
        return eval_rows[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asr, "run_batch", recording_run_batch)
        mp.setattr(eval_stage, "gate_inputs", recording_gate_inputs)
        asr.train(train_json, val_json, base, folder / "asr_best", folder / "work_asr", s,
                  gating=folder / "gating.safetensors", embeddings=emb_dir)
        metrics = eval_stage.evaluate(folder / "asr_best", train_json, base, folder / "eval_train", s)
    assert sorted(routes) == list(range(len(train_utts)))
    return Pipeline(s, folder, folder / "asr_best", emb_dir, train_utts, [routes[i] for i in range(len(train_utts))],
                    rows[0].cpu(), eval_rows[0], metrics)


@pytest.fixture(scope="module")
def pipeline(utterance_files, tiny_random, tmp_path_factory) -> Callable[[str], Pipeline]:
    """pipeline(pooling): the tiny mixture built and evaluated for that pooling, once per module."""
    built: dict[str, Pipeline] = {}

    def get(pooling: str) -> Pipeline:
        if pooling not in built:
            built[pooling] = build_pipeline(pooling, utterance_files, tiny_random,
                                            tmp_path_factory.mktemp(f"mixture_{pooling}"))
        return built[pooling]

    return get


def rescored(tsv: Path) -> dict:
    """workflow_scripts.scoring's own reader and corpus scorer on a per_utterance.tsv."""
    return score_corpus(read_pairs(tsv))


def test_eval_decodes_the_dev_utterances_and_its_metrics_rescore_from_its_tsv(pipeline, tiny_corpus, tiny_random,
                                                                              tmp_path, capsys):
    p = pipeline("mean")
    capsys.readouterr()  # what building the mixture printed
    dev = read_split(tiny_corpus, "Dev", DataReport(), max_duration_s=10)
    write_utterances(tmp_path / "dev.json", dev)
    settings = {**p.settings, "eval": {"batch_size": len(dev), "baseline": False, "num_beams": 1}}
    eval_stage.main(["--model", str(p.asr_best), "--utterances", str(tmp_path / "dev.json"),
                     "--base-model", str(tiny_random), "--out-dir", str(tmp_path / "eval"),
                     "--settings", json.dumps(settings)])
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = read_tsv(tmp_path / "eval" / "per_utterance.tsv")

    # Every utterance given, once, in the order given, with its own speaker, etiology and raw reference.
    assert [(r["id"], r["speaker"], r["etiology"], r["reference"]) for r in rows] == [
        (u.id, u.speaker, u.etiology, u.transcript) for u in dev]
    per_etiology = Counter(u.etiology for u in dev)
    assert metrics["overall"]["n"] == len(dev) == 10
    assert {e: m["n"] for e, m in metrics["per_etiology"].items()} == per_etiology
    assert all(r["hypothesis"] for r in rows)
    assert rescored(tmp_path / "eval" / "per_utterance.tsv") == {k: metrics[k] for k in ("overall", "per_etiology")}
    assert {k: printed[k] for k in ("overall", "per_etiology")} == {k: metrics[k] for k in ("overall", "per_etiology")}

    # Each utterance was decoded through the expert the trained gate picks on the embeddings stage's row.
    gate, _ = read_gate_file(p.asr_best / "gate.safetensors")
    embeddings.extract(tmp_path / "dev.json", str(tiny_random), tmp_path / "emb", tmp_path / "work_emb", settings)
    with torch.no_grad():
        logits = gate.route_logits(torch.from_numpy(np.load(tmp_path / "emb" / "embeddings.npy").astype(np.float32)))
    clear = (logits[:, 0] - logits[:, 1]).abs() > 1e-2  # out of float16 rounding's reach of a tie
    assert clear.any()
    assert [int(r["expert"]) for r, c in zip(rows, clear, strict=True) if c] == logits.argmax(1)[clear].tolist()

    # Expert usage per etiology is the TSV's expert column counted per etiology.
    usage: dict[str, Counter] = {}
    for r in rows:
        usage.setdefault(r["etiology"], Counter())[r["expert"]] += 1
    assert metrics["expert_usage"] == {e: dict(c) for e, c in usage.items()}
    assert metrics["experts_used"] == len({r["expert"] for r in rows})
    assert metrics["routing"] == "gate" and metrics["num_experts"] == 2
    # Routed by speaker instead, each Dev speaker (one per etiology) goes to one expert.
    assert all(len(c) == 1 and sum(c.values()) == per_etiology[e]
               for e, c in metrics["speaker_routing"]["expert_usage"].items())
    assert metrics["speaker_routing"]["overall"]["n"] == len(dev)

    # A random model's hypotheses are 100 % wrong everywhere, which any scores would match. The same writer on
    # hypotheses that are partly right (every k-th word replaced, k per utterance) gives rates that differ
    # between utterances and etiologies, and they too rescore exactly from the TSV.
    hyps = [" ".join("zebra" if j % (2 + i % 4) == 0 else w for j, w in enumerate(u.transcript.split()))
            for i, u in enumerate(dev)]
    written = eval_stage.write_results(dev, [int(r["expert"]) for r in rows], hyps, tmp_path / "partly", {})
    partly = read_tsv(tmp_path / "partly" / "per_utterance.tsv")
    assert len({r["wer"] for r in partly}) > 2 and 0 < written["overall"]["wer"] < 1
    assert json.loads((tmp_path / "partly" / "metrics.json").read_text()) == written
    assert rescored(tmp_path / "partly" / "per_utterance.tsv") == {k: written[k] for k in ("overall", "per_etiology")}
    for r, u, h in zip(partly, dev, hyps, strict=True):
        assert r["hypothesis"] == h and float(r["wer"]) == pytest.approx(score_utterance(u.transcript, h)["wer"],
                                                                         abs=5e-5)


@pytest.mark.parametrize("pooling", ["mean", "mean_std"])
def test_an_utterance_takes_the_same_expert_in_training_and_at_eval(pipeline, pooling):
    """Training routes from the gate-input cache filled by the embeddings stage, in train mode, in shuffled
    batches of 4; eval computes its own gate inputs from the saved model in batches of 8, in eval mode."""
    p = pipeline(pooling)
    trained_gate, _ = read_gate_file(p.folder / "gating.safetensors")
    saved_gate, _ = read_gate_file(p.asr_best / "gate.safetensors")
    for name, value in trained_gate.state_dict().items():  # same weights in both
        torch.testing.assert_close(saved_gate.state_dict()[name], value)
    assert len(set(p.trained_routes)) == 2  # a real choice: the split gate sends utterances to both experts
    rows = read_tsv(p.folder / "eval_train" / "per_utterance.tsv")
    assert [r["id"] for r in rows] == [u.id for u in p.train_utts]
    assert [int(r["expert"]) for r in rows] == p.trained_routes
    assert p.eval_metrics["experts_used"] == 2


def test_mean_std_pooling_doubles_the_gate_input_from_the_embeddings_stage_to_eval(pipeline, tiny_random):
    mean, mean_std = pipeline("mean"), pipeline("mean_std")
    # Embeddings stage: mean then standard deviation of the same frames, twice the width.
    mapping = json.loads((mean_std.emb_dir / "mapping.json").read_text())
    assert mapping["pooling"] == "mean_std" and mapping["dim"] == 2 * D_MODEL
    both = np.load(mean_std.emb_dir / "embeddings.npy")
    assert both.shape == (len(mean_std.train_utts), 2 * D_MODEL)
    np.testing.assert_array_equal(both[:, :D_MODEL], np.load(mean.emb_dir / "embeddings.npy"))
    assert (both[:, D_MODEL:] > 0).all()
    # The gating stage and joint training's own gate take the doubled width; the run records its pooling.
    gate, _ = read_gate_file(mean_std.asr_best / "gate.safetensors")
    assert gate.config["input_dim"] == 2 * D_MODEL
    assert read_gate_file(mean_std.folder / "gating.safetensors")[1]["pooling"] == "mean_std"
    fresh, *_ = asr.build_moe(str(tiny_random), mean_std.settings, None, None)
    assert fresh.gate.config["input_dim"] == 2 * D_MODEL
    assert json.loads((mean_std.asr_best / "training.json").read_text())["pooling"] == "mean_std"
    # Joint training routed with the embeddings stage's rows as they are, and eval, computing its own from the
    # saved model in other batches, gets the same rows (float16 rounding apart).
    torch.testing.assert_close(mean_std.trained_rows, torch.from_numpy(both.astype(np.float32)), atol=0, rtol=0)
    assert mean_std.eval_rows.shape == (len(mean_std.train_utts), 2 * D_MODEL)
    torch.testing.assert_close(mean_std.eval_rows, mean_std.trained_rows, atol=2e-3, rtol=1e-3)
    # Eval routes with them: every utterance scored, its expert recorded under its etiology.
    m = mean_std.eval_metrics
    assert m["overall"]["n"] == len(mean_std.train_utts) and m["routing"] == "gate"
    assert {e: sum(c.values()) for e, c in m["expert_usage"].items()} == Counter(
        u.etiology for u in mean_std.train_utts)


def test_eval_can_decode_at_other_windows_than_the_model_was_trained_with(pipeline, tiny_random, tmp_path):
    """`--encoder-window-s` separates what a model's training windows cost from what its decoding windows do."""
    p = pipeline("mean")
    dev = p.train_utts
    seen: list[int] = []

    def record_window(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input_features"]).shape[-1])

    def eval_at(*window_args: str) -> dict:
        seen.clear()
        out = tmp_path / f"eval{len(window_args)}"
        with pytest.MonkeyPatch.context() as mp:
            load_base = eval_stage.load_base

            def hooked_load_base(*args, **kwargs):
                base, processor = load_base(*args, **kwargs)
                base.get_encoder().register_forward_pre_hook(record_window, with_kwargs=True)
                return base, processor

            mp.setattr(eval_stage, "load_base", hooked_load_base)
            eval_stage.main(["--model", str(p.asr_best), "--utterances", str(p.folder / "train.json"),
                             "--base-model", str(tiny_random), "--out-dir", str(out),
                             "--settings", json.dumps(p.settings), *window_args])
        return json.loads((out / "metrics.json").read_text())

    write_utterances(p.folder / "train.json", dev)
    durations = sorted(u.duration_s for u in dev)
    assert durations[0] <= 5 < durations[-1] <= 10  # both 5 s and 10 s windows are needed below
    as_trained = eval_at()
    assert set(seen) == {1000} and as_trained["encoder_window_s"] == [10.0, 30.0]  # trained at 10 s
    assert "trained_encoder_window_s" not in as_trained
    ladder = eval_at("--encoder-window-s", "5", "10", "20", "30")
    assert set(seen) == {500, 1000}  # 100 mel frames per second: each clip in the smallest window holding it
    assert ladder["encoder_window_s"] == [5.0, 10.0, 20.0, 30.0] and ladder["trained_encoder_window_s"] == [10.0, 30.0]
    assert ladder["overall"]["n"] == len(dev)
    with pytest.raises(ValueError, match="drop --encoder-window-s or --update-model-card"):
        eval_stage.evaluate(p.asr_best, p.folder / "train.json", str(tiny_random), tmp_path / "card", p.settings,
                            update_model_card=True, encoder_window_s=30)


def test_eval_decodes_long_clips_in_chunks_and_lists_what_it_could_not_decode(pipeline, tiny_corpus, tiny_random,
                                                                               tmp_path):
    """What the kit's selection brings to eval: a 35 s clip is decoded in 30 s chunks through one expert, a clip
    whose audio cannot be decoded scores as an empty prediction (as the kit scores a missing one) and is listed
    under coverage.not_decoded, and beam search (eval.num_beams) runs through the routed experts."""
    p = pipeline("mean")
    dev = read_split(tiny_corpus, "Dev", DataReport(), max_duration_s=10)[:3]
    audio, rate = sf.read(dev[0].wav, dtype="float32")
    sf.write(tmp_path / "long.wav", np.resize(audio, 35 * rate), rate)
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    extra = [Utterance("long", dev[0].speaker, dev[0].etiology, str(tmp_path / "long.wav"), dev[0].transcript, "",
                       "Dev", 35.0),
             Utterance("broken", dev[1].speaker, dev[1].etiology, str(tmp_path / "broken.wav"), dev[1].transcript, "",
                       "Dev", 2.0)]
    write_utterances(tmp_path / "dev.json", dev + extra)
    settings = {**p.settings, "split_as_kit": True, "eval": {"batch_size": 4, "baseline": True, "num_beams": 2}}
    metrics = eval_stage.evaluate(p.asr_best, tmp_path / "dev.json", str(tiny_random), tmp_path / "eval", settings)
    assert metrics["num_beams"] == 2 and metrics["overall"]["n"] == 5
    assert metrics["coverage"]["over_30s"] == 1 and metrics["coverage"]["split_as_kit"] is True
    not_decoded = metrics["coverage"]["not_decoded"]
    assert [(e["id"], e["wav"]) for e in not_decoded] == [("broken", str(tmp_path / "broken.wav"))]
    rows = {r["id"]: r for r in read_tsv(tmp_path / "eval" / "per_utterance.tsv")}
    assert rows["broken"]["hypothesis"] == ""
    with (tmp_path / "eval" / "predict.csv").open(newline="") as f:
        assert {r["id"]: r["raw_hypos"] for r in csv.DictReader(f)} == {i: r["hypothesis"] for i, r in rows.items()}
    # The comparison's zero-shot variant decodes the same selection the same way.
    zero = compare.zero_shot(tmp_path / "dev.json", str(tiny_random), tmp_path / "zero", batch_size=4,
                             split_as_kit=True)
    assert zero["overall"]["n"] == 5 and zero["coverage"]["not_decoded"] == not_decoded
    assert zero["coverage"]["over_30s"] == 1
