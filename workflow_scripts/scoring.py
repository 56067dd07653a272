"""WER/CER by the Speech Accessibility Project (SAP) challenge rule, plus SAP markup handling.

Scoring rule (as in the SAP challenge evaluation kit):

* The raw SAP transcript gives two references: ref1 keeps parenthesised content such as ``(uh)`` or a
  partial word ``(c-)`` (without the parentheses), ref2 drops it. Both go through SAP markup rules and
  Whisper's English text normaliser; the hypothesis goes through the normaliser only.
* ``{u: ...}`` / ``{w: N}`` become ``unk`` tokens. After aligning hypothesis and reference, a reference
  ``unk`` substituted by a hypothesis word counts as that word (correct), a deleted reference ``unk`` is
  dropped (no error, no length), and an inserted hypothesis ``unk`` is dropped.
* Per utterance and per reference, edits are clipped at the reference length; the reference with the
  lower error rate is used, a tie averages both references' edits and lengths. WER and CER each make
  this choice on their own (the kit does the same), so the CER reference may differ from the WER one.
* Corpus rate = sum of chosen edits / sum of chosen reference lengths.
* An empty (normalised) reference has length 0: its hypothesis words all count as errors (insertions,
  not clipped) and add nothing to the denominator, as in the kit. Where a rate has a zero denominator,
  it is reported as 0.0 with no errors and 1.0 otherwise, so JSON never holds inf/NaN.

``(cs: ...)`` / ``(ss: ...)`` (speech by a caregiver or another speaker) is parenthesised content like
any other, as in the kit: ref1 keeps its words (label stripped), ref2 drops them, so a hypothesis is
not penalised for transcribing audible caregiver speech or for leaving it out. Training targets
(:func:`training_text`) leave it out: the model should learn the participant's words.

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
from whisper_normalizer.english import EnglishTextNormalizer

UNK = "unk"
# The kit truncates hypotheses like this so that a looping decoder output cannot blow up alignment time.
MAX_HYP_WORDS = 512
MAX_HYP_TOKEN_CHARS = 64

_OTHER_SPEAKER = re.compile(r"\(\s*(?:cs|ss)\s*:[^()]*\)", re.IGNORECASE)
_TAG = re.compile(r"\[[^\[\]]*\]")
_BRACE = re.compile(r"\{([^{}]*)\}")
_LABEL = re.compile(r"^\s*([A-Za-z]+)\s*:\s*(.*)$", re.DOTALL)
_PAREN = re.compile(r"\(([^()]*)\)")
_SPELLED = re.compile(r"~([A-Za-z])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:])")


@lru_cache(maxsize=1)
def _normalizer() -> EnglishTextNormalizer:
    # Loads Whisper's english.json spelling map shipped inside whisper_normalizer (no network).
    return EnglishTextNormalizer()


def _strip_label(content: str) -> str:
    """``x: words`` -> ``words`` (the kit strips a label inside parentheses the same way)."""
    m = _LABEL.match(content)
    return m.group(2) if m else content


def _braces(text: str, unk_words: bool) -> str:
    """Resolve ``{g: w}`` -> w, ``{u: ...}`` -> one UNK, ``{w: N}`` -> N UNKs (or nothing)."""

    def repl(m: re.Match[str]) -> str:
        content = m.group(1)
        label = _LABEL.match(content)
        kind = label.group(1).lower() if label else ""
        if kind == "w":
            digits = re.search(r"\d+", content)
            # A count-less {w: } still marks unintelligible speech: one UNK.
            n = int(digits.group()) if digits else 1
            return f" {' '.join(['UNK'] * n)} " if unk_words else " "
        if kind == "u" or not content.strip():
            return " UNK " if unk_words else " "
        return f" {_strip_label(content)} "

    return _BRACE.sub(repl, text)


def _strip_common_markup(text: str, unk_words: bool) -> str:
    text = _TAG.sub(" ", text)
    text = _braces(text, unk_words)
    return _SPELLED.sub(r"\1", text)


def normalize(text: str, keep_disfluencies: bool) -> str:
    """Normalised SAP reference: ref1 with ``keep_disfluencies=True``, ref2 with False.

    Returns lower-case words separated by single spaces; unintelligible speech becomes ``unk``.
    Plain text without markup (e.g. a hypothesis) passes through the Whisper normaliser unchanged
    otherwise.
    """
    text = _strip_common_markup(text, unk_words=True)
    if keep_disfluencies:
        text = _PAREN.sub(lambda m: f" {_strip_label(m.group(1))} ", text)
    else:
        text = _PAREN.sub(" ", text)
    # Stray brackets from unbalanced markup would otherwise survive as words or hide text.
    text = re.sub(r"[()\[\]{}]", " ", text)
    return " ".join(_normalizer()(text).split())


def normalize_hypothesis(text: str) -> str:
    """Whisper-normalised hypothesis, truncated like the kit (words and token length)."""
    words = _normalizer()(text).split()[:MAX_HYP_WORDS]
    return " ".join(w[:MAX_HYP_TOKEN_CHARS] for w in words)


def training_text(transcript: str) -> str:
    """Markup-free training target: case and punctuation kept, disfluencies kept as plain words.

    ``{g: w}`` -> w, tags and other speakers' speech removed, ``{u: ...}`` / ``{w: N}`` removed (the
    model cannot learn words nobody could hear), ``(uh)`` -> ``uh``, ``~J`` -> ``J``.
    """
    text = _OTHER_SPEAKER.sub(" ", _strip_common_markup(transcript, unk_words=False))
    text = _PAREN.sub(lambda m: f" {_strip_label(m.group(1))} ", text)
    text = re.sub(r"[()\[\]{}]", " ", text)
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def _resolve_unk(ref: list[str], hyp: list[str]) -> tuple[list[str], list[str]]:
    """Apply the kit's UNK rules on a word alignment; returns the rewritten (ref, hyp) tokens."""
    if not ref or not hyp:
        return [w for w in ref if w != UNK], [w for w in hyp if w != UNK]
    out_ref: list[str] = []
    out_hyp: list[str] = []
    for chunk in jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]:
        r = ref[chunk.ref_start_idx : chunk.ref_end_idx]
        h = hyp[chunk.hyp_start_idx : chunk.hyp_end_idx]
        if chunk.type == "substitute":
            out_ref += [hw if rw == UNK else rw for rw, hw in zip(r, h, strict=True)]
            out_hyp += h
        elif chunk.type == "delete":
            out_ref += [w for w in r if w != UNK]
        elif chunk.type == "insert":
            out_hyp += [w for w in h if w != UNK]
        else:
            out_ref += r
            out_hyp += h
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
