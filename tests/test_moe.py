import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import WhisperConfig, WhisperForConditionalGeneration

from workflow_scripts.gate_mlp import GateMLP, load_gate, read_gate_file, save_gate
from workflow_scripts.moe import MoEWhisper, load_balance_loss

torch.set_num_threads(1)
EMB, K, R, ALPHA = 16, 4, 4, 8
N_MELS, FRAMES = 8, 100  # max_source_positions 50 -> encoder input is exactly 100 frames


@pytest.fixture(scope="module")
def base() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, num_mel_bins=N_MELS, max_source_positions=50,
                        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperForConditionalGeneration(cfg).eval()


def batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, N_MELS, FRAMES, generator=g), torch.randint(4, 100, (n, 6), generator=g)


def make_moe(base, dropout: float = 0.0, gate: bool = True, b_std: float = 0.0, **kw) -> MoEWhisper:
    torch.manual_seed(2)
    moe = MoEWhisper(copy.deepcopy(base), K, r=R, alpha=ALPHA, dropout=dropout,
                     gate=GateMLP(EMB, K, hidden_dim=32, dropout=0.0) if gate else None, **kw)
    if b_std:  # B is zero-init (LoRA); non-zero B makes experts differ and gives A a gradient at once
        for layer in moe.layers.values():
            for b in layer.lora_B:
                torch.nn.init.normal_(b, std=b_std)
    return moe


def logits(model, feats, labels) -> torch.Tensor:
    return model(input_features=feats, decoder_input_ids=labels).logits


def test_targets_default_to_q_v_in_all_attention_blocks(base):
    moe = make_moe(base)
    names = set(moe.layers)
    assert "model.encoder.layers.0.self_attn.q_proj" in names
    assert "model.decoder.layers.1.encoder_attn.v_proj" in names
    assert len(names) == 2 * (2 + 2 * 2)  # q,v x (2 encoder self + 2 decoder self + 2 decoder cross)
    assert set(make_moe(base, target_modules=["k_proj"]).layers) == {n.replace("q_proj", "k_proj")
                                                                     for n in names if "q_proj" in n}
    with pytest.raises(ValueError, match="matched no module"):
        make_moe(base, target_modules=["nope"])


def test_joint_step_updates_every_routed_expert_the_gate_and_nothing_else(base):
    moe = make_moe(base, dropout=0.1, b_std=0.05).train()
    # keep experts 1 and 3 out of reach, then pick embeddings the gate sends to 0 and to 2
    moe.gate.net[-1].bias.data[[1, 3]] -= 20.0
    pool = torch.randn(64, EMB, generator=torch.Generator().manual_seed(3))
    choice = moe.route(pool).expert_idx
    emb = torch.cat([pool[choice == 0][:2], pool[choice == 2][:2]])
    feats, labels = batch(4)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    opt = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=1e-2)
    out = moe(feats, labels, emb)
    assert out["expert_idx"].tolist() == [0, 0, 2, 2]
    out["loss"].backward()
    opt.step()

    def changed(params):
        return [not torch.equal(before[n], p) for n, p in params]

    for k in (0, 2):
        for p in moe.expert_parameters(k):
            assert p.grad is not None and p.grad.abs().sum() > 0
    for k in (1, 3):
        assert all(p.grad is None for p in moe.expert_parameters(k))
    expert = [(n, p) for n, p in moe.named_parameters() if ".lora_" in n]
    routed = [(n, p) for n, p in expert if n.endswith((".0", ".2"))]
    unrouted = [(n, p) for n, p in expert if n.endswith((".1", ".3"))]
    assert len(routed) == len(unrouted) == 2 * 2 * len(moe.layers)
    assert all(changed(routed)) and not any(changed(unrouted))
    assert all(changed(moe.gate.named_parameters(prefix="gate")))
    frozen = [(n, p) for n, p in moe.named_parameters() if ".lora_" not in n and not n.startswith("gate")]
    assert frozen and not any(p.requires_grad for _, p in frozen) and not any(changed(frozen))


def test_routing_is_per_sample(base):
    moe = make_moe(base, gate=False, b_std=0.5).eval()
    feats, labels = batch(3)
    idx, w = torch.tensor([2, 0, 1]), torch.tensor([1.0, 0.5, 0.7])
    with torch.no_grad(), moe.routing(idx, w):
        mixed = logits(moe.base, feats, labels)
    for i in range(3):
        with torch.no_grad(), moe.routing(idx[i : i + 1], w[i : i + 1]):
            alone = logits(moe.base, feats[i : i + 1], labels[i : i + 1])
        with torch.no_grad(), moe.routing([(idx[i].item() + 1) % K], w[i : i + 1]):
            other = logits(moe.base, feats[i : i + 1], labels[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        assert (mixed[i : i + 1] - other).abs().max() > 1e-3
    with torch.no_grad():  # outside the context the LoRA path is off: plain base model
        torch.testing.assert_close(logits(moe.base, feats, labels), logits(base, feats, labels))
    with pytest.raises(ValueError, match="routing set for batch 2"), moe.routing([0, 1]):
        logits(moe.base, feats, labels)


@pytest.mark.parametrize("weighting", ["prob", "straight_through"])
def test_gate_gets_gradient_from_task_loss_alone(base, weighting):
    moe = make_moe(base, b_std=0.05, weighting=weighting).train()
    feats, labels = batch(4)
    out = moe(feats, labels, torch.randn(4, EMB))
    out["task_loss"].backward()
    for p in moe.gate.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_straight_through_routing_keeps_experts_at_full_strength(base):
    moe = make_moe(base, b_std=0.5, weighting="straight_through").eval()
    feats, labels = batch(3)
    emb = torch.randn(3, EMB)
    routed = moe.route(emb)
    assert torch.equal(routed.weights.detach(), torch.ones(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(feats, labels, emb)["task_loss"],
                                   moe(feats, labels, expert_idx=routed.expert_idx)["task_loss"])


def test_load_balance_loss_prefers_uniform_routing():
    uniform = torch.full((8, K), 1.0 / K)
    balanced_idx = torch.arange(8) % K
    assert load_balance_loss(uniform, balanced_idx).item() == pytest.approx(1.0)
    collapsed = torch.full((8, K), 0.01)
    collapsed[:, 0] = 1 - 0.01 * (K - 1)
    assert load_balance_loss(collapsed, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(
        K * collapsed[0, 0].item())
    assert load_balance_loss(collapsed, torch.zeros(8, dtype=torch.long)) > 3.5


def test_supervised_gate_loss(base):
    moe = make_moe(base)
    feats, labels = batch(2)
    emb = torch.randn(2, EMB)
    moe.eval()  # no gate dropout: the loss must be the cross-entropy of the gate's own logits
    out = moe(feats, labels, emb, cluster_labels=torch.tensor([1, 3]), expert_idx=[1, 3])
    expected = torch.nn.functional.cross_entropy(moe.gate(emb), torch.tensor([1, 3]))
    torch.testing.assert_close(out["gate_loss"], expected)
    assert out["expert_idx"].tolist() == [1, 3]
    # A step on it makes the labelled clusters more likely.
    out["gate_loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in moe.gate.parameters())
    with torch.no_grad():
        for p in moe.gate.parameters():
            p -= 0.5 * p.grad
        after = torch.nn.functional.cross_entropy(moe.gate(emb), torch.tensor([1, 3]))
    assert after < expected


def test_peft_round_trip(base, tmp_path):
    feats, labels = batch(3)
    torch.manual_seed(4)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA,
                                                                 target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(input_features=feats, labels=labels).loss.backward()
    opt.step()
    peft_model.eval().save_pretrained(tmp_path / "peft")

    moe = make_moe(base).eval()
    moe.load_expert_adapter(1, tmp_path / "peft")
    with torch.no_grad():
        want = logits(peft_model, feats, labels)
        with moe.routing([1, 1, 1]):
            got = logits(moe.base, feats, labels)
        with moe.routing([0, 0, 0]):
            untrained = logits(moe.base, feats, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (untrained - want).abs().max() > 1e-4  # the step moved the adapter off the base

    moe.save_expert_adapter(1, tmp_path / "out")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, feats, labels), want, atol=1e-5, rtol=0)


def test_load_expert_adapter_rejects_mismatches(base, tmp_path):
    for name, cfg in {"r8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                      "qk": LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj"])}.items():
        get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / name)
    moe = make_moe(base)
    with pytest.raises(ValueError, match=r"adapter_config.json: r=8 but this MoE needs r=4"):
        moe.load_expert_adapter(0, tmp_path / "r8")
    with pytest.raises(ValueError, match="targets other modules"):
        moe.load_expert_adapter(0, tmp_path / "qk")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        moe.load_expert_adapter(0, tmp_path)


def test_save_from_pretrained_round_trip(base, tmp_path):
    moe = make_moe(base, b_std=0.1).eval()
    moe.gate.fit_standardization(torch.randn(20, EMB) * 3 + 1)
    feats, labels = batch(4)
    emb = torch.randn(4, EMB)
    moe.save(tmp_path / "moe")
    moe.save(tmp_path / "moe")  # overwriting an existing folder works
    assert sorted(p.name for p in (tmp_path / "moe").iterdir()) == [
        "expert_0", "expert_1", "expert_2", "expert_3", "gate.safetensors", "moe_config.json"]
    assert json.loads((tmp_path / "moe" / "moe_config.json").read_text())["num_experts"] == K
    restored = MoEWhisper.from_pretrained(tmp_path / "moe", copy.deepcopy(base)).eval()
    torch.testing.assert_close(restored.gate.std, moe.gate.std)
    with torch.no_grad():
        a, b = moe(feats, labels, emb), restored(feats, labels, emb)
    assert torch.equal(a["expert_idx"], b["expert_idx"])
    torch.testing.assert_close(a["probs"], b["probs"])
    torch.testing.assert_close(a["loss"], b["loss"])


def test_gate_file_round_trip(tmp_path):
    gate = GateMLP(EMB, K, hidden_dim=8)
    gate.fit_standardization(torch.randn(10, EMB) + 5)
    save_gate(gate, tmp_path / "g" / "gate.safetensors", {"pooling": "mean", "clusters": [0, 1]})
    again, extra = read_gate_file(tmp_path / "g" / "gate.safetensors")
    assert extra == {"pooling": "mean", "clusters": [0, 1]}
    x = torch.randn(3, EMB)
    torch.testing.assert_close(again.eval()(x), gate.eval()(x))
    assert list((tmp_path / "g").iterdir()) == [tmp_path / "g" / "gate.safetensors"]  # no temp files left
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.pt"):
        load_gate(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"shape \(batch, 16\)"):
        gate(torch.randn(3, 4))


def test_generate_routes_each_sample_to_its_expert(base):
    moe = make_moe(base, b_std=2.0, weighting="straight_through").eval()
    feats, _ = batch(2)
    kw = {"max_new_tokens": 6, "do_sample": False}
    by_expert = [moe.generate(feats, expert_idx=[k, k], **kw) for k in range(K)]
    assert len({tuple(seq[0].tolist()) for seq in by_expert}) == K  # every expert decodes differently
    mixed = moe.generate(feats, expert_idx=[1, 3], **kw)
    assert torch.equal(mixed[0], by_expert[1][0]) and torch.equal(mixed[1], by_expert[3][1])
    emb = torch.randn(2, EMB)
    by_gate = moe.generate(feats, gate_inputs=emb, **kw)
    assert torch.equal(by_gate, moe.generate(feats, expert_idx=moe.route(emb).expert_idx, **kw))
    beams = moe.generate(feats, expert_idx=[1, 3], num_beams=2, **kw)  # batch expanded 2x inside
    assert beams.shape[0] == 2


def test_gate_dropout_never_changes_the_route(base):
    """Dropout regularises the gate's supervised loss, but the route is chosen with it off: an utterance
    goes to the same expert in training (train mode) and at eval."""
    moe = make_moe(base)
    moe.gate = GateMLP(EMB, K, hidden_dim=32, dropout=0.9)
    emb = torch.randn(64, EMB, generator=torch.Generator().manual_seed(4))
    moe.eval()
    at_eval = moe.route(emb)
    moe.train()
    for _ in range(3):
        in_training = moe.route(emb)
        assert torch.equal(in_training.expert_idx, at_eval.expert_idx)
        assert torch.equal(in_training.probs, at_eval.probs)
    # forward() is still stochastic in training: the dropout is real, only routing ignores it.
    assert not torch.equal(moe.gate(emb), moe.gate(emb))


def test_shared_adapter_serves_every_routed_sample_and_round_trips(base, tmp_path):
    moe = make_moe(base, gate=False, b_std=0.5, shared=True).train()
    assert moe.shared_index == K
    feats, labels = batch(3)
    out = moe(feats, labels, expert_idx=torch.tensor([0, 0, 2]))
    out["task_loss"].backward()
    shared = moe.expert_parameters(K)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    assert all(p.grad is None for p in moe.expert_parameters(1))  # unrouted expert: untouched
    moe.eval()
    with torch.no_grad():
        with moe.routing([1]):
            with_shared = logits(moe.base, feats[:1], labels[:1])
        for p in moe.expert_parameters(K)[1::2]:  # B of the shared pairs
            p.zero_()
        with moe.routing([1]):
            without = logits(moe.base, feats[:1], labels[:1])
        for p in moe.expert_parameters(K)[1::2]:
            torch.nn.init.normal_(p, std=0.5)
    assert (with_shared - without).abs().max() > 1e-3
    moe.save(tmp_path / "moe")
    assert (tmp_path / "moe" / "shared" / "adapter_model.safetensors").exists()
    again = MoEWhisper.from_pretrained(tmp_path / "moe", copy.deepcopy(base))
    for p, q in zip(moe.expert_parameters(K), again.expert_parameters(K), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="out of range"), moe.routing([K]):
        pass


def test_row_groups_are_found_once_per_batch_not_per_layer(base, monkeypatch):
    """Finding which rows go to which expert makes the host wait for the device: once per batch (and
    once more for beam search's expanded batch), never in each routed layer or decoding step."""
    moe = make_moe(base, gate=False, b_std=0.1).eval()
    calls = []
    unique = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: calls.append(1) or unique(*a, **k))
    feats, labels = batch(3)
    with torch.no_grad():
        moe(feats, labels, expert_idx=torch.tensor([0, 2, 2]))
    assert len(moe.layers) > 1 and len(calls) == 1
    calls.clear()
    moe.generate(feats, expert_idx=[0, 2, 2], max_new_tokens=5, do_sample=False, num_beams=1)
    assert len(calls) == 1
    calls.clear()
    moe.generate(feats, expert_idx=[0, 2, 2], max_new_tokens=5, do_sample=False, num_beams=2)
    assert len(calls) == 2  # the batch, then its beam-expanded copy
