"""Joint training's routing hygiene and budgets: the route an utterance takes in training is the one eval
takes, the load-balancing loss sees the whole accumulation window, a random gate gets standardised
inputs, a budget of utterance passes is exact, early stopping counts what it says."""

from __future__ import annotations

import copy

import pytest
import torch

from workflow_scripts import asr
from workflow_scripts.decoding import gate_inputs, route_utterances
from workflow_scripts.gate_mlp import read_gate_file
from workflow_scripts.moe import load_balance_loss
from workflow_scripts.sap_data import read_utterances, write_utterances
from workflow_scripts.settings import default_run
from workflow_scripts.training import make_loader, utterance_plan
from workflow_scripts.whisper_io import encoder_windows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def settings(**sections) -> dict:
    s = default_run()
    s.update(base_model="tiny-random", encoder_window_s=10, num_experts=3, skip_pretraining=True, seed=7)
    s["lora"].update(r=4, alpha=8)
    s["asr"].update(epochs=1, batch_size=4)
    s["training"].update(select_best_by="loss")
    for section, values in sections.items():
        s[section].update(values)
    return s


def test_training_and_eval_route_each_utterance_to_the_same_expert(utterance_files, tiny_random):
    s = settings()
    moe, processor, pooling, layer = asr.build_moe(str(tiny_random), s, None, None)
    utts = read_utterances(utterance_files / "train.json")
    rows = gate_inputs(moe, processor, utts, pooling=pooling, layer=layer, batch_size=4, device=torch.device("cpu"))
    moe.gate.fit_standardization(rows)
    with torch.no_grad():
        # A gate whose dropout, were it on when routing, would reshuffle the routes.
        for p in moe.gate.parameters():
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        moe.gate.net[2].p = 0.9
    ctx = asr.Context(s["asr"], [-100] * len(utts), None, rows, torch.device("cpu"), "fp32")
    moe.train()
    trained = [None] * len(utts)
    windows = encoder_windows(moe.base)
    plan = utterance_plan(utts, windows, 4, shuffle=True, seed=3)
    for batch in make_loader(utts, processor, plan, windows=windows, num_workers=0):
        for i, k in zip(batch["index"], asr.run_batch(moe, batch, ctx)["expert_idx"].tolist(), strict=True):
            trained[i] = k
    moe.eval()
    evaluated, _ = route_utterances(moe, processor, utts, "gate", pooling=pooling, layer=layer, batch_size=3)
    assert trained == evaluated
    assert len(set(trained)) > 1  # a real choice was made, not one expert for everything


def test_balance_loss_is_computed_over_the_whole_window(tiny_random):
    s = settings()
    moe, *_ = asr.build_moe(str(tiny_random), s, None, None)
    emb = [torch.randn(2, moe.gate.config["input_dim"], generator=torch.Generator().manual_seed(i)) for i in range(3)]
    routes = [moe.route(e).expert_idx for e in emb]
    window = asr.window_balance_loss(moe, emb, routes)
    together = moe.route(torch.cat(emb))
    assert torch.allclose(window, load_balance_loss(together.probs, together.expert_idx))
    per_micro_batch = torch.stack([load_balance_loss(moe.route(e).probs, r)
                                   for e, r in zip(emb, routes, strict=True)]).mean()
    assert not torch.allclose(window, per_micro_batch)


def test_random_gate_gets_the_input_standardisation_of_a_pretrained_one(utterance_files, tiny_random, tmp_path):
    record = asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random),
                       tmp_path / "out", tmp_path / "work", settings())
    assert record["pretrained"] is False
    gate, _ = read_gate_file(tmp_path / "out" / "gate.safetensors")
    moe, processor, pooling, layer = asr.build_moe(str(tiny_random), settings(), None, None)
    emb = gate_inputs(moe, processor, read_utterances(utterance_files / "train.json"), pooling=pooling, layer=layer,
                      batch_size=4, device=torch.device("cpu"))
    torch.testing.assert_close(gate.mean, emb.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gate.std, emb.std(0, unbiased=False).clamp_min(1e-6), atol=1e-4, rtol=1e-4)


def test_budget_of_utterance_passes_is_exact(utterance_files, tiny_random, tmp_path):
    s = {**settings(), "num_experts": 1}
    record = asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random),
                       tmp_path / "out", tmp_path / "work", s, max_passes=11)
    assert record["utterance_passes"] == 11  # 8 in epoch 1, the first 3 of epoch 2's order
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["trainable_params"]["gate"] == 0 and record["num_experts"] == 1


def test_best_checkpoint_by_validation_wer_is_recorded(utterance_files, tiny_random, tmp_path):
    s = settings(training={"select_best_by": "wer", "val_wer_samples": 2})
    record = asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random),
                       tmp_path / "out", tmp_path / "work", s)
    assert record["selected_by"] == "wer" and record["n_val_wer"] == 2
    assert record["best_val_wer"] == record["history"][0]["val_wer"] is not None


@pytest.mark.parametrize(("unit", "epochs_run"), [("epochs", 4), ("validations", 6)])
def test_patience_counts_epochs_or_validations(utterance_files, tiny_random, tmp_path, monkeypatch, unit,
                                               epochs_run):
    """Validations every 2 epochs, each worse than the first; patience 2 stops after 2 epochs or 2
    validations without improvement."""
    losses = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(asr, "validate", lambda moe, *a: {"val_loss": next(losses),
                                                          "val_expert_usage": [0] * moe.num_experts})
    s = settings(asr={"epochs": 6, "batch_size": 8},
                 training={"eval_every_n_epochs": 2, "patience": 2, "patience_unit": unit})
    record = asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random),
                       tmp_path / "out", tmp_path / "work", copy.deepcopy(s))
    assert len(record["history"]) == epochs_run
    assert record["best_epoch"] == 2


def test_cached_gate_inputs_equal_a_fresh_computation(utterance_files, tiny_random, tmp_path, monkeypatch):
    from workflow_scripts import embeddings, gate_features

    s = settings()
    moe, processor, pooling, layer = asr.build_moe(str(tiny_random), s, None, None)
    utts = read_utterances(utterance_files / "train.json")
    cpu = torch.device("cpu")
    spec = {"base_model": str(tiny_random), "encoder_window_s": [10.0, 30.0], "pooling": pooling, "layer": layer,
            "precision": "fp32"}
    fresh = gate_inputs(moe, processor, utts, pooling=pooling, layer=layer, batch_size=3, device=cpu)
    # Half of the utterances were embedded by the embeddings stage, the same way: their rows are reused.
    write_utterances(tmp_path / "embedded.json", utts[:4])
    embeddings.extract(tmp_path / "embedded.json", str(tiny_random), tmp_path / "emb", tmp_path / "w", s)
    computed = []
    original = gate_features.gate_inputs
    monkeypatch.setattr(gate_features, "gate_inputs",
                        lambda m, p, us, **k: computed.extend(us) or original(m, p, us, **k))
    cached = gate_features.gate_features(moe, processor, utts, spec=spec, batch_size=2, device=cpu,
                                         cache_dir=tmp_path / "cache", embeddings_dir=tmp_path / "emb")
    assert [u.id for u in computed] == [u.id for u in utts[4:]]
    torch.testing.assert_close(cached, fresh, atol=2e-3, rtol=0)
    # A resumed job reads the cache back without running the encoder.
    computed.clear()
    again = gate_features.gate_features(moe, processor, utts, spec=spec, batch_size=2, device=cpu,
                                        cache_dir=tmp_path / "cache", embeddings_dir=tmp_path / "emb")
    assert computed == [] and torch.equal(again, cached)
    # Embeddings made another way (another layer) are not taken for the gate's input.
    other = gate_features.gate_features(moe, processor, utts, spec={**spec, "layer": 1}, batch_size=2, device=cpu,
                                        cache_dir=tmp_path / "cache", embeddings_dir=tmp_path / "emb")
    assert len(computed) == len(utts) and other.shape == cached.shape


def test_encoder_runs_once_per_training_step(utterance_files, tiny_random, tmp_path, monkeypatch):
    from transformers.models.whisper import modeling_whisper

    calls = []
    forward = modeling_whisper.WhisperEncoder.forward
    monkeypatch.setattr(modeling_whisper.WhisperEncoder, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    record = asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random),
                       tmp_path / "out", tmp_path / "work", settings(asr={"epochs": 2, "batch_size": 4}))
    # 8 train and 2 validation utterances, batch 4: the gate inputs once (2 + 1 batches), then per epoch
    # 2 training steps and 1 validation batch, each with a single encoder pass.
    assert record["utterance_passes"] == 16
    assert len(calls) == (2 + 1) + 2 * (2 + 1)


@pytest.mark.parametrize("balance_weight", [0.0, 1.0])
def test_joint_training_spreads_a_collapsed_gate_only_with_the_balance_loss(utterance_files, tiny_random, tmp_path,
                                                                             balance_weight):
    """The research code's failure: a gate that sends every utterance to one expert. Trained by the real
    joint-training loop, the load-balancing loss spreads the traffic; without it, the gate stays collapsed."""
    from workflow_scripts.gate_mlp import GateMLP, save_gate

    s = settings(asr={"epochs": 6, "batch_size": 4, "load_balance_weight": balance_weight, "gate_lr": 0.05,
                      "gate_supervision_weight": 0.0},
                 training={"eval_every_n_epochs": 6, "log_every_steps": 1})
    s.update(skip_pretraining=False)
    gate = GateMLP(64, 3, hidden_dim=16, dropout=0.0)
    with torch.no_grad():
        gate.net[-1].bias.copy_(torch.tensor([3.0, 0.0, 0.0]))  # everything to expert 0
    save_gate(gate, tmp_path / "gating.safetensors",
              extra={"pooling": "mean", "layer": "last", "base_model": str(tiny_random), "encoder_window_s": 10})
    record = asr.train(utterance_files / "train.json", utterance_files / "val.json", str(tiny_random),
                       tmp_path / "out", tmp_path / "work", s, gating=tmp_path / "gating.safetensors")
    usage = [h["train_expert_usage"] for h in record["history"]]
    assert usage[0] == [8, 0, 0], usage  # it starts collapsed: all 8 utterances of the first epoch to expert 0
    used_late = {k for epoch in usage[3:] for k, n in enumerate(epoch) if n}
    if balance_weight:
        assert used_late - {0}, usage  # pushed off the overloaded expert
        assert len(used_late) > 1, usage
    else:
        assert used_late == {0}, usage
