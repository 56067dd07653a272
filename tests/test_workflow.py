"""The Snakemake DAG itself: dry-run job lists, a real end-to-end run, freshness, lint.

The end-to-end run uses the generated tiny corpus and the tiny random Whisper in a temporary working
directory, through the same Snakefile, profile and stage CLIs a user runs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file

from workflow_scripts.gate_mlp import read_gate_file, save_gate
from workflow_scripts.scoring import score_corpus
from workflow_scripts.settings import resolve_run
from workflow_scripts.variants import variants_of

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
# Later invocations must use the same profile: its hardware settings are stage params, and changed
# params rerun a stage.
CPU_PROFILE = ("--profile", str(REPO / "profiles" / "cpu"))

TEST_RUN = {
    "dataset_root": "synthetic:tiny",
    "base_model": "tiny-random",
    "encoder_window_s": 10,
    "num_experts": 2,
    "data": {"embedding_percent": 100, "expert_percent": 100, "embedding_samples": 14, "expert_samples": 10,
             "asr_samples": 10, "max_val_samples": 4, "eval_samples": 6},
    "clustering": {"algorithm": "spectral", "reduce_dim": 5, "plot_method": "pca"},
    "gating": {"epochs": 5},
    "lora": {"r": 4, "alpha": 8},
    "experts": {"epochs": 1, "batch_size": 4},
    "asr": {"epochs": 1, "batch_size": 4},
    "eval": {"batch_size": 6, "baseline": True},
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           "--configfile", str(workdir / "runs.yaml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from the 'Job stats' table that a dry run prints."""
    text = proc.stdout + proc.stderr
    table = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    jobs = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


def write_runs(workdir: Path, runs: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runs.yaml").write_text(yaml.safe_dump({"runs": runs}))


HOSTILE_DIR_NAME = "long corpus; touch pwned"
LONG_CLIPS_S = {"Dev": (12.0, 25.0, 30.0, 31.0), "Train": (12.0,)}


def corpus_with_long_clips(corpus: Path, out: Path) -> Path:
    """A copy of the tiny corpus whose first speaker of each split also reads long passages (LONG_CLIPS_S):
    clips of 30 s or less must reach every stage at any window setting; longer ones are skipped, counted."""
    shutil.copytree(corpus, out)
    for split, lengths in LONG_CLIPS_S.items():
        speaker = sorted(p for p in (out / split).iterdir() if p.is_dir())[0]
        manifest_path = speaker / f"{speaker.name}.json"
        manifest = json.loads(manifest_path.read_text())
        entry = manifest["Files"][0]
        audio, rate = sf.read(speaker / entry["Filename"], dtype="float32")
        for n, seconds in enumerate(lengths):
            name = f"{speaker.name}_9000_{n}_16kHz.wav"
            sf.write(speaker / name, np.resize(audio, round(seconds * rate)), rate)
            repeats = round(seconds * rate / len(audio))
            text = " ".join([entry["Prompt"]["Transcript"]] * max(repeats, 1))
            manifest["Files"].append({**entry, "Filename": name, "Prompt": {**entry["Prompt"], "Transcript": text}})
        manifest_path.write_text(json.dumps(manifest))
    return out


UNLISTED_ETIOLOGY = "Huntington's Disease"


def add_kit_edge_cases(corpus: Path) -> Path:
    """Dev utterances the challenge kit scores but a run's own selection would not: a speaker of an etiology
    the run does not list, an empty transcript, a transcript behind a `#dis` line and, not scored by either, an entry
    whose wav is missing."""
    dev = corpus / "Dev"
    sources = [(p, e) for p in sorted(p for p in dev.iterdir() if p.is_dir())
               for e in json.loads((p / f"{p.name}.json").read_text())["Files"]][:3]
    manifest = json.loads((sources[0][0] / f"{sources[0][0].name}.json").read_text())
    clone = dev / "UNLISTED1"
    clone.mkdir()
    files = []
    for n, (source, entry) in enumerate(sources):
        name = f"UNLISTED1_{n}_1_16kHz.wav"
        shutil.copy(source / entry["Filename"], clone / name)
        files.append({**entry, "Filename": name})
    files[0]["Prompt"] = {**files[0]["Prompt"], "Transcript": ""}
    files[2]["Prompt"] = {**files[2]["Prompt"], "Transcript": "#dis\n" + files[2]["Prompt"]["Transcript"]}
    files.append({**files[1], "Filename": "UNLISTED1_9_9_16kHz.wav"})  # listed, never recorded
    (clone / "UNLISTED1.json").write_text(json.dumps({**manifest, "Contributor ID": "UNLISTED1",
                                                      "Etiology": UNLISTED_ETIOLOGY, "Files": files}))
    return corpus


def kit_manifest(corpus: Path, split: str) -> dict[str, tuple[str, str]]:
    """What the SAP challenge kit's utils/manifest.py lists for a split, written afresh here: id -> (cleaned
    transcript, etiology) for every Files entry with a Filename and a transcript whose wav is readable."""
    rows = {}
    for manifest in sorted((corpus / split).glob("*/*.json")):
        data = json.loads(manifest.read_text())
        for item in data["Files"]:
            text = (item.get("Prompt") or {}).get("Transcript")
            wav = manifest.parent / Path(item["Filename"]).name
            if text is None or wav.stem in rows:
                continue
            try:
                sf.info(str(wav))
            except (RuntimeError, OSError):
                continue
            text = re.sub(r"^#dis\s*\n", "", str(text).strip(), count=1).replace("\n", "")
            rows[wav.stem] = (text, data.get("Etiology", ""))
    return rows


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_corpus) -> Path:
    """One real run of the whole pipeline (tiny corpus, tiny random Whisper), and one without pretraining at
    the default window ladder that reads a SAP download (tars) of a corpus with clips up to 31 s and Dev
    utterances only the challenge kit scores, every one of them evaluated."""
    from test_sap_download import make_download  # here: that module imports this one's helpers

    workdir = tmp_path_factory.mktemp("workflow")
    long_corpus = add_kit_edge_cases(corpus_with_long_clips(tiny_corpus, workdir / "corpus"))
    # A dataset_root with a space and a `;`: unquoted in a shell command it would split the path and run `touch`.
    download = make_download(long_corpus, workdir / HOSTILE_DIR_NAME)
    plain = {**TEST_RUN, "skip_pretraining": True, "num_experts": 3, "dataset_root": str(download.parent),
             "data": {**TEST_RUN["data"], "eval_samples": None}}
    del plain["encoder_window_s"]
    write_runs(workdir, {"t": TEST_RUN, "plain": plain})
    snakemake(workdir, *CPU_PROFILE, "results/t/eval/metrics.json", "results/plain/eval/metrics.json")
    return workdir


def test_every_shell_value_is_quoted():
    """Every `{...}` in a rule's shell command is quoted (`{x:q}`): a config value never splits into words or
    runs as a command."""
    unquoted = []
    for path in sorted((REPO / "rules").glob("*.smk")):
        in_shell = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() == "shell:":
                in_shell = True
                continue
            if in_shell and not line.lstrip().startswith('"'):
                in_shell = False
            if in_shell:
                unquoted += [f"{path.name}:{n}: {{{m}}}" for m in re.findall(r"\{([^{}]*)\}", line)
                             if not m.endswith(":q")]
    assert not unquoted, unquoted


def test_a_dataset_path_with_a_space_and_a_semicolon_runs_nothing_else(finished_run):
    assert (finished_run / "results" / "plain" / "eval" / "metrics.json").is_file()
    assert not (finished_run / "pwned").exists()


def test_dry_run_quick_lists_every_stage(tmp_path):
    write_runs(tmp_path, {})
    jobs = planned_jobs(snakemake(tmp_path, "-n", "results/quick/eval/metrics.json"))
    for rule in ("demo_corpus", "base_model", "prepare_data", "embeddings", "clustering", "cluster_plot", "gating",
                 "gating_plot", "expert_assignment", "experts_manifest", "asr", "eval"):
        assert jobs.get(rule) == 1, (rule, jobs)


def test_dry_run_full_on_a_sap_tree(tmp_path):
    sap = tmp_path / "sap"
    for split in ("Train", "Dev"):
        (sap / split / "spk").mkdir(parents=True)
    write_runs(tmp_path, {"full": {"dataset_root": str(sap), "base_model": "v2", "data": {"data_percent": 10}}})
    proc = snakemake(tmp_path, "-n", "-p", "results/full/eval/metrics.json")
    jobs = planned_jobs(proc)
    # A real dataset needs no generated corpus; a hub model is snapshotted once, by one job, into a folder
    # that every stage loads, so no stage touches the hub (compute nodes may be offline).
    assert "demo_corpus" not in jobs and jobs.get("base_model") == 1
    assert {"prepare_data", "embeddings", "clustering", "gating", "asr", "eval"} <= set(jobs)
    text = proc.stdout + proc.stderr
    folder = "results/_models/hub/openai--whisper-large-v2"
    assert f"--spec openai/whisper-large-v2 --out {folder} " in text
    # embeddings, expert assignment, asr, eval (the expert jobs are planned after clustering)
    loaded = re.findall(r"--base-model (\S+)", text)
    assert len(loaded) >= 4 and set(loaded) == {folder}, loaded


def test_dry_run_skip_pretraining_drops_pretraining_stages(tmp_path):
    write_runs(tmp_path, {"plain": {**TEST_RUN, "skip_pretraining": True, "num_experts": 3}})
    jobs = planned_jobs(snakemake(tmp_path, "-n", "results/plain/eval/metrics.json"))
    assert set(jobs) == {"demo_corpus", "base_model", "prepare_data", "asr", "training_curves", "eval"}


def test_unknown_run_key_is_a_schema_error_naming_it(tmp_path):
    write_runs(tmp_path, {"bad": {"dataset_root": "synthetic:tiny", "num_expert": 3}})
    proc = snakemake(tmp_path, "-n", "results/bad/eval/metrics.json", check=False)
    assert proc.returncode != 0
    # The first lines a user sees name the run, the misspelt key and the keys that exist.
    head = "\n".join((proc.stdout + proc.stderr).splitlines()[:5])
    assert "runs.bad" in head and "num_expert " in head and "valid keys" in head and "num_experts" in head


def test_end_to_end_outputs(finished_run):
    run = finished_run / "results" / "t"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics["overall"]) >= {"wer", "cer", "n"}
    assert metrics["overall"]["n"] == 6
    assert sum(v["n"] for v in metrics["per_etiology"].values()) == 6
    assert sum(sum(c.values()) for c in metrics["expert_usage"].values()) == 6
    # How a random tiny model splits 6 utterances is not a property to pin; spreading is tested where it must
    # hold (test_asr: a collapsed gate in the real training loop). Here: usage counts are well-formed.
    assert metrics["num_experts"] == 2 and 1 <= metrics["experts_used"] <= 2
    assert metrics["baseline"]["overall"]["n"] == 6 and set(metrics["baseline"]["per_etiology"]) == \
        set(metrics["per_etiology"])
    header = (run / "eval" / "per_utterance.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["id", "speaker", "etiology", "expert", "reference", "hypothesis", "wer"]
    labels = np.load(run / "cluster_labels.npy")
    mapping = json.loads((run / "embeddings" / "mapping.json").read_text())
    assert len(labels) == len(mapping["utterances"]) == 14
    clusters = json.loads((run / "clusters.json").read_text())
    for k in range(clusters["num_clusters"]):
        assert (run / "experts" / f"expert_{k}" / "adapter_model.safetensors").exists()
        assert (run / "asr_best" / f"expert_{k}" / "adapter_config.json").exists()
    for plot in ("cluster_plot.png", "gating_metrics.png", "training_curves.png"):
        assert (run / plot).stat().st_size > 0, plot
    # Per-step curves travel with the trained models: one line per logged optimizer step.
    curve = [json.loads(x) for x in (run / "asr_best" / "metrics.jsonl").read_text().splitlines()]
    assert curve and [e["step"] for e in curve] == sorted({e["step"] for e in curve})
    report = json.loads((run / "data_report.json").read_text())
    assert set(report) == {"Train", "Dev"}
    # Embeddings are stored compactly: one float16 row of d_model values per utterance.
    matrix = np.load(run / "embeddings" / "embeddings.npy")
    assert matrix.dtype == np.float16 and matrix.shape == (14, mapping["dim"])
    for rule in ("embeddings", "clustering", "gating", "asr", "eval"):
        assert (run / "logs" / f"{rule}.log").exists()
        assert (run / "benchmarks" / f"{rule}.tsv").exists()


def test_model_card_carries_the_dev_scores_of_eval(finished_run):
    """asr_best/README.md says what the model is and, once eval has run, its Dev WER and CER per etiology
    (the same numbers as eval/metrics.json); a run without eval would show where they will come from."""
    run = finished_run / "results" / "t"
    card = (run / "asr_best" / "README.md").read_text()
    record = json.loads((run / "asr_best" / "training.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"Base model: `{record['base_model']}`" in card and f"Experts: {record['num_experts']} LoRA" in card
    for name, s in [("all", metrics["overall"]), *metrics["per_etiology"].items()]:
        assert f"| {name} | {100 * s['wer']:.2f} | {100 * s['cer']:.2f} | {s['n']} |" in card
    assert "not yet measured" not in card


def test_validation_speakers_are_not_training_speakers(finished_run):
    data = finished_run / "results" / "t" / "data"
    speakers = {name: {u["speaker"] for u in json.loads((data / f"{name}.json").read_text())}
                for name in ("embedding", "expert", "asr_train", "asr_val")}
    assert speakers["asr_val"]
    for name in ("embedding", "expert", "asr_train"):
        assert not speakers[name] & speakers["asr_val"], name


def test_skip_pretraining_run_trains_from_random_init(finished_run):
    run = finished_run / "results" / "plain"
    assert not (run / "embeddings").exists() and not (run / "gating.safetensors").exists()
    record = json.loads((run / "asr_best" / "training.json").read_text())
    assert record["pretrained"] is False
    assert json.loads((run / "asr_best" / "moe_config.json").read_text())["num_experts"] == 3


def test_no_clip_of_30_s_or_less_is_dropped(finished_run):
    """At the default window ladder every Dev clip up to 30 s is evaluated, each in a window that holds it;
    Train's 12 s clip is kept too. The 31 s Dev clip is decoded in two chunks (the kit scores it)."""
    run = finished_run / "results" / "plain"
    report = json.loads((run / "data_report.json").read_text())
    kept_dev = sum(report["Dev"]["kept"].values())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["overall"]["n"] == kept_dev
    assert metrics["encoder_window_s"] == [5, 10, 20, 30]
    assert report["Dev"]["skipped"]["too_long"]["count"] == 0
    assert report["Dev"]["converted"]["over_30s"]["count"] == metrics["coverage"]["over_30s"] == 1
    assert report["Train"]["skipped"]["too_long"]["count"] == 0
    ids = [row["id"] for row in csv.DictReader((run / "eval" / "per_utterance.tsv").open(), delimiter="\t")]
    assert sum("_9000_" in i for i in ids) == 4  # the 12, 25, 30 and 31 s clips


def test_eval_scores_dev_as_the_challenge_kit_does(finished_run):
    """On an SAP tree eval covers exactly the Dev utterances of the kit's manifest (any length, any etiology,
    empty transcripts too), writes predict.csv in the kit's format, and the kit's rule applied to predict.csv
    gives metrics.json's WER; the synthetic run keeps its own selection."""
    run = finished_run / "results" / "plain"
    corpus = finished_run / "corpus"  # the tree the download was packed from
    kit = kit_manifest(corpus, "Dev")
    with (run / "eval" / "predict.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "raw_hypos"]
    predicted = dict(rows[1:])
    assert sorted(predicted) == sorted(kit) and len(rows) - 1 == len(kit)
    assert any(etiology == UNLISTED_ETIOLOGY for _, etiology in kit.values()) and "" in {t for t, _ in kit.values()}
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    rescored = score_corpus((text, predicted[uid], None) for uid, (text, _) in kit.items())
    assert rescored["overall"] == metrics["overall"]
    assert metrics["coverage"] == {"utterances": len(kit), "split_as_kit": True, "over_30s": 1, "not_decoded": []}
    assert metrics["per_etiology"]["other"]["n"] == 3
    categories = {e["Prompt"].get("Category Description") for p in (corpus / "Dev").glob("*/*.json")
                  for e in json.loads(p.read_text())["Files"]}
    assert set(metrics["per_category"]) <= categories and sum(v["n"] for v in metrics["per_category"].values()) \
        == len(kit)
    report = json.loads((run / "data_report.json").read_text())
    assert report["download"]["speakers"]["Dev"] == len(list((corpus / "Dev").iterdir()))
    assert all("/results/_datasets/" in u["wav"] for u in json.loads((run / "data" / "eval.json").read_text()))
    synthetic = json.loads((finished_run / "results" / "t" / "eval" / "metrics.json").read_text())
    assert synthetic["coverage"]["split_as_kit"] is False and synthetic["overall"]["n"] == 6


def test_joint_training_moves_exactly_the_routed_experts(finished_run):
    """Every expert that received samples in joint training changed; an expert that got none did not."""
    run = finished_run / "results" / "t"
    record = json.loads((run / "asr_best" / "training.json").read_text())
    usage = np.sum([h["train_expert_usage"] for h in record["history"]], axis=0)
    assert usage.sum() == record["n_train"] * len(record["history"])
    # With one routed expert only, an "only expert 0 trains" bug (PEFT's set_adapter) would pass unseen.
    assert (usage > 0).sum() >= 2, usage
    for k, used in enumerate(usage):
        before = load_file(run / "experts" / f"expert_{k}" / "adapter_model.safetensors")
        after = load_file(run / "asr_best" / f"expert_{k}" / "adapter_model.safetensors")
        changed = any(not np.allclose(before[name].numpy(), after[name].numpy()) for name in before)
        assert changed == bool(used), (k, used)


def test_second_invocation_has_nothing_to_do(finished_run):
    proc = snakemake(finished_run, *CPU_PROFILE, "-n", "results/t/eval/metrics.json")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changed_gate_reruns_only_its_dependents(finished_run):
    gate_path = finished_run / "results" / "t" / "gating.safetensors"
    # A bare `touch` is not enough in Snakemake 9: inputs under 1 MB whose checksum is unchanged do not
    # trigger a rerun. Change the gate's content, as retraining it would.
    os.utime(gate_path)
    assert planned_jobs(snakemake(finished_run, *CPU_PROFILE, "-n", "results/t/eval/metrics.json")) == {}
    gate, extra = read_gate_file(gate_path)
    with torch.no_grad():
        next(gate.parameters()).add_(0.01)
    save_gate(gate, gate_path, extra)
    jobs = planned_jobs(snakemake(finished_run, *CPU_PROFILE, "-n", "results/t/eval/metrics.json"))
    clusters = json.loads((finished_run / "results" / "t" / "clusters.json").read_text())["num_clusters"]
    assert jobs == {"expert_assignment": 1, "expert": clusters, "experts_manifest": 1, "asr": 1, "training_curves": 1,
                    "eval": 1}


def test_lint_is_clean_except_justified():
    proc = subprocess.run([str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--lint"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lints = {re.sub(r" in line \d+\.:$", "", line.strip()[2:]) for line in (proc.stdout + proc.stderr).splitlines()
             if line.startswith("    * ")}
    # Justified: rules/common.smk extends PATH and PYTHONPATH (so `python -m workflow_scripts.*` runs
    # with the interpreter and package of this checkout, or the conda env's under --use-conda). They
    # are not configuration read from the environment, so asserting them with `envvars:` would only
    # make runs fail where PYTHONPATH is unset.
    justified = {"Environment variable PATH used but not asserted with envvars directive",
                 "Environment variable PYTHONPATH used but not asserted with envvars directive"}
    # Exactly these: an empty set would mean the lint output changed format, not that the workflow is clean.
    assert lints == justified, lints
    headers = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Lints for")]
    assert headers == [f"Lints for snakefile {REPO / 'rules' / 'common.smk'}:"], headers  # no rule has lints
    assert proc.returncode == 1  # snakemake --lint exits 1 on any lint, these included


@pytest.fixture(scope="module")
def quick_comparison(tmp_path_factory) -> Path:
    """`snakemake results/quick/compare/report.md` on the quick run as configured (real tiny.en, tiny corpus)."""
    workdir = tmp_path_factory.mktemp("quick_compare")
    write_runs(workdir, {})
    snakemake(workdir, *CPU_PROFILE, "results/quick/compare/report.md")
    return workdir / "results" / "quick" / "compare"


def test_quick_comparison_reports_every_variant_from_its_own_files(quick_comparison):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    variants = variants_of(resolve_run(config, "quick"))
    summary = json.loads((quick_comparison / "compare.json").read_text())
    report = (quick_comparison / "report.md").read_text()
    assert set(summary["variants"]) == set(variants)
    rows_at = [report.index(f"| {variant} |") for variant in variants]
    assert rows_at == sorted(rows_at)  # the report lists the variants in their documented order
    assert (quick_comparison / "compare.png").stat().st_size > 0
    for variant in variants:
        tsv = quick_comparison / variant / "per_utterance.tsv"
        # Anyone can rescore a variant with the project's scoring CLI and get the report's numbers.
        proc = subprocess.run([sys.executable, "-m", "workflow_scripts.scoring", str(tsv)], capture_output=True,
                              text=True, check=True, cwd=REPO)
        rescored = json.loads(proc.stdout)
        entry = summary["variants"][variant]
        assert rescored["overall"] == entry["overall"], variant
        assert rescored["per_etiology"] == entry["per_etiology"], variant
        wer, cer = 100 * entry["overall"]["wer"], 100 * entry["overall"]["cer"]
        assert f"| {variant} | {wer:.2f} | {cer:.2f} |" in report


def test_design_card_commands_find_nothing_to_do_after_the_quick_run(quick_comparison):
    """`make quick` runs with the cpu profile; the design card's bare commands must agree with it."""
    workdir = quick_comparison.parent.parent.parent
    proc = snakemake(workdir, "-n", "results/quick/asr_best")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_quick_comparison_controls_are_matched(quick_comparison):
    summary = json.loads((quick_comparison / "compare.json").read_text())["variants"]
    moe = summary["moe"]
    # One LoRA with the parameters of all the experts together (the gate aside) ...
    assert summary["lora_same_params"]["trainable_params"]["lora"] == moe["trainable_params"]["lora"]
    assert summary["lora_same_params"]["trainable_params"]["gate"] == 0
    assert summary["lora_same_rank"]["trainable_params"]["lora"] * moe["num_experts"] == moe["trainable_params"]["lora"]
    # ... and trained for as many utterance passes as expert pretraining and joint training together.
    assert moe["utterance_passes"] > summary["lora_same_params"]["utterance_passes"]
    assert summary["lora_same_steps"]["utterance_passes"] == moe["utterance_passes"]
    # The stock model at its native 30 s window only, not the run's ladder (10 s, and 30 s for longer clips).
    assert summary["zero_shot"]["encoder_window_s"] == [30] and moe["encoder_window_s"] == [10, 30]


def test_eval_speaker_routing_equals_decoding_every_utterance_again(quick_comparison):
    """eval re-decodes only the utterances whose expert changes under per-speaker routing; the result must
    equal the comparison's variant that decodes every utterance with those routes."""
    in_eval = json.loads((quick_comparison / "moe" / "metrics.json").read_text())["speaker_routing"]
    full = json.loads((quick_comparison / "compare.json").read_text())["variants"]["moe_speaker_routing"]
    assert in_eval["overall"] == full["overall"] and in_eval["per_etiology"] == full["per_etiology"]
    assert in_eval["expert_usage"] == full["expert_usage"]


def test_quick_comparison_random_routing_keeps_each_speaker_on_one_expert(quick_comparison):
    rows = list(csv.DictReader((quick_comparison / "moe_random_routing" / "per_utterance.tsv").open(),
                               delimiter="\t"))
    experts_of: dict[str, set[str]] = {}
    for row in rows:
        experts_of.setdefault(row["speaker"], set()).add(row["expert"])
    assert all(len(e) == 1 for e in experts_of.values())
    assert len({e for es in experts_of.values() for e in es}) == 2  # both experts serve speakers


def test_oracle_variant_routes_by_the_etiology_label(tmp_path):
    etiologies = ["ALS", "Stroke"]
    write_runs(tmp_path, {"oracle": {**TEST_RUN, "etiologies": etiologies, "skip_pretraining": True}})
    snakemake(tmp_path, *CPU_PROFILE, "results/oracle/compare/moe_oracle_etiology/metrics.json")
    rows = list(csv.DictReader((tmp_path / "results/oracle/compare/moe_oracle_etiology/per_utterance.tsv").open(),
                               delimiter="\t"))
    assert {row["etiology"] for row in rows} == set(etiologies)
    assert all(int(row["expert"]) == etiologies.index(row["etiology"]) for row in rows)


def test_html_report_shows_plots_and_scores_in_a_browser(finished_run, tmp_path):
    """`snakemake --report` gives one page; opened in headless Chromium, its results list holds the plots
    and tables, and the eval table shows the WER per etiology."""
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium")
    assert chromium, "the report test needs Debian's chromium: apt-get install chromium (.ci/run does)"
    report = tmp_path / "report.html"
    snakemake(finished_run, *CPU_PROFILE, "--report", str(report), "results/t/eval/metrics.json")
    metrics = json.loads((finished_run / "results" / "t" / "eval" / "metrics.json").read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(report.as_uri())

        def view(category: str, name: str) -> None:
            page.get_by_text("Results").first.click()
            page.get_by_text(category).first.click()
            page.locator("tr", has_text=name).first.locator("a[iconname=eye]").click()
            page.wait_for_timeout(300)

        for category, plot in (("2. Clustering", "cluster_plot.png"), ("3. Gating", "gating_metrics.png"),
                               ("4. Training", "training_curves.png")):
            view(category, plot)
            sizes = page.locator("img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
            assert max(sizes) >= 400, (plot, sizes)  # the plot itself is drawn, not only the logo
        view("1. Data", "data_report.html")
        data = next(f for f in page.frames if f != page.main_frame).inner_text("body")
        assert "Dev: kept utterances" in data and "too_long" not in data  # nothing skipped in the tiny corpus
        view("5. Evaluation", "scores.html")
        scores = next(f for f in page.frames if f != page.main_frame).inner_text("body")
        assert "Eval WER and CER" in scores and f"{100 * metrics['overall']['wer']:.2f}" in scores
        assert all(eti in scores for eti in metrics["per_etiology"])
        page.screenshot(path=str(tmp_path / "report.png"))
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
