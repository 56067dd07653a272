"""WER/CER by the Speech Accessibility Project (SAP) challenge rule, plus SAP markup handling.

The rule is the one of the challenge's public evaluation kit (GitHub ``xiuwenz2/SAPC-template``): its text
normaliser (``utils/normalizer/text_normalizer_hf.py``, ``EnglishTextNormalizer.norm``, run by
``utils/normalize_ref.py`` / ``utils/normalize_hyp.py``), sclite word alignment (``utils/evaluate.py``), the UNK
rules of ``utils/compute_metrics.py`` and the two-reference rates of ``utils/metrics/wer.py`` / ``cer.py``.

Normalisation, the same for references and hypotheses except for the markup step, in this order:

* Runs of single letters become one word, on the raw text: spelled letters ``~B ~N ~C`` -> ``bnc``,
  ``T V`` -> ``tv``, ``D.C.`` / ``a.m.`` -> ``dc`` / ``am``, hyphenated letters ``w-w-with`` -> ``ww with``, and
  any one-letter word next to another of the same case (``a r-rainy`` -> ``ar rainy``, ``I I`` -> ``ii``). A
  lone spelled letter (``~Q``) or a tilde before a word (``~TV``) only loses the tilde; a one-letter stutter
  joined to its word (``r-rainy``) stays two words (``r rainy``).
* ``St.`` becomes ``saint`` before a capitalised word and ``street`` otherwise; then the text is lower-cased and
  the ``'s`` of a fixed list (it's, that's, let's, he's ...) becomes ``is`` (so ``let's`` -> ``let is``); other
  ``'s`` (possessives) stay.
* References only, SAP markup: ``[...]`` is dropped, and so is the text before a stray ``]``. ``{u: ...}`` ->
  one ``unk``, ``{w: N}`` -> N ``unk`` (nothing when it holds no number), ``{g: word}`` / ``{word}`` -> word.
  Parenthesised text gives two references: ref1 keeps all of it; ref2 drops unlabelled text (``(uh)``,
  ``(c-)``) without leaving a space, so ``succ(ess-)essful`` -> ``successful``, but keeps labelled text, so
  caregiver or other-speaker speech ``(cs: ...)`` / ``(ss: ...)`` is in both references, label removed.
  A label is everything before the last colon inside the brackets.
* Whisper's English rules, as the kit changed them: fillers (uh, um, hmm, mm, mhm, mmm) removed; contractions
  expanded (``can't`` -> ``can not``, ``won't`` -> ``will not``, ``n't``, ``'re``, ``'ll``, ``'ve``, ``'m``,
  ``'d``, ``'em``), but not kinda / sorta / dunno / cause / st nor a general ``'s`` -> is; apostrophes inside
  words are kept (``mom's``, ``o'clock``); numbers written in digits (a 1 next to a decimal point stays a
  digit); British spellings made American. Hypotheses are then cut to 512 words of at most 64 characters.

Scoring:

* Each reference is aligned with the hypothesis as sclite aligns them (correct 0, substitution 4, insertion or
  deletion 3; on a tie the diagonal step, then a deletion, then an insertion). A reference ``unk`` substituted
  by a hypothesis word counts as that word (correct), a deleted reference ``unk`` is dropped (no error, no
  length), and an inserted hypothesis ``unk`` is dropped. Word and character edit distances are then taken
  on the rewritten words (characters of the words joined by single spaces).
* Per utterance and per reference, edits are clipped at the reference length; the reference with the
  lower error rate is used, a tie averages both references' edits and lengths. WER and CER each make
  this choice on their own (the kit does the same), so the CER reference may differ from the WER one.
* Corpus rate = sum of chosen edits / sum of chosen reference lengths.
* An empty (normalised) reference has length 0: its hypothesis words all count as errors (insertions,
  not clipped) and add nothing to the denominator, as in the kit. Where a rate has a zero denominator,
  it is reported as 0.0 with no errors and 1.0 otherwise, so JSON never holds inf/NaN.

Known differences from the kit: the British-to-American table is Whisper's ``english.json``, of which the kit
ships a copy that differs in a few entries (only the kit maps e.g. ``cancellation``); a ``{w: ...}`` holding
two numbers makes the kit stop with an error, here the first number counts.

Training targets (:func:`training_text`) are not scored text: they leave out caregiver speech, so that the
model learns the participant's words.

CLI: ``python -m workflow_scripts.scoring PAIRS.tsv`` prints
``{"overall": {"wer", "cer", "n"}, "per_etiology": {...}}`` for a tab-separated file with header columns
``reference`` (raw SAP transcript), ``hypothesis`` and optional ``etiology``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import jiwer
from whisper_normalizer.basic import remove_symbols_and_diacritics
from whisper_normalizer.english import EnglishNumberNormalizer, EnglishTextNormalizer

UNK = "unk"
# The kit truncates hypotheses like this so that a looping decoder output cannot blow up alignment time.
MAX_HYP_WORDS = 512
MAX_HYP_TOKEN_CHARS = 64

# --- The kit's normaliser -------------------------------------------------------------------------------

# Runs of single letters merged into one word, tried in this order on the raw (still cased) text.
_LETTER_RUNS = (
    re.compile(r"(?<!')\b[A-Z]\b(?:\s+\b[A-Z]\b)+"),  # T V
    re.compile(r"(?<!')\b[a-z]\b(?:\s+\b[a-z]\b)+"),  # a r(-rainy)
    re.compile(r"\b[A-Za-z]\.[A-Za-z](?:\.[A-Za-z])*\b"),  # D.C(.)
    re.compile(r"\b[A-Za-z]-[A-Za-z](?:-[A-Za-z])*\b"),  # w-w(-with)
    re.compile(r"~[A-Za-z](?:\s+~[A-Za-z])+"),  # ~B ~N ~C
)
_NOT_A_LETTER = re.compile(r"[^A-Za-z]")
_ST_ABBREVIATION = re.compile(r"\bSt\.(\s*\S*)")
_CAPITALISED = re.compile(r"[A-Z]")
_APOSTROPHE_S = re.compile(r"\b(\w+)'s\b", re.IGNORECASE)
# The kit's list of 's contractions read as "is" (coffee's included).
_S_MEANS_IS = frozenset(
    {"it's", "what's", "where's", "when's", "why's", "how's", "who's", "that's", "there's", "here's", "she's",
     "he's", "let's", "coffee's"}
)
_SQUARE = re.compile(r"\[.*?\]")
_UP_TO_STRAY_CLOSE = re.compile(r".*?\]")
_CURLY = re.compile(r"\{(.*?)\}")
_ROUND = re.compile(r"\((.*?)\)")
_DIGITS = re.compile(r"\d+")
_QUOTE_MARK = re.compile(r"(?<!\w)'|'(?!\w)")
# Whisper's contraction/title table, less the rules the kit dropped ("'s" -> "is" is the fixed list above)
# and plus the two it added.
_RULES_NOT_IN_KIT = frozenset({r"\bkinda\b", r"\bsorta\b", r"\bdunno\b", r"\bcause\b", r"\bst\b", r"'s\b"})
_KIT_ONLY_RULES = {r"'em\b": " them", r"\.{2,}": " "}


class _KitNumberNormalizer(EnglishNumberNormalizer):
    """Whisper's number normaliser, except that a 1 next to a decimal point stays a digit, as in the kit
    (Whisper writes ``1.5`` as ``one.5`` and ``2.1`` as ``2 one``)."""

    def postprocess(self, s: str) -> str:
        # "_" cannot occur here (symbols are gone by now), so it can stand in for the 1s to keep.
        shielded = re.sub(r"(?<=\.)1|1(?=s?\.)", "_", s)
        return super().postprocess(shielded).replace("_", "1")


@lru_cache(maxsize=1)
def _whisper() -> EnglishTextNormalizer:
    # Loads Whisper's english.json spelling map shipped inside whisper_normalizer (no network).
    return EnglishTextNormalizer()


@lru_cache(maxsize=1)
def _numbers() -> _KitNumberNormalizer:
    return _KitNumberNormalizer()


@lru_cache(maxsize=1)
def _contraction_rules() -> tuple[tuple[re.Pattern[str], str], ...]:
    table = {p: r for p, r in _whisper().replacers.items() if p not in _RULES_NOT_IN_KIT} | _KIT_ONLY_RULES
    return tuple((re.compile(p), r) for p, r in table.items())


def _merge_letter_runs(text: str) -> str:
    for run in _LETTER_RUNS:
        text = run.sub(lambda m: _NOT_A_LETTER.sub("", m.group()), text)
    return text


def _saint_or_street(m: re.Match[str]) -> str:
    following = m.group(1).lstrip()
    return ("saint " if _CAPITALISED.match(following) else "street ") + following


def _expand_is(m: re.Match[str]) -> str:
    return f"{m.group(1)} is" if m.group().lower() in _S_MEANS_IS else m.group()


def _label_and_words(content: str) -> tuple[str, str] | None:
    """``label: words`` -> (label, words); the label is everything before the last colon. None if unlabelled."""
    label, colon, words = content.rpartition(":")
    return (label, words) if colon and label else None


def _curly(m: re.Match[str]) -> str:
    """``{u: ...}`` -> UNK, ``{w: N}`` -> N UNKs (none without a number), other ``{label: words}`` -> words."""
    content = m.group(1)
    labelled = _label_and_words(content)
    label = labelled[0] if labelled else None
    if label == "w":
        counts = _DIGITS.findall(content)
        return f" {' '.join(['UNK'] * int(counts[0]))} " if counts else " "
    if label == "u" or content == " ":
        return " UNK "
    return f" {labelled[1] if labelled else content} "


def _markup(text: str, keep_parenthesised: bool) -> str:
    """Resolve SAP markup in lower-cased text (ref1 with ``keep_parenthesised``, ref2 without)."""
    text = _UP_TO_STRAY_CLOSE.sub(" ", _SQUARE.sub(" ", text))
    text = _CURLY.sub(_curly, text)

    def parenthesised(m: re.Match[str]) -> str:
        labelled = _label_and_words(m.group(1))
        if labelled:
            return f" {labelled[1]} " if keep_parenthesised else f" {labelled[1]}"
        return f" {m.group(1)} " if keep_parenthesised else ""

    return _ROUND.sub(parenthesised, text)


def _normalise(text: str, markup: bool, keep_parenthesised: bool = True) -> str:
    """The kit's normaliser: SAP markup resolved when ``markup`` (references), then the shared rules."""
    text = _merge_letter_runs(text)
    text = _ST_ABBREVIATION.sub(_saint_or_street, text).lower()
    text = _APOSTROPHE_S.sub(_expand_is, text)
    if markup:
        text = _markup(text, keep_parenthesised)
    text = re.sub(_whisper().ignore_patterns, "", text)
    text = _QUOTE_MARK.sub(" ", text.replace('"', " "))
    for pattern, replacement in _contraction_rules():
        text = pattern.sub(replacement, text)
    text = re.sub(r"(\d),(\d)", r"\1\2", text)
    text = re.sub(r"\.(?!\d)", " ", re.sub(r"\.+", ".", text))
    text = remove_symbols_and_diacritics(text, keep=".'%$¢€£")
    text = _whisper().standardize_spellings(_numbers()(text))
    text = re.sub(r"\.(?!\d)", " ", text)
    text = re.sub(r"[.$¢€£]([^0-9])", r" \1", text)
    text = re.sub(r"([^0-9])%", r"\1 ", text)
    # sclite compares lower-cased words, so the kit's UNK scores as "unk".
    return " ".join(text.lower().split())


def normalize(text: str, keep_disfluencies: bool) -> str:
    """Normalised SAP reference: ref1 with ``keep_disfluencies=True``, ref2 with False.

    Returns lower-case words separated by single spaces; unintelligible speech becomes ``unk``.
    """
    return _normalise(text, markup=True, keep_parenthesised=keep_disfluencies)


def normalize_hypothesis(text: str) -> str:
    """Hypothesis normalised and truncated like the kit's (no markup handling; brackets are punctuation)."""
    words = _normalise(text, markup=False).split()[:MAX_HYP_WORDS]
    return " ".join(w[:MAX_HYP_TOKEN_CHARS] for w in words)


# --- Training targets -----------------------------------------------------------------------------------

_OTHER_SPEAKER = re.compile(r"\(\s*(?:cs|ss)\s*:[^()]*\)", re.IGNORECASE)
_TAG = re.compile(r"\[[^\[\]]*\]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_LABEL = re.compile(r"^\s*([A-Za-z]+)\s*:\s*(.*)$", re.DOTALL)
_PAREN = re.compile(r"\(([^()]*)\)")
_SPELLED = re.compile(r"~([A-Za-z])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:])")


def _strip_label(content: str) -> str:
    """``x: words`` -> ``words``."""
    m = _LABEL.match(content)
    return m.group(2) if m else content


def _brace_words(m: re.Match[str]) -> str:
    """``{g: w}`` -> w; ``{u: ...}``, ``{w: N}`` and empty braces -> nothing."""
    content = m.group(1)
    label = _LABEL.match(content)
    if (label and label.group(1).lower() in ("u", "w")) or not content.strip():
        return " "
    return f" {_strip_label(content)} "


def training_text(transcript: str) -> str:
    """Markup-free training target: case and punctuation kept, disfluencies kept as plain words.

    ``{g: w}`` -> w, tags and other speakers' speech removed, ``{u: ...}`` / ``{w: N}`` removed (the
    model cannot learn words nobody could hear), ``(uh)`` -> ``uh``, ``~J`` -> ``J``.
    """
    text = _SPELLED.sub(r"\1", _BRACE.sub(_brace_words, _TAG.sub(" ", transcript)))
    text = _OTHER_SPEAKER.sub(" ", text)
    text = _PAREN.sub(lambda m: f" {_strip_label(m.group(1))} ", text)
    text = re.sub(r"[()\[\]{}]", " ", text)
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


# --- Scoring --------------------------------------------------------------------------------------------

_SCLITE_SUBSTITUTION = 4
_SCLITE_INSERTION_DELETION = 3


def _sclite_alignment(ref: list[str], hyp: list[str]) -> list[tuple[str | None, str | None]]:
    """Word alignment as sclite's dynamic programme makes it, as (ref word, hyp word) pairs; None marks an
    insertion (no ref word) or a deletion (no hyp word).

    jiwer aligns with unit costs and its own tie order, which can put an ``unk`` on a different hypothesis
    word than sclite and so change the score; hence this small alignment of its own.
    """
    cost = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    step = [[""] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for j in range(1, len(hyp) + 1):
        cost[0][j], step[0][j] = cost[0][j - 1] + _SCLITE_INSERTION_DELETION, "ins"
    for i in range(1, len(ref) + 1):
        cost[i][0], step[i][0] = cost[i - 1][0] + _SCLITE_INSERTION_DELETION, "del"
        for j in range(1, len(hyp) + 1):
            diagonal = cost[i - 1][j - 1] + (0 if ref[i - 1] == hyp[j - 1] else _SCLITE_SUBSTITUTION)
            deletion = cost[i - 1][j] + _SCLITE_INSERTION_DELETION
            insertion = cost[i][j - 1] + _SCLITE_INSERTION_DELETION
            if diagonal <= deletion and diagonal <= insertion:
                cost[i][j], step[i][j] = diagonal, "diag"
            elif deletion < insertion:
                cost[i][j], step[i][j] = deletion, "del"
            else:
                cost[i][j], step[i][j] = insertion, "ins"
    pairs: list[tuple[str | None, str | None]] = []
    i, j = len(ref), len(hyp)
    while i > 0 or j > 0:
        if step[i][j] == "diag":
            i, j = i - 1, j - 1
            pairs.append((ref[i], hyp[j]))
        elif step[i][j] == "del":
            i -= 1
            pairs.append((ref[i], None))
        else:
            j -= 1
            pairs.append((None, hyp[j]))
    return pairs[::-1]


def _resolve_unk(ref: list[str], hyp: list[str]) -> tuple[list[str], list[str]]:
    """Apply the kit's UNK rules on sclite's alignment; returns the rewritten (ref, hyp) words."""
    if UNK not in ref and UNK not in hyp:
        return ref, hyp
    out_ref: list[str] = []
    out_hyp: list[str] = []
    for r, h in _sclite_alignment(ref, hyp):
        if r is not None and h is not None:
            out_ref.append(h if r == UNK else r)
            out_hyp.append(h)
        elif r is not None:
            if r != UNK:
                out_ref.append(r)
        elif h != UNK:
            out_hyp.append(h)
    return out_ref, out_hyp


def _word_edits(ref: list[str], hyp: list[str]) -> int:
    if not ref or not hyp:
        return len(ref) + len(hyp)
    o = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return o.substitutions + o.deletions + o.insertions


def _char_edits(ref: str, hyp: str) -> int:
    if not ref or not hyp:
        return len(ref) + len(hyp)
    o = jiwer.process_characters(ref, hyp)
    return o.substitutions + o.deletions + o.insertions


def _rate(errors: float, total: float) -> float:
    if total > 0:
        return errors / total
    return 0.0 if errors == 0 else 1.0


def _choose(cands: list[tuple[int, int]]) -> tuple[float, float]:
    """Pick (edits, length) by the lower clipped rate; a tie averages. Empty refs rank last."""
    clipped = [(min(e, n) if n > 0 else e, n) for e, n in cands]
    (e1, n1), (e2, n2) = clipped
    r1 = e1 / n1 if n1 else float("inf")
    r2 = e2 / n2 if n2 else float("inf")
    if r1 < r2:
        return float(e1), float(n1)
    if r2 < r1:
        return float(e2), float(n2)
    return (e1 + e2) / 2, (n1 + n2) / 2


def score_utterance(reference_raw: str, hypothesis: str) -> dict:
    """Score one utterance by the SAP rule.

    Returns ``wer``, ``cer`` and the chosen ``word_errors`` / ``words`` / ``char_errors`` / ``chars``
    (floats: a tie between the references averages them), plus the normalised ``ref1``, ``ref2`` and
    ``hyp`` for inspection.
    """
    hyp = normalize_hypothesis(hypothesis).split()
    refs = [normalize(reference_raw, keep_disfluencies=k) for k in (True, False)]
    words, chars = [], []
    for ref in refs:
        r, h = _resolve_unk(ref.split(), hyp)
        words.append((_word_edits(r, h), len(r)))
        r_text, h_text = " ".join(r), " ".join(h)
        chars.append((_char_edits(r_text, h_text), len(r_text)))
    word_errors, n_words = _choose(words)
    char_errors, n_chars = _choose(chars)
    return {
        "wer": _rate(word_errors, n_words),
        "cer": _rate(char_errors, n_chars),
        "word_errors": word_errors,
        "words": n_words,
        "char_errors": char_errors,
        "chars": n_chars,
        "ref1": refs[0],
        "ref2": refs[1],
        "hyp": " ".join(hyp),
    }


def _summary(scores: list[dict]) -> dict:
    return {
        "wer": _rate(sum(s["word_errors"] for s in scores), sum(s["words"] for s in scores)),
        "cer": _rate(sum(s["char_errors"] for s in scores), sum(s["chars"] for s in scores)),
        "n": len(scores),
    }


def score_corpus(rows: Iterable[tuple[str, str, str | None]]) -> dict:
    """Corpus WER/CER over ``(reference_raw, hypothesis, etiology)`` rows.

    Returns ``{"overall": {"wer", "cer", "n"}, "per_etiology": {etiology: {...}}}``; rows whose
    etiology is None or empty count only in ``overall``. Etiologies are sorted by name.
    """
    scores: list[dict] = []
    by_etiology: dict[str, list[dict]] = {}
    for reference, hypothesis, etiology in rows:
        s = score_utterance(reference, hypothesis)
        scores.append(s)
        if etiology:
            by_etiology.setdefault(etiology, []).append(s)
    return {
        "overall": _summary(scores),
        "per_etiology": {e: _summary(by_etiology[e]) for e in sorted(by_etiology)},
    }


def read_pairs(path: str | Path) -> list[tuple[str, str, str | None]]:
    """Read a TSV with header ``reference, hypothesis`` [, ``etiology``] into score_corpus rows.

    Uses the csv module's default quoting, so files written by ``csv`` or pandas read back exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a TSV with columns reference, hypothesis [, etiology]")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in ("reference", "hypothesis") if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)} in header {header}; the file must be "
                "tab-separated with a header naming reference, hypothesis and optionally etiology"
            )
        # Short rows give None cells; an absent or empty etiology counts only in "overall".
        return [
            (row["reference"] or "", row["hypothesis"] or "", row.get("etiology") or None) for row in reader
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", help="TSV with header columns reference, hypothesis [, etiology]")
    args = parser.parse_args(argv)
    try:
        rows = read_pairs(args.pairs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(score_corpus(rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
