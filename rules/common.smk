# Config loading and validation, run settings, path helpers. Rules pull every value through the
# small functions here, so rule bodies hold no logic.
import functools
import json
import os
import sys

from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)

from workflow_scripts.model_specs import HUB_FOLDER, resolve_base_model, spec_of_folder  # noqa: E402
from workflow_scripts.variants import TRAINED as COMPARE_TRAINED, VARIANTS as COMPARE_VARIANTS, variants_of  # noqa: E402
from workflow_scripts.settings import check_runs, resolve_run, stage_settings  # noqa: E402
from workflow_scripts.sap_data import DataError  # noqa: E402
from workflow_scripts.sap_download import DOWNLOAD, download_name, locate  # noqa: E402


# No defaults filled in here: resolve_run applies them beneath the profile's hardware file, which
# explicit defaults inside each run entry would otherwise override.
check_runs(config)
validate(config, "../config/schema.yaml", set_default=False)

# Stages run as `python -m workflow_scripts.<stage>`: `python` is the interpreter that runs Snakemake
# (the project venv) unless --use-conda activates envs/moe_whisper.yaml, and the package is found
# from any working directory.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ["PYTHONPATH"] = workflow.basedir + os.pathsep + os.environ.get("PYTHONPATH", "")
# Jobs never reach the Hugging Face hub: compute nodes are often offline, and parallel jobs would race on one
# cache. The base_model job (a local rule) snapshots a hub model once and every job loads that folder. That
# job alone runs with the user's own setting, kept in USER_<name>; setdefault because a job that reads this
# file again (cluster executors) inherits the override and must not take it for the user's value.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(f"USER_{_name}", os.environ.get(_name, ""))
    os.environ[_name] = "1"
CONDA_ENV = "../envs/moe_whisper.yaml"
MODELS_DIR = "results/_models"
CORPORA_DIR = "results/_corpora"
# Unpacked copies of SAP downloads, one per download (not per run): results/_datasets/<name>/dataset.
DATASETS_DIR = "results/_datasets"
# Generated corpora do not depend on a run's seed, so runs with different seeds share them.
CORPUS_SEED = 0


@functools.cache
def run_settings(run):
    return resolve_run(config, run)


def settings_json(run, *sections):
    """The settings one stage reads, as JSON for its --settings flag (and Snakemake's params trigger)."""
    return json.dumps(stage_settings(run_settings(run), *sections), sort_keys=True)


def loader_workers(run):
    """training.num_workers, for the stages that decode audio without training. Given as a resource, not a
    param: the worker count changes speed only, and a changed param reruns the stage and all after it."""
    return run_settings(run)["training"]["num_workers"]


def training_gpus(run):
    return run_settings(run)["training"]["gpus"]


def asr_launcher(run):
    """`python -m`, or torchrun with one process per GPU when training.gpus > 1 (torchrun needs `shell:`).
    A list, so the rule quotes each word."""
    gpus = training_gpus(run)
    return ["python", "-m"] if gpus == 1 else ["torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m"]


@functools.cache
def dataset_layout(root):
    """sap_download.locate: a few directory reads, no tar opened, as this runs at every Snakemake start.
    None for a root that is not there (yet): Snakemake then names it as a missing input."""
    return locate(root) if os.path.isdir(root) else None


def dataset_path(run):
    """What the data stage reads: the generated corpus, the unpacked copy of a download (unpack_download
    job), or the folder holding the split folders (the root, or the kit's processed/ or raw/ under it)."""
    root = run_settings(run)["dataset_root"]
    if root.startswith("synthetic:"):
        return f"{CORPORA_DIR}/{root.split(':', 1)[1]}"
    layout = dataset_layout(root)
    if layout is None:
        return root
    if layout.kind == DOWNLOAD:
        return f"{DATASETS_DIR}/{download_name(layout.path)}/dataset"
    return str(layout.path)


def unpack_report_flags(run):
    """`--unpack-report FILE` when the run reads a download, so data_report.json carries the unpack counts."""
    path = dataset_path(run)
    if not path.startswith(f"{DATASETS_DIR}/"):
        return []
    return ["--unpack-report", f"{os.path.dirname(path)}/unpack_report.json"]


def download_of(name):
    """The download that results/_datasets/<name>/ unpacks, found among the runs' dataset roots."""
    for run in config.get("runs") or {}:
        root = run_settings(run)["dataset_root"]
        try:
            layout = None if root.startswith("synthetic:") else dataset_layout(root)
        except DataError:
            continue  # another run's problem, reported when that run is built
        if layout is not None and layout.kind == DOWNLOAD and download_name(layout.path) == name:
            return str(layout.path)
    raise ValueError(f"{DATASETS_DIR}/{name} unpacks no run's dataset_root; ask for results/<run>/... instead")


def base_model_path(run):
    """The folder every job loads the base model from: the base_model job's (bundled, tiny-random, hub ids)
    or the user's own local folder."""
    return resolve_base_model(run_settings(run)["base_model"], MODELS_DIR)


def base_model_input(run):
    path = base_model_path(run)
    return [path] if path.startswith(f"{MODELS_DIR}/") else []


def skip_pretraining(run):
    return run_settings(run)["skip_pretraining"]


def num_clusters(wildcards):
    """Experts follow the clustering result, known only once the clustering checkpoint has run."""
    summary = checkpoints.clustering.get(run=wildcards.run).output.summary
    with open(summary) as f:
        return json.load(f)["num_clusters"]


def expert_dirs(wildcards):
    return [f"results/{wildcards.run}/experts/expert_{i}" for i in range(num_clusters(wildcards))]


def pretraining_inputs(wildcards):
    """What joint training starts from: pretrained gate + experts, or nothing (random init)."""
    if skip_pretraining(wildcards.run):
        return {}
    run = wildcards.run
    return {
        "gating": f"results/{run}/gating.safetensors",
        "experts": f"results/{run}/experts/manifest.json",
        "assignment": f"results/{run}/experts/assignment.json",
        "embeddings": f"results/{run}/embeddings/mapping.json",
    }


def plot_targets(run):
    if not run_settings(run)["plot"]:
        return []
    if skip_pretraining(run):
        return [f"results/{run}/training_curves.png"]
    return [f"results/{run}/cluster_plot.png", f"results/{run}/gating_metrics.png", f"results/{run}/training_curves.png"]


def final_targets(wildcards):
    """`snakemake` with no target: the quick run's report."""
    return ["results/quick/eval/metrics.json"]


def cli_flags(input, names):
    """`--name path` for each named input the job has, as a list: `{params.x:q}` quotes each word."""
    return [word for name in names if name in input.keys() for word in (f"--{name}", input[name])]


def pretrained_flags(wildcards, input):
    """CLI flags for the pretrained gate/experts, empty when the run skips pretraining."""
    return cli_flags(input, ("gating", "experts", "assignment", "embeddings"))


def compare_variants(run):
    return variants_of(run_settings(run))


def compare_train_inputs(wildcards):
    """What a control trains from beyond the run's samples: the mixture's K, its pretrained experts
    (random routing), its utterance passes (same steps)."""
    run, variant = wildcards.run, wildcards.variant
    inputs = {}
    if not skip_pretraining(run) and variant in ("lora_same_params", "lora_same_steps", "moe_random_routing"):
        inputs["clusters"] = f"results/{run}/clusters.json"
    if not skip_pretraining(run) and variant == "moe_random_routing":
        inputs["gating"] = f"results/{run}/gating.safetensors"
        inputs["experts"] = f"results/{run}/experts/manifest.json"
    if variant == "lora_same_steps":
        inputs["mixture"] = f"results/{run}/asr_best"
    return inputs


def compare_train_flags(wildcards, input):
    return cli_flags(input, ("clusters", "gating", "experts", "mixture"))


def compare_eval_inputs(wildcards):
    run, variant = wildcards.run, wildcards.variant
    if variant == "zero_shot":
        return {}
    if variant in ("moe", "moe_speaker_routing"):
        return {"model": f"results/{run}/asr_best"}
    return {"model": f"results/{run}/compare/{variant}/model"}
