"""WER/CER by the Speech Accessibility Project (SAP) challenge rule.

The rule is the one of the challenge's public evaluation kit (GitHub ``xiuwenz2/SAPC-template``): its text
normaliser (``utils/normalizer/text_normalizer_hf.py``, ``EnglishTextNormalizer.norm``, run by
``utils/normalize_ref.py`` / ``utils/normalize_hyp.py``), sclite word alignment (``utils/evaluate.py``), the UNK
rules of ``utils/compute_metrics.py`` and the two-reference rates of ``utils/metrics/wer.py`` / ``cer.py``.

Normalisation (references and hypotheses) is sap_text.py; the rule's text steps are described there.

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

CLI: ``python -m workflow_scripts.scoring PAIRS.tsv`` prints
``{"overall": {"wer", "cer", "n"}, "per_etiology": {...}}`` for a tab-separated file with header columns
``reference`` (raw SAP transcript), ``hypothesis`` and optional ``etiology``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import jiwer

from workflow_scripts.sap_text import UNK, normalize, normalize_hypothesis

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
