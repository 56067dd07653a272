"""The comparison's variants and how each changes the run's settings. Kept free of heavy imports:
the Snakefile reads it when it builds the DAG. workflow_scripts/compare.py says what each variant is."""

from __future__ import annotations

import copy

SINGLE_LORA = ("lora_same_params", "lora_same_rank", "lora_same_steps")
TRAINED = (*SINGLE_LORA, "moe_random_routing", "moe_oracle_etiology")
VARIANTS = ("zero_shot", *SINGLE_LORA, "moe", "moe_speaker_routing", "moe_random_routing", "moe_oracle_etiology")


def variants_of(settings: dict) -> list[str]:
    """The variants a run's comparison builds (the oracle needs one expert per etiology, speaker
    routing a gate with a choice to make)."""
    out = list(VARIANTS)
    if settings["num_experts"] != len(settings["etiologies"]):
        out.remove("moe_oracle_etiology")
    if settings["num_experts"] == 1:
        out.remove("moe_speaker_routing")
    return out


def variant_settings(settings: dict, variant: str, num_experts: int) -> dict:
    """The run's settings changed only where the variant differs; `num_experts` = the mixture's actual K."""
    s = copy.deepcopy(settings)
    # A shared adapter (lora.shared) is one more rank-r adapter, in parameters and in compute.
    adapters = num_experts + int(s["lora"]["shared"])
    if variant in ("lora_same_params", "lora_same_steps"):
        s["num_experts"] = 1
        s["lora"]["r"] *= adapters
        s["lora"]["alpha"] *= adapters
    elif variant == "lora_same_rank":
        per_utterance = 1 + int(s["lora"]["shared"])
        s["num_experts"] = 1
        s["lora"]["r"] *= per_utterance
        s["lora"]["alpha"] *= per_utterance
    elif variant == "moe_random_routing":
        s["num_experts"] = num_experts
        s["asr"]["routing"] = "random_speaker"
    elif variant == "moe_oracle_etiology":
        s["num_experts"] = len(s["etiologies"])
        s["asr"]["routing"] = "etiology"
    else:
        raise ValueError(f"variant {variant!r} is not trained by the comparison; trained ones: {TRAINED}")
    return s
