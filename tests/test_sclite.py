"""Our SAP scoring against the challenge kit's own path: Debian's sclite aligns, the kit reads sclite's SGML back.

The kit (github.com/xiuwenz2/SAPC-template) writes normalised ref1, ref2 and hypotheses as trn files, runs
``sclite -r REF trn -h HYP trn -i wsj -o all sgml`` once per reference (utils/evaluate.py, run_sclite), reads
each ``<HYP>.sgml`` back with utils/compute_metrics.py (parse_sgml_csdi: C/S/D/I segments, UNK rules) and
scores the rebuilt word strings with utils/metrics/wer.py and cer.py (Levenshtein, edits clipped at the
reference length, lower-rate reference, a tie averages). The helpers below redo those steps from sclite's real
output, written here from the kit's description rather than taken from our scoring, and the tests compare them
with score_utterance / score_corpus / _sclite_alignment on a few hundred seeded, varied transcripts. The
normaliser (sap_text.py) is shared by both sides: it is what produces the text the kit hands to sclite.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from workflow_scripts.sap_text import UNK, normalize, normalize_hypothesis
from workflow_scripts.scoring import _sclite_alignment, score_corpus, score_utterance

# Debian's sctk installs sclite off PATH.
_DEBIAN_SCLITE = Path("/usr/lib/sctk/bin/sclite")
N_UTTERANCES = 400

Segment = tuple[str, str, str]  # (op, ref word or "", hyp word or "") as sclite writes one alignment step


def _sclite_path() -> str | None:
    found = shutil.which("sclite")
    if found:
        return found
    return str(_DEBIAN_SCLITE) if _DEBIAN_SCLITE.is_file() else None


# --- The transcripts ---------------------------------------------------------------------------------------

# (prompt as a transcriber writes it, other ways a recogniser may write the same speech): digits vs words,
# contractions, abbreviations, letters, British spellings, possessives.
_SENTENCES = [
    ("Set a timer for 5 minutes.", ["set a timer for five minutes", "Set a timer for 5 min"]),
    ("Call Dr. Smith at 3 p.m. tomorrow", ["call doctor smith at three PM tomorrow", "Call Dr Smith at 3pm tomorrow"]),
    ("I can't find my keys", ["I cannot find my keys", "i can not find my keys", "I cant find my keys."]),
    ("Let's meet at St. Mary's church", ["lets meet at saint marys church", "Let us meet at Saint Mary's church"]),
    ("It's 10 o'clock in Washington D.C.", ["its ten oclock in washington dc", "It's 10 o'clock in Washington, D. C."]),
    ("The price went up 20 percent in 2019", ["the price went up 20% in 2019", "the price went up twenty percent"]),
    ("Turn on the T V in the living room", ["turn on the TV in the living room", "turn on the tv in the livingroom"]),
    ("My mom's car won't start", ["my moms car will not start", "My Mom's car wont start!"]),
    ("Spell ~B ~N ~C please", ["spell B N C please", "spell bnc please", "spell b and c please"]),
    ("What's the weather like in New York?", ["whats the weather like in new york", "What is the weather in NY"]),
    ("I've been waiting for 2 hours", ["I have been waiting for two hours", "ive been waiting 2 hours"]),
    ("Remind me to take my medicine at 8 a.m.", ["remind me to take my medicine at eight AM", "remind me at 8"]),
    ("He'd like a cup of coffee with 2 sugars", ["he would like a cup of coffee with two sugars"]),
    ("We're going to the park on the 1st of May", ["we are going to the park on the first of may"]),
    ("Add milk, eggs and bread to my shopping list", ["add milk eggs and bread to my shopping list"]),
    ("The colour of the sky is grey today", ["the color of the sky is gray today"]),
    ("She said she'll be there by 7:30", ["she said she will be there by seven thirty", "she'll be there by 730"]),
    ("How many ounces are in a pound?", ["how many ounces are in a pound", "how many oz in a lb"]),
    ("Play some music by the Beatles", ["play some music by the beatles", "[Music] play music by beatles"]),
    ("Open the front door", ["open the front door", "Open the door."]),
    ("I paid $25 for 1.5 pounds of cheese", ["I paid twenty five dollars for one and a half pounds of cheese"]),
    ("Mr. Jones lives on Main St. near the river", ["mister jones lives on main street near the river"]),
    ("Yes", ["yes", "yeah", "Yes."]),
    ("Good morning everyone", ["good morning everyone", "good morning every one"]),
    ("Don't forget the 3rd appointment on Tuesday", ["do not forget the third appointment on tuesday"]),
    ("They're watching the game at 9", ["they are watching the game at nine", "there watching the game at 9"]),
]
_VOCABULARY = ["the", "a", "it", "and", "go", "cup", "that", "is", "five", "5", "home", "blue", "to", "on", "unk", "uh"]
_CAREGIVER = ["(cs: Are you ready?)", "(CS: say it again)", "(ss: okay)", "(cs: What is it?)"]
_TAGS = ["[PII]", "[laughter]", "[noise]", "[inaudible]"]
_MARKUP_ONLY = ["{w: 3}", "[PII]", "(uh)", "{u: mumble}", "(cs: hello there)", "[laughter] (um)", "{w: 1} (c-)"]


def _with_markup(words: list[str], rng: random.Random) -> list[str]:
    """One piece of SAP markup put into (or over) the prompt's words."""
    words = list(words)
    i = rng.randrange(len(words) + 1)
    kind = rng.randrange(10)
    if kind == 0:
        words.insert(i, rng.choice(["(uh)", "(um)", "(ah)", "(hmm)"]))
    elif kind == 1:
        words.insert(i, rng.choice(_TAGS))
    elif kind == 2 and i < len(words):
        words[i] = f"{{g: {words[i]}}}"
    elif kind == 3 and i < len(words):
        words[i] = rng.choice(["{u: mumbled}", "{u: xx}", "{u:}"])
    elif kind == 4:
        # {w: N} over N words, or N unintelligible words the prompt did not have.
        n = rng.randint(1, 3)
        words[i : i + rng.randint(0, n)] = [f"{{w: {n}}}"]
    elif kind == 5:
        words.insert(0 if rng.random() < 0.7 else len(words), rng.choice(_CAREGIVER))
    elif kind == 6 and i < len(words):
        # A partial word before the word it starts (c-) ... or inside it, succ(ess-)essful.
        word = words[i].strip(".,?!")
        cut = max(1, len(word) // 2)
        if rng.random() < 0.7:
            words.insert(i, f"({word[:cut].lower()}-)")
        else:
            words[i] = f"{word[:cut]}({word[cut:]}-){word[cut:]}"
    elif kind == 7:
        words.insert(i, " ".join(f"~{c}" for c in rng.choice(["J", "AB", "CNN", "Q"])))
    elif kind == 8:
        words.insert(i, rng.choice(["(the)", "(I I)", "(go to)", "(ss: no)"]))
    else:
        words.insert(i, rng.choice(["{g: maybe}", "{yes}", "{w: }", "{w: 2}"]))
    return words


def _perturbed(words: list[str], rng: random.Random) -> list[str]:
    """Recogniser-like errors: substitutions, deletions, insertions (unk and fillers included), repeats."""
    words = list(words)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        kind = rng.randrange(5)
        i = rng.randrange(len(words) + 1)
        if kind == 0 and i < len(words):
            words[i] = rng.choice(_VOCABULARY)
        elif kind == 1 and i < len(words):
            del words[i]
        elif kind == 2:
            words.insert(i, rng.choice(_VOCABULARY))
        elif kind == 3 and i < len(words):
            words[i] = UNK
        elif kind == 4 and words:
            words += words[: rng.randint(1, len(words))]  # a looping decoder repeats itself
    return words


def _hypothesis(prompt: str, variants: list[str], rng: random.Random) -> str:
    r = rng.random()
    if r < 0.06:
        return rng.choice(["", " ", "uh", "(um)", "..."])  # nothing recognised, or only a filler
    text = rng.choice([prompt, *variants])
    if r < 0.2:
        return text  # as spoken
    words = _perturbed(text.split(), rng)
    style = rng.randrange(4)
    if style == 0:
        words = [w.upper() for w in words]
    elif style == 1 and words:
        words = [f"{w}{rng.choice([',', '.', '?', '!'])}" if rng.random() < 0.3 else w for w in words]
    return " ".join(words)


def _corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """n seeded (raw SAP transcript, raw hypothesis) pairs.

    No pair has an empty normalised hypothesis with an empty normalised reference (ref1 or ref2): sclite then
    writes an empty alignment line, and the kit's SGML reader skips blank lines while looking for it, takes the
    next utterance's line instead and from there on scores every utterance against the wrong alignment.
    """
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        prompt, variants = rng.choice(_SENTENCES)
        if rng.random() < 0.05:
            reference = rng.choice(_MARKUP_ONLY)
        else:
            words = prompt.split()
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                words = _with_markup(words, rng)
            reference = " ".join(words)
        hypothesis = _hypothesis(prompt, variants, rng)
        refs_empty = not normalize(reference, True) or not normalize(reference, False)
        if refs_empty and not normalize_hypothesis(hypothesis):
            continue
        pairs.append((reference, hypothesis))
    return pairs


# --- The kit's path: sclite, then its SGML reading and rates -------------------------------------------------


def _write_trn(path: Path, texts: list[str], ids: list[str]) -> None:
    path.write_text("".join(f"{text} ({uid})\n" for text, uid in zip(texts, ids, strict=True)), encoding="utf-8")


def _run_sclite(sclite: str, ref_trn: Path, hyp_trn: Path) -> Path:
    """Align as the kit does; sclite writes the SGML next to the hypothesis file, as <hyp>.sgml."""
    proc = subprocess.run(
        [sclite, "-r", str(ref_trn), "trn", "-h", str(hyp_trn), "trn", "-i", "wsj", "-o", "all", "sgml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    sgml = hyp_trn.with_name(hyp_trn.name + ".sgml")
    assert proc.returncode == 0 and sgml.is_file(), f"sclite failed:\n{proc.stdout}\n{proc.stderr}"
    return sgml


def _read_sgml(path: Path) -> list[tuple[str, list[Segment]]]:
    """(utterance id, alignment segments) per ``<PATH>``, in file order, read the way the kit reads them.

    The kit takes the first following line that is neither blank nor a tag as the alignment, splits it at
    ``:`` into segments and each segment at ``,`` after its one-letter op, stripping the quotes.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[tuple[str, list[Segment]]] = []
    i = 0
    while i < len(lines):
        m = re.match(r'<PATH id="\(?([^")]+)\)?"', lines[i].strip())
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].lstrip().startswith("<")):
            j += 1
        segments: list[Segment] = []
        for seg in lines[j].split(":") if j < len(lines) else []:
            seg = seg.strip()
            if not seg:
                continue
            fields = [f.strip().strip('"') for f in seg[2:].split(",")] + ["", ""]
            # I segments start with an empty ref field (I,,"hyp"); D segments end with an empty hyp field.
            segments.append((seg[0], fields[0], fields[1]))
        out.append((m.group(1), segments))
        i = j + 1
    return out


def _kit_words(segments: list[Segment]) -> tuple[list[str], list[str]]:
    """(ref words, hyp words) rebuilt by the kit's UNK rules: a substituted ref unk takes the hyp word, a
    deleted ref unk and an inserted hyp unk are dropped."""
    ref: list[str] = []
    hyp: list[str] = []
    for op, r, h in segments:
        if op in ("C", "S"):
            ref.append(h if op == "S" and r == UNK and h else r)
            hyp.append(h)
        elif op == "D" and r != UNK:
            ref.append(r)
        elif op == "I" and h != UNK:
            hyp.append(h)
    return [w for w in ref if w], [w for w in hyp if w]


def _levenshtein(a: list[str] | str, b: list[str] | str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _kit_choice(pred: str, target1: str, target2: str, chars: bool) -> tuple[float, float]:
    """(edits, length) by wer.py / cer.py: clipped per reference, lower rate wins, a tie averages; an empty
    reference has rate inf and keeps its unclipped edits."""
    units = (lambda s: s) if chars else str.split
    scored = []
    for target in (target1, target2):
        n = len(units(target))
        edits = _levenshtein(units(pred), units(target))
        edits = min(edits, n) if n > 0 else edits
        scored.append((edits / n if n > 0 else float("inf"), edits, n))
    (rate1, e1, n1), (rate2, e2, n2) = scored
    if rate1 < rate2:
        return e1, n1
    if rate2 < rate1:
        return e2, n2
    return 0.5 * (e1 + e2), 0.5 * (n1 + n2)


@dataclass
class KitRun:
    pairs: list[tuple[str, str]]  # raw (reference, hypothesis)
    ref1: list[str]  # normalised text handed to sclite
    ref2: list[str]
    hyp: list[str]
    align1: list[list[Segment]]  # sclite's alignment per utterance, ref1 and ref2
    align2: list[list[Segment]]
    scored: list[int]  # utterances the kit can score (see kit_run)


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory) -> KitRun:
    sclite = _sclite_path()
    if sclite is None:
        # CI installs Debian's sctk (.ci/run), so a missing sclite there is a broken set-up, not a skip.
        message = "sclite not found (apt-get install sctk puts it at /usr/lib/sctk/bin/sclite)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pairs = _corpus(N_UTTERANCES, seed=22)
    work = tmp_path_factory.mktemp("sclite")
    ids = [f"utt{i:06d}" for i in range(1, len(pairs) + 1)]  # the kit's ids: -i wsj reads speaker "utt"
    ref1 = [normalize(r, keep_disfluencies=True) for r, _ in pairs]
    ref2 = [normalize(r, keep_disfluencies=False) for r, _ in pairs]
    hyp = [normalize_hypothesis(h) for _, h in pairs]
    alignments = []
    for name, refs in (("ref1", ref1), ("ref2", ref2)):
        _write_trn(work / f"{name}.trn", refs, ids)
        _write_trn(work / f"hyp.{name}.trn", hyp, ids)  # one hypothesis copy per run, as the kit
        read = _read_sgml(_run_sclite(sclite, work / f"{name}.trn", work / f"hyp.{name}.trn"))
        # The kit pairs SGML paths with its utterances by position only.
        assert [uid for uid, _ in read] == ids
        alignments.append([segments for _, segments in read])
    # The kit stops with an error when the hypothesis words it rebuilds from the ref1 and the ref2 alignment
    # differ (an inserted hyp unk is dropped in one and aligned in the other), so such an utterance has no kit
    # score to compare with (e.g. ref1 "go home", ref2 "go", hyp "go unk"; none in this seed's corpus); all the
    # others are compared.
    scored = [i for i in range(len(pairs)) if _kit_words(alignments[0][i])[1] == _kit_words(alignments[1][i])[1]]
    return KitRun(pairs, ref1, ref2, hyp, alignments[0], alignments[1], scored)


def _kit_scores(run: KitRun, i: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """((word edits, words), (char edits, chars)) the kit chooses for utterance i."""
    target1 = " ".join(_kit_words(run.align1[i])[0])
    target2 = " ".join(_kit_words(run.align2[i])[0])
    pred = " ".join(_kit_words(run.align1[i])[1])  # the kit scores both references against ref1's rebuild
    return _kit_choice(pred, target1, target2, chars=False), _kit_choice(pred, target1, target2, chars=True)


# --- Tests ------------------------------------------------------------------------------------------------


def test_corpus_covers_what_the_kit_treats_specially(kit_run):
    # Guards the generator: a corpus without these cases would let the comparisons below pass vacuously.
    ops = [seg for i in kit_run.scored for seg in kit_run.align1[i] + kit_run.align2[i]]
    assert len(kit_run.scored) >= 0.9 * N_UTTERANCES
    assert sum(op == "S" and r == UNK for op, r, _ in ops) >= 10  # ref unk takes the hyp word
    assert sum(op == "D" and r == UNK for op, r, _ in ops) >= 10  # deleted unk dropped
    assert sum(op == "I" and h == UNK for op, _, h in ops) >= 5  # inserted hyp unk dropped
    assert sum(not kit_run.hyp[i] for i in kit_run.scored) >= 10  # empty hypotheses
    assert sum(not kit_run.ref2[i] for i in kit_run.scored) >= 3  # empty references
    assert sum(kit_run.ref1[i] != kit_run.ref2[i] for i in kit_run.scored) >= 50  # two different references
    word_scores = [_kit_scores(kit_run, i)[0] for i in kit_run.scored]
    assert sum(e > 0 for e, _ in word_scores) >= 100
    assert sum(e == n > 0 for e, n in word_scores) >= 10  # clipped at the reference length


def test_alignment_equals_sclites(kit_run):
    # Our alignment must be sclite's, pair for pair: where an unk lands decides the score (see test_scoring).
    different = []
    for refs, alignments in ((kit_run.ref1, kit_run.align1), (kit_run.ref2, kit_run.align2)):
        for i in range(len(kit_run.pairs)):
            ours = _sclite_alignment(refs[i].split(), kit_run.hyp[i].split())
            sclites = [(r or None, h or None) for _, r, h in alignments[i]]
            if ours != sclites:
                different.append((refs[i], kit_run.hyp[i], ours, sclites))
    assert not different, f"{len(different)} alignments differ from sclite's, first: {different[:3]}"


def test_utterance_edits_and_lengths_equal_the_kits(kit_run):
    different = []
    for i in kit_run.scored:
        ours = score_utterance(*kit_run.pairs[i])
        (word_errors, words), (char_errors, chars) = _kit_scores(kit_run, i)
        if (ours["word_errors"], ours["words"], ours["char_errors"], ours["chars"]) != (
            word_errors,
            words,
            char_errors,
            chars,
        ):
            different.append((kit_run.pairs[i], ours, (word_errors, words, char_errors, chars)))
    assert not different, f"{len(different)} utterances score differently from the kit, first: {different[:3]}"


def test_corpus_rates_equal_the_kits(kit_run):
    kit = [_kit_scores(kit_run, i) for i in kit_run.scored]
    ours = score_corpus([(*kit_run.pairs[i], None) for i in kit_run.scored])["overall"]
    assert ours["n"] == len(kit_run.scored)
    assert ours["wer"] == pytest.approx(sum(w[0] for w, _ in kit) / sum(w[1] for w, _ in kit), abs=1e-12)
    assert ours["cer"] == pytest.approx(sum(c[0] for _, c in kit) / sum(c[1] for _, c in kit), abs=1e-12)
