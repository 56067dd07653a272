import csv
import json
import subprocess
import sys

import pytest

from workflow_scripts.sap_text import normalize, normalize_hypothesis, training_text
from workflow_scripts.scoring import score_corpus, score_utterance


def test_markup_gives_two_references():
    raw = "Please (p-) put [laughter] the {g: blue} cup on ~A shelf."
    assert normalize(raw, keep_disfluencies=True) == "please p put the blue cup on a shelf"
    assert normalize(raw, keep_disfluencies=False) == "please put the blue cup on a shelf"
    assert score_utterance(raw, "please p put the blue cup on a shelf")["wer"] == 0.0
    assert score_utterance(raw, "please put the blue cup on a shelf")["wer"] == 0.0


# The SAP challenge kit (github.com/xiuwenz2/SAPC-template) normalises with EnglishTextNormalizer.norm in
# utils/normalizer/text_normalizer_hf.py (refs: utils/normalize_ref.py, apply_markup=True, remove_parentheses
# False for ref1 / True for ref2; hyps: utils/normalize_hyp.py, apply_markup=False), aligns with sclite and
# applies the UNK rules of utils/compute_metrics.py (parse_sgml_csdi). Each test below is one utterance kind
# that the old scoring got wrong; the expected values follow those kit steps by hand.


def test_abbreviations_with_periods_are_one_word():
    # norm -> _merge_uppercase_abbreviations, rule 3 (letters joined by dots) turns D.C. into DC and a.m. into
    # am, and rule 1 (single capitals separated by spaces) turns the hypothesis' "D C" into DC, before lower().
    raw = "He plays for D.C. United at 7 a.m."
    assert normalize(raw, keep_disfluencies=False) == "he plays for dc united at 7 am"
    result = score_utterance(raw, "He plays for D C United at 7 AM")
    assert result["hyp"] == "he plays for dc united at 7 am"
    assert (result["word_errors"], result["words"]) == (0, 8)


def test_caregiver_speech_is_in_both_references():
    # norm(remove_parentheses=True) keeps labelled parenthesised text (the label, everything before the last
    # colon, is removed) and drops unlabelled text such as the partial word (th-); ref1 keeps both. So the kit
    # requires audible caregiver speech in every reference: leaving it out costs 3 deletions in 7 words.
    raw = "(CS: What is it?) (th-) It is a cup."
    assert normalize(raw, keep_disfluencies=True) == "what is it th it is a cup"
    assert normalize(raw, keep_disfluencies=False) == "what is it it is a cup"
    left_out = score_utterance(raw, "It is a cup.")
    assert (left_out["word_errors"], left_out["words"]) == (3, 7)
    assert score_utterance(raw, "What is it? It is a cup.")["wer"] == 0.0


def test_unintelligible_word_counts_follow_sclite_alignment():
    # {w: 2} -> "UNK UNK" (norm's {...} branch; sclite lower-cases it to unk). sclite aligns with costs
    # correct 0 / substitution 4 / insertion, deletion 3 and, on a tie, prefers the diagonal step, then the
    # deletion (SCTK net_dp.c). Against "a dog barked" that substitutes a for "the" and deletes both unk, which
    # parse_sgml_csdi drops: ref "the dog barked", 1 error in 3 words (a unit-cost alignment that put a on
    # the first unk would give "a the dog barked", 1 error in 4).
    result = score_utterance("{w: 2} the dog barked", "a dog barked")
    assert result["ref1"] == "unk unk the dog barked"
    assert (result["word_errors"], result["words"]) == (1, 3)
    # The costs matter too: against "please go", sclite deletes the unk of "{w: 1} please" and inserts go
    # (3 + 3 < 4 + 4), so the ref becomes "please": 1 error in 1 word. Unit costs tie there, and two
    # substitutions would make the ref "please please": 1 error in 2 words.
    costs = score_utterance("{w: 1} please", "please go")
    assert (costs["word_errors"], costs["words"]) == (1, 1)
    # A {w: } without a number gives no unk at all, so an extra hypothesis word is an insertion.
    no_count = score_utterance("I {w: } want it", "I really want it")
    assert no_count["ref1"] == "i want it"
    assert (no_count["word_errors"], no_count["words"]) == (1, 3)


def test_spelled_letters_are_one_word():
    # _merge_uppercase_abbreviations rule 5 joins a run of ~letters (~B ~N ~C -> BNC); a lone ~Q and the word
    # ~TV only lose the tilde (a symbol, removed by remove_symbols_and_diacritics).
    raw = "Spell ~B ~N ~C, then press ~Q on the ~TV"
    assert normalize(raw, keep_disfluencies=True) == "spell bnc then press q on the tv"
    result = score_utterance(raw, "spell B N C then press Q on the TV")
    assert (result["word_errors"], result["words"]) == (0, 8)


def test_contractions_and_apostrophes_as_in_the_kit():
    # expand_common_is_contractions runs before the replacers, on a fixed list: let's -> "let is", it's ->
    # "it is", possessives stay; the replacers expand can't -> "can not" but, unlike Whisper's, have no
    # kinda -> "kind of"; remove_symbols_and_diacritics keeps apostrophes (mom's, o'clock).
    raw = "Let's see, I can't find Mom's keys at 5 o'clock, it's kinda late"
    expected = "let is see i can not find mom's keys at 5 o'clock it is kinda late"
    assert normalize(raw, keep_disfluencies=True) == expected
    result = score_utterance(raw, "let us see I cannot find moms keys at five o'clock it is kind of late")
    assert result["hyp"] == "let us see i cannot find moms keys at 5 o'clock it is kind of late"
    # us, cannot (for can not: 1 substitution, 1 deletion), moms, kind (for kinda) and the inserted of
    assert (result["word_errors"], result["words"]) == (6, 16)


def test_hyphenated_stutters_as_in_the_kit():
    # _merge_uppercase_abbreviations rule 4 joins letters separated by hyphens (I-I -> II, w-w(-with) -> ww),
    # rule 2 joins single lower-case letters separated by spaces (a r(-rainy) -> ar); a single stutter letter
    # joined to its word (r-rainy) stays a word of its own once the hyphen is removed.
    assert normalize("It was r-rainy", keep_disfluencies=True) == "it was r rainy"
    raw = "I-I went out w-w-with a r-rainy coat"
    assert normalize(raw, keep_disfluencies=True) == "ii went out ww with ar rainy coat"
    result = score_utterance(raw, "I went out with a rainy coat")
    assert (result["word_errors"], result["words"]) == (3, 8)  # ii -> i, ww deleted, ar -> a


def test_partial_word_inside_a_word_closes_up_in_ref2():
    # norm(remove_parentheses=True) replaces unlabelled parenthesised text by nothing, not by a space, so the
    # two halves of succ(ess-)essful join again; ref1 keeps the parts as separate words.
    raw = "It was succ(ess-)essful"
    assert normalize(raw, keep_disfluencies=True) == "it was succ ess essful"
    assert normalize(raw, keep_disfluencies=False) == "it was successful"
    result = score_utterance(raw, "it was successful")
    assert (result["word_errors"], result["words"]) == (0, 3)


def test_other_kit_changes_to_whispers_rules():
    # The kit's EnglishNumberNormalizer.postprocess writes a bare 1 as "one" only outside decimals.
    assert normalize_hypothesis("It costs $1.50, or 2.1 each") == "it costs $1.50 or 2.1 each"
    # apply_markup=False: brackets in a hypothesis are only punctuation, their words stay.
    assert normalize_hypothesis("[Music] hello (laughs)") == "music hello laughs"
    # _disambiguate_st: St. is saint before a capitalised word, else street.
    assert normalize("Main St. near St. Louis", keep_disfluencies=True) == "main street near saint louis"


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
