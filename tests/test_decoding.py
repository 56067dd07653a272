"""decoding's probability-weighted routes: `gate_speaker` sends all of a speaker's utterances to the expert of
the gate's mean probabilities over them (not to the majority of their own choices), each with its own
probability of that expert as weight; and decoding applies each utterance's weight to its expert."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from workflow_scripts import decoding
from workflow_scripts.gate_mlp import GateMLP
from workflow_scripts.moe import MoEWhisper
from workflow_scripts.sap_data import Utterance
from workflow_scripts.training import load_base
from workflow_scripts.whisper_io import encoder_windows

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Speakers interleaved; each speaker's own-argmax majority is expert 1, yet A's mean probabilities favour 0.
SPEAKERS = ["A", "B", "A", "B", "A", "B"]
P_EXPERT0 = [0.9, 0.2, 0.4, 0.2, 0.4, 0.55]  # A: 0.9, 0.4, 0.4 -> mean 0.567; B: 0.2, 0.2, 0.55 -> mean 0.317


def identity_gate(num_experts: int) -> GateMLP:
    """A gate whose logits are its input: GELU(x) - GELU(-x) = x, so a row of log-probabilities routes
    with exactly those probabilities."""
    gate = GateMLP(num_experts, num_experts, hidden_dim=2 * num_experts, dropout=0.0)
    eye = torch.eye(num_experts)
    with torch.no_grad():
        gate.net[0].weight.copy_(torch.cat([eye, -eye]))
        gate.net[0].bias.zero_()
        gate.net[-1].weight.copy_(torch.cat([eye, -eye], dim=1))
        gate.net[-1].bias.zero_()
    return gate


def small_moe(weighting: str) -> MoEWhisper:
    cfg = WhisperConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                        max_source_positions=50, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=3)
    return MoEWhisper(WhisperForConditionalGeneration(cfg), 2, r=2, alpha=4, gate=identity_gate(2),
                      weighting=weighting).eval()


def log_probs() -> torch.Tensor:
    p = torch.tensor(P_EXPERT0)
    return torch.stack([p, 1 - p], dim=1).log()


def utterance(i: int, speaker: str) -> Utterance:
    return Utterance(id=f"u{i}", speaker=speaker, etiology="ALS", wav="", transcript="", category="", split="Dev",
                     duration_s=1.0)


def test_identity_gate_routes_with_the_given_probabilities():
    moe = small_moe("prob")
    probs = moe.route(log_probs()).probs
    torch.testing.assert_close(probs[:, 0], torch.tensor(P_EXPERT0))


@pytest.mark.parametrize("weighting", ["prob", "straight_through"])
def test_a_speaker_goes_to_the_expert_of_its_mean_gate_probabilities(weighting):
    moe = small_moe(weighting)
    own, own_weights = decoding.gate_routes(moe, log_probs())
    assert own == [0, 1, 1, 1, 1, 0]  # each utterance's own argmax
    majority = {s: Counter(k for k, t in zip(own, SPEAKERS, strict=True) if t == s).most_common(1)[0][0]
                for s in "AB"}
    assert majority == {"A": 1, "B": 1}

    experts, weights = decoding.gate_routes(moe, log_probs(), SPEAKERS)
    by_mean = {"A": 0, "B": 1}
    assert experts == [by_mean[s] for s in SPEAKERS]
    assert experts != [majority[s] for s in SPEAKERS] and experts != own
    if weighting == "prob":
        # Each utterance's own probability of the expert it is sent to: not its top probability, nor the mean.
        own_prob = [p if k == 0 else 1 - p for p, k in zip(P_EXPERT0, experts, strict=True)]
        assert weights == pytest.approx(own_prob, abs=1e-5)
        assert own_weights == pytest.approx([max(p, 1 - p) for p in P_EXPERT0], abs=1e-5)
    else:  # an expert at full strength, as it was trained
        assert weights == own_weights == [1.0] * len(SPEAKERS)


def test_route_utterances_pools_speakers_only_for_gate_speaker(monkeypatch):
    moe = small_moe("prob")
    utts = [utterance(i, s) for i, s in enumerate(SPEAKERS)]
    monkeypatch.setattr(decoding, "gate_inputs", lambda *args, **kwargs: log_probs())
    assert decoding.route_utterances(moe, None, utts, "gate") == decoding.gate_routes(moe, log_probs())
    assert decoding.route_utterances(moe, None, utts, "gate_speaker") == decoding.gate_routes(moe, log_probs(),
                                                                                              SPEAKERS)
    assert decoding.route_utterances(moe, None, utts, "gate_speaker")[0] == [0, 1, 0, 1, 0, 1]


def test_decoding_scales_each_utterance_s_expert_by_its_own_weight(tiny_random):
    """Weight 0 decodes exactly as the base model, weight 1 through the whole expert, utterance by utterance
    within one batch."""
    base, processor = load_base(str(tiny_random), 2)
    torch.manual_seed(0)
    moe = MoEWhisper(base, 2, r=4, alpha=8, dropout=0.0).eval()
    with torch.no_grad():
        for layer in moe.layers.values():
            torch.nn.init.normal_(layer.lora_B[1], std=1.0)  # an expert far from the base model
    rng = np.random.default_rng(0)
    audios = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 8000)]
    windows = encoder_windows(moe.base)

    def decode(weights: list[float], baseline: bool = False) -> tuple[list[str], list[str] | None]:
        batches = list(decoding.audio_batches(processor, audios, windows, 4))
        assert len(batches) == 1  # both clips in one batch, one weight each
        return decoding.decode_batches(moe, processor, batches, 2, [1, 1], weights, device=torch.device("cpu"),
                                       baseline=baseline)

    first, base_hyps = decode([1.0, 0.0], baseline=True)
    second, _ = decode([0.0, 1.0])
    assert first[1] == base_hyps[1] and second[0] == base_hyps[0]  # weight 0: the base model
    assert first[0] != base_hyps[0] and second[1] != base_hyps[1]  # weight 1: the expert
