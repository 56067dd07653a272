"""The comparison's report: every number is recomputed from each variant's per_utterance.tsv.

For each variant: Dev WER/CER overall and per etiology (SAP rule, as `python -m
workflow_scripts.scoring` gives them from the same TSV), the WER difference to the best single LoRA
with a 95 % interval from a speaker-level bootstrap, expert usage per etiology, NMI/ARI of the routing
against etiology and against speaker, trainable parameters, utterance passes and training time.

    python -m workflow_scripts.compare_report --variants-dir results/quick/compare \
        --variants zero_shot lora_same_params ... --seed 42 --out-dir results/quick/compare
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from workflow_scripts.atomic import atomic_file, write_json, write_text
from workflow_scripts.scoring import score_corpus, score_utterance
from workflow_scripts.variants import SINGLE_LORA

log = logging.getLogger("compare_report")
BOOTSTRAP_DRAWS = 1000
# The goal the comparison is judged against (issue "Does the mixture help?").
GOAL = {"relative_wer_gain": 0.10, "min_expert_share": 0.05, "min_nmi_etiology": 0.8}


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def speaker_bootstrap(rows_a: list[dict], rows_b: list[dict], *, draws: int = BOOTSTRAP_DRAWS,
                      seed: int = 0) -> tuple[float, float]:
    """95 % interval of WER(a) - WER(b) over Dev speakers resampled with replacement.

    Both row lists hold the same utterances. Each draw resamples whole speakers, so the interval
    reflects how few speakers a Dev set has, not how many utterances.
    """
    speakers = sorted({r["speaker"] for r in rows_a})
    index = {s: i for i, s in enumerate(speakers)}
    sums = np.zeros((4, len(speakers)))  # errors a, words a, errors b, words b per speaker
    for ra, rb in zip(rows_a, rows_b, strict=True):
        i = index[ra["speaker"]]
        sa, sb = score_utterance(ra["reference"], ra["hypothesis"]), score_utterance(rb["reference"], rb["hypothesis"])
        sums[:, i] += (sa["word_errors"], sa["words"], sb["word_errors"], sb["words"])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(speakers), size=(draws, len(speakers)))
    weights = np.stack([np.bincount(p, minlength=len(speakers)) for p in picks])  # (draws, speakers)
    totals = weights @ sums.T  # (draws, 4)
    diff = totals[:, 0] / np.maximum(totals[:, 1], 1) - totals[:, 2] / np.maximum(totals[:, 3], 1)
    low, high = np.percentile(diff, [2.5, 97.5])
    return float(low), float(high)


def routing_agreement(rows: list[dict]) -> dict | None:
    """NMI/ARI of the experts chosen against etiology and against speaker (None without routing)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    experts = [r["expert"] for r in rows]
    if "" in experts or len(set(experts)) < 2:
        return None
    out = {}
    for key in ("etiology", "speaker"):
        truth = [r[key] for r in rows]
        out[f"nmi_{key}"] = round(float(normalized_mutual_info_score(truth, experts)), 4)
        out[f"ari_{key}"] = round(float(adjusted_rand_score(truth, experts)), 4)
    return out


def summarize(variants_dir: Path, variants: list[str], seed: int) -> dict:
    rows = {v: read_rows(variants_dir / v / "per_utterance.tsv") for v in variants}
    ids = [r["id"] for r in rows[variants[0]]]
    for v in variants:
        if [r["id"] for r in rows[v]] != ids:
            raise ValueError(f"{variants_dir / v / 'per_utterance.tsv'} scores other utterances than "
                             f"{variants[0]}; rerun the comparison so every variant decodes the same eval sample")
    result: dict = {"n_utterances": len(ids), "n_speakers": len({r["speaker"] for r in rows[variants[0]]}),
                    "bootstrap": {"draws": BOOTSTRAP_DRAWS, "seed": seed, "unit": "speaker"}, "variants": {}}
    for v in variants:
        metrics = json.loads((variants_dir / v / "metrics.json").read_text())
        usage: dict[str, Counter] = defaultdict(Counter)
        for r in rows[v]:
            if r["expert"] != "":
                usage[r["etiology"]][r["expert"]] += 1
        traffic = Counter(r["expert"] for r in rows[v] if r["expert"] != "")
        result["variants"][v] = {
            **score_corpus((r["reference"], r["hypothesis"], r["etiology"]) for r in rows[v]),
            "expert_usage": {e: dict(sorted(c.items())) for e, c in sorted(usage.items())},
            "expert_share": {k: round(n / len(ids), 4) for k, n in sorted(traffic.items())},
            "num_experts": metrics["num_experts"],
            "routing": routing_agreement(rows[v]),
            **{k: metrics.get(k) for k in ("trainable_params", "train_seconds", "utterance_passes",
                                           "encoder_window_s", "val_wer")},
        }
    singles = [v for v in SINGLE_LORA if v in rows]
    best = min(singles, key=lambda v: result["variants"][v]["overall"]["wer"])
    result["best_single_lora"] = best
    for v in variants:
        entry = result["variants"][v]
        diff = entry["overall"]["wer"] - result["variants"][best]["overall"]["wer"]
        low, high = speaker_bootstrap(rows[v], rows[best], seed=seed)
        base = result["variants"][best]["overall"]["wer"]
        entry["vs_best_single_lora"] = {"wer_diff": diff, "ci95": [low, high],
                                        "relative": diff / base if base else None}
    result["verdict"] = verdict(result, variants)
    return result


def verdict(result: dict, variants: list[str]) -> dict:
    """The best mixture against the best single LoRA, judged by the goal; stated whichever way it goes."""
    mixtures = [v for v in variants if v.startswith("moe")]
    best = min(mixtures, key=lambda v: result["variants"][v]["overall"]["wer"])
    entry = result["variants"][best]
    cmp = entry["vs_best_single_lora"]
    routing = entry["routing"] or {}
    gain = -cmp["relative"] if cmp["relative"] is not None else 0.0
    checks = {
        "relative_wer_gain_at_least_10pct": gain >= GOAL["relative_wer_gain"],
        "ci_excludes_zero": cmp["ci95"][1] < 0,
        "every_expert_at_least_5pct": (len(entry["expert_share"]) == entry["num_experts"]
                                       and min(entry["expert_share"].values()) >= GOAL["min_expert_share"]),
        "nmi_etiology_at_least_0.8": routing.get("nmi_etiology", 0.0) >= GOAL["min_nmi_etiology"],
    }
    return {"best_mixture": best, "best_single_lora": result["best_single_lora"], "checks": checks,
            "goal_met": all(checks.values())}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def render_markdown(result: dict, variants: list[str], title: str) -> str:
    v_all = result["variants"]
    etiologies = sorted({e for v in variants for e in v_all[v]["per_etiology"]})
    best = result["best_single_lora"]
    lines = [f"# {title}", "",
             f"{result['n_utterances']} eval utterances from {result['n_speakers']} speakers. WER/CER in %, "
             "SAP-scored from each variant's `per_utterance.tsv` (rescore any of them with "
             "`python -m workflow_scripts.scoring <variant>/per_utterance.tsv`). Δ is the WER difference in points "
             f"to the best single LoRA (`{best}`, chosen on this same eval set, which favours the control); "
             f"the 95 % interval comes from {BOOTSTRAP_DRAWS} speaker-level bootstrap draws "
             f"(seed {result['bootstrap']['seed']}). val WER: greedy WER on held-out Train speakers of the checkpoint "
             "kept (the same for both routings of one model), the number to choose a design by.", "",
             "| variant | WER | CER | Δ WER vs best LoRA [95 % CI] | relative | NMI eti | ARI eti | NMI spk | ARI spk "
             "| val WER | trainable params | utterance passes | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        e = v_all[v]
        cmp, r = e["vs_best_single_lora"], e["routing"] or {}
        rel = "—" if cmp["relative"] is None else f"{100 * cmp['relative']:+.1f} %"
        params = e["trainable_params"] or {}
        lines.append(
            f"| {v} | {_pct(e['overall']['wer'])} | {_pct(e['overall']['cer'])} | "
            f"{100 * cmp['wer_diff']:+.2f} [{100 * cmp['ci95'][0]:+.2f}, {100 * cmp['ci95'][1]:+.2f}] | {rel} | "
            + " | ".join(str(r.get(k, "—")) for k in ("nmi_etiology", "ari_etiology", "nmi_speaker", "ari_speaker"))
            + f" | {_pct(e['val_wer'])} | {params.get('lora', 0):,} + {params.get('gate', 0):,} gate"
            f" | {e['utterance_passes']} "
            f"| {e['train_seconds']} |")
    lines += ["", "## WER per etiology (%)", "",
              "| variant | " + " | ".join(f"{eti} (n={v_all[variants[0]]['per_etiology'][eti]['n']})"
                                        for eti in etiologies) + " |",
              "|---|" + "---|" * len(etiologies)]
    for v in variants:
        per = v_all[v]["per_etiology"]
        lines.append(f"| {v} | " + " | ".join(_pct(per[eti]["wer"]) if eti in per else "—" for eti in etiologies)
                     + " |")
    lines += ["", "## Expert usage per etiology (utterances)", ""]
    for v in variants:
        if v_all[v]["expert_usage"]:
            usage = "; ".join(f"{eti}: {counts}" for eti, counts in v_all[v]["expert_usage"].items())
            lines.append(f"- **{v}** (share per expert {v_all[v]['expert_share']}): {usage}")
    d = result["verdict"]
    cmp = v_all[d["best_mixture"]]["vs_best_single_lora"]
    lines += ["", "## Verdict", "",
              f"Best mixture: `{d['best_mixture']}`; best single LoRA: `{d['best_single_lora']}`. "
              f"Difference {100 * cmp['wer_diff']:+.2f} WER points "
              f"[{100 * cmp['ci95'][0]:+.2f}, {100 * cmp['ci95'][1]:+.2f}].", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {name.replace('_', ' ')}" for name, ok in d["checks"].items()]
    lines += ["", "The goal is " + ("met." if d["goal_met"] else
                                    "not met: on this data the mixture is not shown to beat one LoRA adapter."), ""]
    return "\n".join(lines)


def plot(result: dict, variants: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v_all = result["variants"]
    groups = ["overall", *sorted({e for v in variants for e in v_all[v]["per_etiology"]})]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 4.5))
    for i, v in enumerate(variants):
        wers = [100 * (v_all[v]["overall"] if g == "overall" else v_all[v]["per_etiology"].get(g, {"wer": 0}))["wer"]
                for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, wers, width, label=v)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=8)
    ax.set(ylabel="WER (%)", title="Dev WER per variant")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def write_report(variants_dir: Path, variants: list[str], out_dir: Path, seed: int, title: str) -> dict:
    result = summarize(variants_dir, variants, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compare.json", result)
    plot(result, variants, out_dir / "compare.png")
    write_text(out_dir / "report.md", render_markdown(result, variants, title))
    log.info("verdict: %s", result["verdict"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants-dir", type=Path, required=True, help="holds <variant>/per_utterance.tsv")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (the run's seed)")
    parser.add_argument("--title", default="Does the mixture help?")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    write_report(args.variants_dir, args.variants, args.out_dir, args.seed, args.title)


if __name__ == "__main__":
    main()
