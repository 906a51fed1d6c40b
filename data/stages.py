"""Data-pipeline stages: data-side methods (MCTune controls, SFTMix confidence split, ...) as named steps.

A stage is a function registered under a name with the point where it runs:
- ``rows``: on a source's raw rows before tokenization (e.g. rewrite prompts),
- ``examples``: on the tokenized train/eval datasets (e.g. add a ``group`` column the sampler uses).
It is called as ``fn(dataset, split=..., seed=..., context=..., **options)``, first for the train split and
then for the eval split; ``context`` is a dict shared by those calls, so statistics fitted on the training
split (e.g. quantisation bounds) are applied unchanged to the eval split.
Recipes list them in ``data.stages``: ``[{name: <stage>, <options>...}]``; they run in that order.

Imports go one way: a stage module (data/sftmix.py, data/mctune) imports this registry (and data/sampler.py's, for
an ordering) and registers with ``@register_stage``; data/pipeline.py imports each built-in stage module once so
that it registers, and looks stages up here. A stage module never imports the pipeline or anything in trainers/;
the model passes a method needs (e.g. SFTMix's confidence, trainers/sftmix_scores.py) live in trainers/ and hand
the stage a file.
"""

from __future__ import annotations

from collections.abc import Callable

STAGES: dict[str, tuple[str, Callable]] = {}
POINTS = ("rows", "examples")


def register_stage(name: str, point: str):
    if point not in POINTS:
        raise ValueError(f"stage point must be one of {POINTS}")

    def add(fn):
        STAGES[name] = (point, fn)
        return fn

    return add


def stages_at(point: str, stage_cfgs) -> list[tuple[Callable, dict]]:
    """The configured stages that run at ``point``, with their options (``context`` included)."""
    out = []
    for spec in stage_cfgs or []:
        options = dict(spec)
        name = options.pop("name", None)
        if name not in STAGES:
            raise KeyError(f"unknown data stage {name!r}; valid: {', '.join(sorted(STAGES)) or '(none registered)'}")
        where, fn = STAGES[name]
        if where == point:
            out.append((fn, {**options, "context": {}}))
    return out
