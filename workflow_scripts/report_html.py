"""HTML tables for the Snakemake report (`snakemake --report report.html results/<run>/eval/metrics.json`):
eval scores per etiology with the experts each etiology was routed to, and the data report.

    python -m workflow_scripts.report_html eval results/quick/eval/metrics.json results/quick/eval/scores.html
    python -m workflow_scripts.report_html data results/quick/data_report.json results/quick/data_report.html
"""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

from workflow_scripts.atomic import write_text

STYLE = ("body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1.5em}"
         "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
         "th{background:#f3f3f3}caption{text-align:left;font-weight:bold;margin-bottom:4px}")


def table(caption: str, headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def page(title: str, tables: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(tables)}</body></html>\n")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def eval_page(metrics: dict) -> str:
    """WER/CER (%) and n per etiology and overall, the frozen base model's WER when eval.baseline ran,
    and the expert usage per etiology."""
    baseline = metrics.get("baseline", {})
    usage = metrics.get("expert_usage", {})
    rows = []
    for name, scores in [*sorted(metrics["per_etiology"].items()), ("overall", metrics["overall"])]:
        base = baseline.get("per_etiology", {}).get(name) if name != "overall" else baseline.get("overall")
        routed = ", ".join(f"expert {k}: {n}" for k, n in usage.get(name, {}).items()) if name != "overall" else ""
        rows.append([name, scores["n"], _pct(scores["wer"]), _pct(scores["cer"]),
                     _pct(base["wer"]) if base else "—", routed])
    tables = [table(f"Eval WER and CER (%), SAP-scored; {metrics.get('num_experts', '?')} experts, "
                    f"routing {metrics.get('routing')}",
                    ["etiology", "n", "WER", "CER", "base model WER", "expert usage"], rows)]
    if "speaker_routing" in metrics:
        spk = metrics["speaker_routing"]
        tables.append(table("Each speaker routed to the expert of the gate's mean probabilities",
                            ["etiology", "n", "WER", "CER"],
                            [[n, s["n"], _pct(s["wer"]), _pct(s["cer"])]
                             for n, s in [*sorted(spk["per_etiology"].items()), ("overall", spk["overall"])]]))
    return page("Eval scores", tables)


def data_page(report: dict) -> str:
    """Kept utterances per etiology and skipped ones per reason, per split; first what unpacking the SAP
    download gave, when the run read one (sap_download)."""
    tables = []
    if "download" in report:
        d = report["download"]
        rows = [["speaker tars unpacked", d["tars"]["unpacked"] + d["tars"]["already_unpacked"], ""]]
        rows += [[r, v["count"], "; ".join(v["examples"][:2])] for r, v in d["skipped"].items() if v["count"]]
        rows += [[f"speakers in {s}", n, ""] for s, n in sorted(d["speakers"].items())]
        tables.append(table(f"Download {d['download']}", ["", "count", "examples"], rows))
    for split, entry in report.items():
        if split == "download":
            continue
        kept = [[eti, n] for eti, n in sorted(entry["kept"].items())]
        kept.append(["total", sum(entry["kept"].values())])
        tables.append(table(f"{split}: kept utterances", ["etiology", "kept"], kept))
        skipped = [[reason, v["count"], "; ".join(v.get("examples", [])[:2])]
                   for reason, v in entry.get("skipped", {}).items() if v["count"]]
        converted = [[reason, v["count"], ""] for reason, v in entry.get("converted", {}).items() if v["count"]]
        tables.append(table(f"{split}: skipped (counted, never dropped silently) and converted",
                            ["reason", "count", "examples"], skipped + converted or [["none", 0, ""]]))
    return page("Data report", tables)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("eval", "data"))
    parser.add_argument("source", type=Path, help="eval/metrics.json or data_report.json")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.source.read_text())
    write_text(args.out, eval_page(data) if args.kind == "eval" else data_page(data))


if __name__ == "__main__":
    main()
