"""MCTune control tags: sample them from a text's features, write them as ``[name: value]``, parse them back."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence

from tunelab.data.mctune.features import (
    DESCRIPTIONS,
    FEATURES,
    INT_FEATURES,
)
from tunelab.data.mctune.quantize import Quantizer

_ORDER = {name: i for i, name in enumerate(FEATURES)}


def sample_tags(
    features: Mapping[str, float],
    rng: random.Random,
    max_num_tags: int = 5,
    candidates: Sequence[str] = FEATURES,
) -> dict[str, int | float]:
    """k ~ Uniform{1..min(max_num_tags, |candidates|)} distinct candidates, in canonical feature order."""
    candidates = check_candidates(candidates)
    if max_num_tags < 1:
        raise ValueError(f"max_num_tags must be >= 1, got {max_num_tags}")
    k = rng.randint(1, min(max_num_tags, len(candidates)))
    chosen = sorted(rng.sample(list(candidates), k), key=_ORDER.__getitem__)
    return {name: features[name] for name in chosen}


def check_candidates(candidates: Sequence[str]) -> tuple[str, ...]:
    """``candidates`` in canonical feature order; ValueError unless they are distinct feature names."""
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
    candidates = check_candidates(candidates)
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
