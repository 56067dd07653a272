"""Training curves of expert pretraining and joint training, from the metrics.jsonl each trained model carries.

    python -m workflow_scripts.curves --out results/quick/training_curves.png \
        results/quick/asr_best results/quick/experts/expert_0 results/quick/experts/expert_1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workflow_scripts.atomic import atomic_file


def read_metrics(model_dir: Path) -> list[dict]:
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {model_dir} was not trained by this version of the workflow; "
                                "rerun its training stage")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot(model_dirs: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for model_dir in model_dirs:
        entries = read_metrics(model_dir)
        steps = [e["step"] for e in entries]
        label = model_dir.name if model_dir.name != "asr_best" else "joint training"
        ax_loss.plot(steps, [e.get("task_loss", e.get("loss")) for e in entries], label=label,
                     linewidth=2 if label == "joint training" else 1)
        ax_lr.plot(steps, [e["lr"][0] for e in entries], label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (task)", title="Training loss")
    ax_loss.legend(fontsize=7)
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="Schedule (warm-up, linear decay)")
    fig.tight_layout()
    with atomic_file(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("model_dirs", type=Path, nargs="+", help="trained model folders holding metrics.jsonl")
    args = parser.parse_args(argv)
    plot(args.model_dirs, args.out)


if __name__ == "__main__":
    main()
