"""The one training loop: accumulation weights the last, shorter group by its own size, non-finite steps
are skipped and counted (too many in a row stop the stage), metrics.jsonl follows the steps, and both
training stages go through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workflow_scripts import asr, experts, train_loop
from workflow_scripts.sap_data import DataReport, read_split, write_utterances
from workflow_scripts.settings import default_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class LinearRecipe:
    """loss = w · c per utterance: every micro-batch gives the gradient c, whatever its size."""

    def __init__(self, losses: list[float] | None = None):
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.c = torch.tensor([1.0, 2.0, 3.0])
        self.nan_batches = set() if losses is None else {i for i, x in enumerate(losses) if x != x}
        self.calls = 0
        self.saved: list[Path] = []

    def batch_losses(self, batch: dict) -> dict:
        loss = (self.w * self.c).sum()
        if self.calls in self.nan_batches:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss": loss}

    def window_losses(self) -> dict:
        return {}

    def validate(self) -> dict:
        return {"val_loss": float(self.w.detach().abs().sum())}

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.saved.append(out_dir)

    def trainable_state(self) -> dict:
        return {"w": self.w.detach().clone()}

    def load_trainable_state(self, state: dict) -> None:
        self.w.data.copy_(state["w"])


def tcfg(**overrides) -> dict:
    cfg = dict(default_run()["training"])
    cfg.update(warmup_ratio=0.0, max_grad_norm=1e9, log_every_steps=1, **overrides)
    return cfg


def run(recipe: LinearRecipe, tmp_path: Path, n_batches: int, **overrides) -> dict:
    return train_loop.fit(recipe, optimizer=torch.optim.SGD([recipe.w], lr=1.0),
                          plans=[[[i] for i in range(n_batches)]], loader=lambda plan: [{"index": b} for b in plan],
                          batch_size=1, tcfg=tcfg(**overrides), work_dir=tmp_path,
                          identity={"test": 1}, select_by="loss", precision="fp32", batch_size_key="x.batch_size",
                          name="test")


def test_last_shorter_accumulation_group_counts_in_full(tmp_path):
    recipe = LinearRecipe()
    run(recipe, tmp_path, n_batches=3, gradient_accumulation_steps=2)
    # Two optimizer steps (batches 1+2, then batch 3 alone), linear decay from lr 1: 1.0 then 0.5.
    # Each step's gradient is c: the lone last batch is not halved as if its group were full.
    torch.testing.assert_close(recipe.w.detach(), -(1.0 + 0.5) * recipe.c)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert {"lr", "grad_norm", "loss", "utterances_per_s", "epoch"} <= set(lines[0])
    assert lines[0]["lr"] == [1.0] and lines[1]["lr"] == [0.5]


class TokenRecipe(LinearRecipe):
    """A batch's loss is the mean over its label tokens of w · v_token, as a language-model loss is."""

    def __init__(self, values: dict[int, torch.Tensor]):
        super().__init__()
        self.values = values  # utterance index -> (tokens, 3)

    def batch_losses(self, batch: dict) -> dict:
        tokens = torch.cat([self.values[i] for i in batch["index"]])
        return {"loss": (tokens @ self.w).mean()}


def test_a_step_is_the_mean_over_its_tokens_however_batches_divide_them(tmp_path):
    # Length-bucketed batches differ in size, and utterances in length: a step's gradient must be the
    # mean over all label tokens of its accumulation group, the empty share of a small global batch
    # (several processes) included.
    gen = torch.Generator().manual_seed(0)
    values = {i: torch.randn(n, 3, generator=gen) for i, n in enumerate([3, 7, 1, 5, 2])}
    plan = [[0, 1, 2], [], [3], [4]]

    def loader(p):
        return [{"index": b, "labels": torch.zeros(sum(len(values[i]) for i in b), dtype=torch.long)} for b in p]

    recipe = TokenRecipe(values)
    train_loop.fit(recipe, optimizer=torch.optim.SGD([recipe.w], lr=1.0), plans=[plan], loader=loader, batch_size=3,
                   tcfg=tcfg(gradient_accumulation_steps=4), work_dir=tmp_path, identity={"test": 2},
                   select_by="loss", precision="fp32", batch_size_key="x.batch_size", name="test")
    torch.testing.assert_close(recipe.w.detach(), -torch.cat(list(values.values())).mean(0))


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    recipe = LinearRecipe(losses=[0.0, float("nan"), 0.0, 0.0])
    result = run(recipe, tmp_path, n_batches=4, gradient_accumulation_steps=1)
    assert result["skipped_steps"] == 1
    assert torch.isfinite(recipe.w).all()


def test_too_many_non_finite_steps_in_a_row_stop_with_a_clear_error(tmp_path):
    recipe = LinearRecipe(losses=[0.0] + [float("nan")] * 5)
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row.*training.max_nonfinite_steps"):
        run(recipe, tmp_path, n_batches=6, gradient_accumulation_steps=1, max_nonfinite_steps=3)


@pytest.fixture(scope="module")
def utterances(tiny_corpus, tmp_path_factory):
    train = read_split(tiny_corpus, "Train", DataReport(), max_duration_s=10)
    folder = tmp_path_factory.mktemp("lists")
    write_utterances(folder / "train.json", train[:4])
    write_utterances(folder / "val.json", train[4:6])
    return folder, train


def test_both_training_stages_go_through_the_one_loop(utterances, tiny_random, tmp_path, monkeypatch):
    folder, train = utterances
    calls = []

    def spy(recipe, **kwargs):
        calls.append((type(recipe).__name__, kwargs["name"]))
        return train_loop.fit(recipe, **kwargs)

    monkeypatch.setattr(asr, "fit", spy)
    monkeypatch.setattr(experts, "fit", spy)
    s = default_run()
    s.update(base_model="tiny-random", encoder_window_s=10, num_experts=2, skip_pretraining=True, seed=1)
    s["lora"].update(r=4, alpha=8)
    s["asr"].update(epochs=1, batch_size=2)
    s["experts"].update(epochs=1, batch_size=2)
    s["training"].update(select_best_by="loss")
    asr.train(folder / "train.json", folder / "val.json", str(tiny_random), tmp_path / "asr", tmp_path / "w1", s)
    assignment = {"num_experts": 1, "train": [{**u.to_dict(), "expert": 0} for u in train[:4]],
                  "val": [{**u.to_dict(), "expert": 0} for u in train[4:6]]}
    (tmp_path / "assignment.json").write_text(json.dumps(assignment))
    experts.train_expert(0, tmp_path / "assignment.json", str(tiny_random), tmp_path / "e0", tmp_path / "w2", s)
    assert calls == [("JointRecipe", "joint training"), ("ExpertRecipe", "expert 0")]
    # The per-step curves travel with the trained model.
    for out in (tmp_path / "asr", tmp_path / "e0"):
        assert (out / "metrics.jsonl").read_text().strip()
