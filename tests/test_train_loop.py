"""The one training loop: accumulation weights the last, shorter group by its own size, non-finite steps
are skipped and counted (too many in a row stop the stage), metrics.jsonl follows the steps, and both
training stages go through it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from workflow_scripts import asr, experts, train_loop
from workflow_scripts.sap_data import DataReport, read_split, write_utterances
from workflow_scripts.settings import default_run
from workflow_scripts.train_watch import StageClock, format_duration

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


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (what a restarted writer purged left out)."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class RoutedRecipe(LinearRecipe):
    """Sends utterance i to expert i % 2 and reports a validation WER, as joint training does."""

    def __init__(self, crash_in_first_save: bool = False):
        super().__init__()
        self.crash_in_first_save = crash_in_first_save

    def batch_losses(self, batch: dict) -> dict:
        counts = torch.zeros(2)
        for i in batch["index"]:
            counts[i % 2] += 1
        return {**super().batch_losses(batch), "expert_counts": counts}

    def validate(self) -> dict:
        return {**super().validate(), "val_wer": 0.5, "val_expert_usage": [3, 1]}

    def save(self, out_dir: Path) -> None:
        if self.crash_in_first_save:
            self.crash_in_first_save = False
            raise RuntimeError("killed while saving the best checkpoint")
        super().save(out_dir)


def routed_run(recipe: RoutedRecipe, work_dir: Path, **overrides) -> dict:
    # Two epochs of four single-utterance batches: steps 1-4 and 5-8, a validation after each epoch.
    return train_loop.fit(recipe, optimizer=torch.optim.SGD([recipe.w], lr=1.0), plans=[[[0], [1], [2], [3]]] * 2,
                          loader=lambda plan: [{"index": b} for b in plan], batch_size=1,
                          tcfg=tcfg(**{"checkpoint_every_steps": 2, **overrides}), work_dir=work_dir,
                          identity={"test": 3}, select_by="wer", precision="fp32", batch_size_key="x.batch_size",
                          name="test")


def test_tensorboard_gets_the_metrics_points_and_each_validation(tmp_path):
    record = routed_run(RoutedRecipe(), tmp_path)
    got = scalars(tmp_path / "tensorboard")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in got["train/loss"]] == [x["step"] for x in lines] == list(range(1, 9))
    assert got["train/loss"] == [(x["step"], pytest.approx(x["loss"])) for x in lines]
    assert got["train/lr"] == [(x["step"], pytest.approx(x["lr"][0])) for x in lines]
    assert {"train/grad_norm", "train/utterances_per_s"} <= set(got)
    # Each step trains one utterance, alternately routed: the interval's share per expert.
    assert got["train/expert_usage/expert_0"][:2] == [(1, 1.0), (2, 0.0)]
    assert got["val/loss"] == [(h["step"], pytest.approx(h["val_loss"])) for h in record["history"]]
    assert [step for step, _ in got["val/loss"]] == [step for step, _ in got["val/wer"]] == [4, 8]
    assert got["val/wer"][0][1] == 0.5 and got["val/expert_usage/expert_0"][0] == (4, 0.75)
    # Published with metrics.jsonl: the stage copies the best folder next to it.
    assert scalars(tmp_path / "best" / "tensorboard") == got


def test_tensorboard_off_writes_no_event_file(tmp_path):
    routed_run(RoutedRecipe(), tmp_path, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").exists()
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_a_resumed_run_shows_each_step_once(tmp_path):
    routed_run(RoutedRecipe(), tmp_path / "a")
    # Killed after epoch 1's validation (step 4) was written, before the epoch's checkpoint: the
    # resumed run goes back to the step 2 checkpoint and writes steps 3 and 4 and that validation again.
    with pytest.raises(RuntimeError, match="killed"):
        routed_run(RoutedRecipe(crash_in_first_save=True), tmp_path / "b")
    assert [step for step, _ in scalars(tmp_path / "b" / "tensorboard")["val/loss"]] == [4]
    # Event files are read in name order, which starts with the second the writer opened; a resumed job
    # opens its file later than the killed one, which this test's fast restart must not outrun.
    time.sleep(1.1)
    routed_run(RoutedRecipe(), tmp_path / "b")
    assert len(list((tmp_path / "b" / "tensorboard").glob("events.out.tfevents*"))) == 2
    resumed, uninterrupted = scalars(tmp_path / "b" / "tensorboard"), scalars(tmp_path / "a" / "tensorboard")
    timing = "train/utterances_per_s"
    assert {tag: points for tag, points in resumed.items() if tag != timing} == \
        {tag: points for tag, points in uninterrupted.items() if tag != timing}
    assert [step for step, _ in resumed[timing]] == list(range(1, 9))


def test_joint_training_curves_reach_tensorboard_next_to_the_model(utterances, tiny_random, tmp_path):
    folder, _ = utterances
    s = default_run()
    s.update(base_model="tiny-random", encoder_window_s=10, num_experts=2, skip_pretraining=True, seed=1)
    s["lora"].update(r=4, alpha=8)
    s["asr"].update(epochs=2, batch_size=2)
    s["training"].update(select_best_by="wer", val_wer_samples=2, log_every_steps=1)
    record = asr.train(folder / "train.json", folder / "val.json", str(tiny_random), tmp_path / "asr", tmp_path / "w",
                       s)
    got = scalars(tmp_path / "asr" / "tensorboard")
    lines = [json.loads(x) for x in (tmp_path / "asr" / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines]
    assert steps == [1, 2, 3, 4]
    for tag in ("train/loss", "train/task_loss", "train/window_loss", "train/lr_group0", "train/lr_group1",
                "train/grad_norm", "train/expert_usage/expert_0", "train/expert_usage/expert_1"):
        assert [step for step, _ in got[tag]] == steps, tag
    assert got["train/loss"] == [(x["step"], pytest.approx(x["loss"])) for x in lines]
    assert got["train/expert_usage/expert_1"] == \
        [(x["step"], pytest.approx(x["expert_usage"][1] / sum(x["expert_usage"]))) for x in lines]
    for name in ("loss", "wer"):
        assert got[f"val/{name}"] == [(h["step"], pytest.approx(h[f"val_{name}"])) for h in record["history"]]


def test_a_fresh_start_drops_the_curves_of_an_abandoned_run(tmp_path):
    old = tmp_path / "tensorboard" / "events.out.tfevents.1.old"
    old.parent.mkdir()
    old.write_bytes(b"")
    routed_run(RoutedRecipe(), tmp_path)  # no resume checkpoint: a fresh start
    assert not old.exists()


@pytest.mark.parametrize(("seconds", "text"),
                         [(9.4, "9s"), (245, "4m05s"), (4980, "1h23m"), (2 * 86400 + 3 * 3600 + 59, "2d03h")])
def test_durations_read_at_a_glance(seconds, text):
    assert format_duration(seconds) == text


def test_stage_eta_is_the_pace_since_the_start_times_the_batches_left():
    now = [100.0]
    # Resumed in epoch 2 of three (4, 6 and 5 batches) after its first 2 batches: 4 + 5 batches left.
    clock = StageClock([4, 6, 5], epoch=2, batch_in_epoch=2, clock=lambda: now[0])
    assert clock.seconds_left() is None and clock.describe() == "?"
    for _ in range(3):
        clock.tick()
    now[0] += 30.0  # 10 s per batch since the resume, whatever the run before it took
    assert clock.seconds_left() == 60.0
    assert clock.describe() == "at most 1m00s"
