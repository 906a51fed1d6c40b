"""Held-out MCTune test tags: perturb a response's foundational features, keeping them consistent."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping

from tunelab.data.mctune.features import (
    DEFAULT_FKRE_BOUNDS,
    FEATURES,
    FOUNDATIONAL,
    INT_FEATURES,
    derive_features,
)


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
