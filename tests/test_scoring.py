import csv
import json
import subprocess
import sys

import pytest

from workflow_scripts.scoring import normalize, score_corpus, score_utterance, training_text


def test_markup_gives_two_references():
    raw = "Please (p-) put [laughter] the {g: blue} cup (cs: over there) on ~A shelf."
    # Caregiver speech counts like other parenthesised content (SAP challenge kit): ref1 only.
    assert normalize(raw, keep_disfluencies=True) == "please p put the blue cup over there on a shelf"
    assert normalize(raw, keep_disfluencies=False) == "please put the blue cup on a shelf"
    assert score_utterance(raw, "please put the blue cup over there on a shelf")["wer"] == pytest.approx(1 / 11)
    assert score_utterance(raw, "please put the blue cup on a shelf")["wer"] == 0.0


def test_unintelligible_markup_survives_normaliser_as_unk():
    raw = "Turn {u: mumbled} lights on {w: 2} [PII] now."
    assert normalize(raw, keep_disfluencies=True) == "turn unk lights on unk unk now"


def test_numbers_spellings_and_fillers_are_normalised():
    result = score_utterance(
        "(um) I paid twenty five dollars for the colour Dr. Lee chose",
        "I paid $25 for the color, doctor Lee chose.",
    )
    assert result["wer"] == 0.0
    assert result["cer"] == 0.0


def test_lower_wer_reference_is_chosen():
    raw = "I want (the) the green box"
    with_repeat = score_utterance(raw, "i want the the green box")
    assert (with_repeat["word_errors"], with_repeat["words"]) == (0, 6)  # ref1 fits
    without_repeat = score_utterance(raw, "I want the green box")
    assert (without_repeat["word_errors"], without_repeat["words"]) == (0, 5)  # ref2 fits
    one_error = score_utterance(raw, "I want a green box")
    assert one_error["wer"] == pytest.approx(1 / 5)  # ref2: 1/5 beats ref1: 2/6


def test_edits_clipped_at_reference_length_and_tie_averages():
    clipped = score_utterance("yes", "no no no no")
    assert (clipped["word_errors"], clipped["words"], clipped["wer"]) == (1, 1, 1.0)
    # ref1 "red green blue car" (4 edits, clipped to 4) and ref2 "red car" (2 edits): both WER 1.0
    tie = score_utterance("red (green blue) car", "boat")
    assert (tie["word_errors"], tie["words"]) == (3.0, 3.0)


def test_unk_matches_any_word_and_costs_nothing_when_deleted():
    assert score_utterance("turn {w: 2} on", "turn the lamp on")["wer"] == 0.0
    dropped = score_utterance("turn {u: xx} the lamp on", "turn the lamp on")
    assert (dropped["word_errors"], dropped["words"]) == (0, 4)
    wrong = score_utterance("turn {u: xx} the lamp on", "turn it the lump on")
    assert (wrong["word_errors"], wrong["words"]) == (1, 5)


def test_empty_reference_counts_hypothesis_words_without_length():
    silent = score_utterance("[PII] (uh)", "")
    assert (silent["word_errors"], silent["words"], silent["wer"]) == (0, 0, 0.0)
    spoken = score_utterance("[PII] (uh)", "hello there")
    assert (spoken["word_errors"], spoken["words"], spoken["wer"]) == (2, 0, 1.0)
    corpus = score_corpus([("[PII]", "hello there", None), ("good morning", "good morning", None)])
    assert corpus["overall"]["wer"] == pytest.approx(2 / 2)


def test_corpus_sums_errors_per_etiology():
    rows = [
        ("we walked to the park", "we walked to the park", "ALS"),
        ("Yes.", "no", "ALS"),
        ("open the door", "open a door", "Stroke"),
        ("close it", "close it", None),
    ]
    result = score_corpus(rows)
    assert result["overall"]["n"] == 4
    assert result["overall"]["wer"] == pytest.approx(2 / 11)
    assert result["per_etiology"]["ALS"]["wer"] == pytest.approx(1 / 6)  # not the mean of 0 and 1
    assert result["per_etiology"]["ALS"]["n"] == 2
    assert result["per_etiology"]["Stroke"]["cer"] == pytest.approx(3 / 13)
    assert set(result["per_etiology"]) == {"ALS", "Stroke"}


def test_training_text_strips_markup_but_keeps_case_and_punctuation():
    raw = "(Uh) Call {g: Mom} [PII], (ss: hi there) spell ~B {u: xx} {w: 3} now (c-) can!"
    assert training_text(raw) == "Uh Call Mom, spell B now c- can!"


def _write_tsv(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def test_cli_scores_tsv(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    _write_tsv(
        pairs,
        ["id", "reference", "hypothesis", "etiology"],
        [
            ["a", 'She said "fine" (um) twice', "she said fine twice", "Down Syndrome"],
            ["b", "Play the {g: radio}", "play radio", "Parkinson's Disease"],
        ],
    )
    proc = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.scoring", str(pairs)],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(proc.stdout)
    assert out["overall"] == {"wer": pytest.approx(1 / 7), "cer": pytest.approx(4 / 33), "n": 2}
    assert out["per_etiology"]["Down Syndrome"]["wer"] == 0.0
    assert out["per_etiology"]["Parkinson's Disease"]["wer"] == pytest.approx(1 / 3)


def test_cli_names_file_and_missing_column(tmp_path):
    pairs = tmp_path / "bad.tsv"
    _write_tsv(pairs, ["reference", "hyp"], [["hello", "hello"]])
    proc = subprocess.run(
        [sys.executable, "-m", "workflow_scripts.scoring", str(pairs)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert str(pairs) in proc.stderr and "hypothesis" in proc.stderr
