"""SAP transcripts and Whisper output as the SAP challenge kit normalises them before scoring, and the
training targets made from SAP transcripts. Scoring itself (alignment, UNK rules, rates) is scoring.py.

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

Known differences from the kit: the British-to-American table is Whisper's ``english.json``, of which the kit
ships a copy that differs in a few entries (only the kit maps e.g. ``cancellation``); a ``{w: ...}`` holding
two numbers makes the kit stop with an error, here the first number counts.

Training targets (:func:`training_text`) are not scored text: they leave out caregiver speech, so that the
model learns the participant's words.
"""

from __future__ import annotations

import re
from functools import lru_cache

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
