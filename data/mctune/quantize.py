"""Equal-frequency quantisation of MCTune's float features into buckets 1..n fitted on a training set."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tunelab.data.mctune.features import (
    FLOAT_FEATURES,
)

QUANTIZE_MODES: dict[str, int] = {"none": 0, "1to5": 5, "1to10": 10}


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
