"""Which prompts a round regenerates (OPTune's selective regeneration); the others keep their previous pairs.

OPTune (Chen et al. 2024, arXiv 2406.07657, "OPTune: Efficient Online Preference Tuning") regenerates, each
iteration, only the prompts whose new responses promise a more informative training signal than the responses they
already have, judged by reward: the prompts whose previous responses scored lowest are regenerated, and the rest
reuse their existing pairs. A selection maps (prompt index -> the reward of that prompt's previous chosen response,
or None when it gave no pair) to the sorted indices to regenerate. Registered by name for ``rounds.selection``:

- ``optune_lowest_reward`` (``fraction``, default 0.5): the ``ceil(fraction x prompts)`` prompts with the lowest
  previous chosen reward, prompts without a previous pair first (they have no training signal at all); ties go to
  the lower index. The fraction is the paper's knob (its speed-ups come from regenerating part of the prompts); 0.5
  is this project's default, as the fraction the paper uses by default could not be checked offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SELECTIONS: dict[str, Callable[..., list[int]]] = {}


def register_selection(name: str):
    def add(function):
        SELECTIONS[name] = function
        return function
    return add


@register_selection("optune_lowest_reward")
def lowest_reward(previous: dict[int, float | None], fraction: float = 0.5) -> list[int]:
    """The prompts to regenerate: the lowest-rewarded ``fraction`` of ``previous`` (see the module docstring)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"rounds.selection.fraction={fraction!r} is invalid: valid values are in (0, 1]")
    count = math.ceil(fraction * len(previous))
    order = sorted(previous, key=lambda i: (previous[i] is not None, previous[i] or 0.0, i))
    return sorted(order[:count])


def select_prompts(spec, previous: dict[int, float | None]) -> list[int]:
    """Indices to regenerate under ``spec`` (``rounds.selection``: null = all, or {name, options...})."""
    if not spec:
        return sorted(previous)
    options = dict(spec)
    name = options.pop("name", None)
    if name not in SELECTIONS:
        raise KeyError(f"unknown rounds.selection.name {name!r}; valid: {', '.join(sorted(SELECTIONS))}")
    return SELECTIONS[name](previous, **options)
