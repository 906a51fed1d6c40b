"""The ``mctune`` data stage: features of each alpaca response, then sampled control tags in its ``input``.

Rows carry ``mctune_features`` and ``mctune_tags`` as JSON strings (not Arrow structs): the schema stays a
plain string whatever features are present, and ``json.loads`` gives back exactly the dict that was written.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

from tunelab.data.mctune.features import (
    FEATURES,
    FOUNDATIONAL,
    extract_features,
)
from tunelab.data.mctune.perturb import PerturbationError, perturb_features
from tunelab.data.mctune.quantize import QUANTIZE_MODES, Quantizer, fit_quantizer
from tunelab.data.mctune.tags import (
    build_preamble,
    check_candidates,
    compose_input,
    format_tags,
    sample_tags,
    tag_values,
)
from tunelab.data.stages import register_stage

FEATURES_COLUMN = "mctune_features"
TAGS_COLUMN = "mctune_tags"


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
    cands = check_candidates(candidates)
    perturb = None
    if perturb_stds is not None:
        perturb = (tuple((f, float(perturb_stds[f])) for f in FOUNDATIONAL), float(perturb_scale))
    kwargs = dict(seed=seed, max_num_tags=max_num_tags, candidates=cands, quantizer=quantizer, perturb=perturb,
                  preamble=build_preamble(cands, quantizer))
    return ds.map(_tags_row, with_indices=True, fn_kwargs=kwargs, num_proc=num_proc, desc="MCTune tags")


@register_stage("mctune", "rows")
def mctune_stage(
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
