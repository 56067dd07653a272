"""Expert assignment reuses cached cluster labels and routes the rest through the gate; an expert whose
cluster got no utterance still yields a loadable adapter and says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import WhisperForConditionalGeneration

from workflow_scripts import embeddings, experts
from workflow_scripts.gate_mlp import GateMLP, save_gate
from workflow_scripts.sap_data import DataReport, read_split, write_utterances
from workflow_scripts.settings import default_run
from workflow_scripts.training import load_base

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def train_utts(tiny_corpus):
    return read_split(tiny_corpus, "Train", DataReport(), max_duration_s=10)


def settings() -> dict:
    s = default_run()
    s.update(base_model="tiny-random", encoder_window_s=10, num_experts=3, seed=3)
    s["lora"].update(r=4, alpha=8)
    s["embeddings"].update(batch_size=4)
    return s


def test_assignment_uses_cluster_labels_then_the_gate(train_utts, tiny_random, tmp_path):
    embedded, rest, val = train_utts[:6], train_utts[6:10], train_utts[10:12]
    write_utterances(tmp_path / "embedded.json", embedded)
    s = settings()
    s["embeddings"]["layer"] = 1  # routing features from a middle layer: the gate must get the same
    embeddings.extract(tmp_path / "embedded.json", str(tiny_random), tmp_path / "emb", tmp_path / "work", s)
    assert json.loads((tmp_path / "emb" / "mapping.json").read_text())["layer"] == 1
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.save(tmp_path / "labels.npy", labels)
    torch.manual_seed(0)
    gate = GateMLP(64, 3, hidden_dim=8)
    record = {"pooling": "mean", "layer": 1, "base_model": str(tiny_random), "encoder_window_s": 10}
    save_gate(gate, tmp_path / "gate.safetensors", extra=record)
    write_utterances(tmp_path / "expert.json", embedded + rest)
    write_utterances(tmp_path / "val.json", val)

    def assign(gate_file):
        return experts.assign(tmp_path / "expert.json", tmp_path / "val.json", tmp_path / "emb",
                              tmp_path / "labels.npy", gate_file, str(tiny_random), tmp_path / "assignment.json", s)

    result = assign(tmp_path / "gate.safetensors")

    assert result["source"] == {"cluster_label": 6, "gate": 6}
    by_id = {d["id"]: d["expert"] for d in result["train"] + result["val"]}
    assert [by_id[u.id] for u in embedded] == labels.tolist()
    # The others go where the gate sends their pooled embedding.
    model, processor = load_base(str(tiny_random), 10)
    fresh = embeddings.embed_utterances(model, processor, rest + val, pooling="mean", layer=1, batch_size=4,
                                        device=torch.device("cpu"))
    with torch.no_grad():
        expected = gate.eval()(torch.from_numpy(fresh)).argmax(1).tolist()
    assert [by_id[u.id] for u in rest + val] == expected
    assert json.loads((tmp_path / "assignment.json").read_text())["counts"]["train"] == \
        np.bincount([by_id[u.id] for u in embedded + rest], minlength=3).tolist()
    # A gate trained on other features (here the last layer) would route on the wrong input: refused.
    save_gate(gate, tmp_path / "stale.safetensors", extra={**record, "layer": "last"})
    with pytest.raises(ValueError,
                       match=r"stale.safetensors: .*embeddings.layer='last'.*embeddings.layer=1.*rerun the gating"):
        assign(tmp_path / "stale.safetensors")


def test_expert_without_utterances_gets_a_loadable_untrained_adapter(train_utts, tiny_random, tmp_path):
    assignment = {"num_experts": 2, "train": [{**u.to_dict(), "expert": 0} for u in train_utts[:2]],
                  "val": [{**u.to_dict(), "expert": 0} for u in train_utts[2:3]]}
    (tmp_path / "assignment.json").write_text(json.dumps(assignment))
    metrics = experts.train_expert(1, tmp_path / "assignment.json", str(tiny_random), tmp_path / "expert_1",
                                   tmp_path / "work", settings())
    assert metrics["n_train"] == 0 and not (tmp_path / "work").exists()  # removed once published
    record = json.loads((tmp_path / "expert_1" / "training.json").read_text())
    assert record["n_train"] == 0 and record["expert"] == 1
    base = WhisperForConditionalGeneration.from_pretrained(tiny_random)
    peft = PeftModel.from_pretrained(base, tmp_path / "expert_1")
    # Untrained: LoRA's B matrices are still their zero initialisation, so the adapter adds nothing.
    lora_b = {n: p for n, p in peft.named_parameters() if "lora_B" in n}
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b.values())
    lora_a = [p for n, p in peft.named_parameters() if "lora_A" in n]
    assert all(torch.count_nonzero(p) > 0 for p in lora_a)  # real LoRA weights were loaded, not an empty shell
    # The manifest insists on experts 0..K-1: a missing expert 0 is an error, not a silent gap.
    with pytest.raises(ValueError, match="expected expert 0"):
        experts.manifest([tmp_path / "expert_1"], tmp_path / "manifest.json")


def test_training_an_expert_moves_only_its_adapter_weights(train_utts, tiny_random, tmp_path):
    assignment = {"num_experts": 2, "train": [{**u.to_dict(), "expert": 1} for u in train_utts[:4]],
                  "val": [{**u.to_dict(), "expert": 1} for u in train_utts[4:6]]}
    (tmp_path / "assignment.json").write_text(json.dumps(assignment))
    s = settings()
    s["experts"].update(epochs=1, batch_size=2)
    metrics = experts.train_expert(1, tmp_path / "assignment.json", str(tiny_random), tmp_path / "expert_1",
                                   tmp_path / "work", s)
    assert metrics["n_train"] == 4 and len(metrics["history"]) == 1
    assert not (tmp_path / "work").exists()  # resume checkpoints and saves go once the expert is published
    trained = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(tiny_random),
                                        tmp_path / "expert_1")
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: training moved it
    base = WhisperForConditionalGeneration.from_pretrained(tiny_random)
    merged = trained.merge_and_unload()
    unchanged = [n for n, p in base.named_parameters() if "q_proj" not in n and "v_proj" not in n]
    merged_params = dict(merged.named_parameters())
    assert all(torch.equal(dict(base.named_parameters())[n], merged_params[n]) for n in unchanged)
