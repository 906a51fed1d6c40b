"""MCTune controllability evaluation: do generated texts have the feature values their tags asked for?

For each (requested tags, generated text) pair the features of the text are re-extracted with
``extract_features`` (same NLP backend as the training data) and each tag is judged met or not:

* integer features (counts): exact match;
* float features: met when ``|round(measured, 2) - requested| <= tolerance[feature]`` (the tags carry 2
  decimals). Defaults (``DEFAULT_TOLERANCE``): fkre 5.0 points (half of one of Flesch's 10-point bands),
  ratios (simp_*) 0.05, rt_average 0.01 minutes (2.4 words). Pass ``tolerance=0`` for exact matching at 2
  decimals, a number for one tolerance for all float features, or a dict to override some;
* float features that were quantised (a ``Quantizer`` is given and the feature is in it): the requested value
  is a bucket level and is met when the measured value falls in that bucket exactly.

Reported: zero_one_score (tags met / all tags), strictly_followed (fraction of examples with every tag met),
loosely_followed (fraction with at least one tag met), and per tag: n, accuracy, MAE and MSE between measured
and requested values (in bucket units for quantised features). Every example needs at least one tag.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from tunelab.data.mctune.features import (
    FEATURES,
    FLOAT_FEATURES,
    INT_FEATURES,
    extract_features,
)
from tunelab.data.mctune.quantize import Quantizer
from tunelab.data.mctune.tags import parse_tags

DEFAULT_TOLERANCE: dict[str, float] = {
    "fkre": 5.0,
    "simp_ttr": 0.05,
    "simp_noun_var": 0.05,
    "simp_verb_var": 0.05,
    "simp_adj_var": 0.05,
    "rt_average": 0.01,
}
_EPS = 1e-9  # absorbs binary rounding, e.g. |0.35 - 0.30| computed as 0.04999...


def resolve_tolerance(tolerance: float | Mapping[str, float] | None) -> dict[str, float]:
    """Per-float-feature tolerance from None (defaults), a number (all float features) or a partial dict."""
    if tolerance is None:
        return dict(DEFAULT_TOLERANCE)
    if isinstance(tolerance, (int, float)):
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        return {f: float(tolerance) for f in FLOAT_FEATURES}
    unknown = [k for k in tolerance if k not in FLOAT_FEATURES]
    if unknown:
        raise ValueError(f"tolerances are for float features {FLOAT_FEATURES}, not {unknown}")
    return {**DEFAULT_TOLERANCE, **{k: float(v) for k, v in tolerance.items()}}


def tag_met(
    name: str, requested: float, measured: float, tolerance: Mapping[str, float], quantizer: Quantizer | None = None
) -> tuple[bool, float]:
    """(met, signed error measured - requested) for one tag; the error is in bucket units if quantised."""
    if name in INT_FEATURES:
        return int(measured) == int(requested), float(measured) - float(requested)
    if quantizer is not None and name in quantizer.features:
        level = quantizer.bucket(name, measured)
        return level == int(requested), float(level - requested)
    err = round(float(measured), 2) - float(requested)
    return abs(err) <= tolerance[name] + _EPS, float(measured) - float(requested)


def evaluate(
    pairs: Iterable[tuple[Mapping[str, float], str]],
    *,
    tolerance: float | Mapping[str, float] | None = None,
    quantizer: Quantizer | None = None,
    backend: str = "hanta",
    keep_examples: bool = True,
) -> dict:
    """Controllability report for (requested tags, generated text) pairs; see the module docstring."""
    tol = resolve_tolerance(tolerance)
    per_tag: dict[str, dict[str, float]] = {}
    n_examples = n_tags = n_met = strict = loose = 0
    examples = []
    for i, (tags, text) in enumerate(pairs):
        if not tags:
            raise ValueError(f"example {i} has no tags")
        unknown = [k for k in tags if k not in FEATURES]
        if unknown:
            raise ValueError(f"example {i} has unknown tags {unknown}")
        if not isinstance(text, str):
            raise ValueError(f"example {i}: generated text is a {type(text).__name__}, not a string")
        measured = extract_features(text, backend)
        met = {}
        for name in (f for f in FEATURES if f in tags):
            ok, err = tag_met(name, tags[name], measured[name], tol, quantizer)
            met[name] = ok
            acc = per_tag.setdefault(name, {"n": 0, "met": 0, "abs": 0.0, "sq": 0.0})
            acc["n"] += 1
            acc["met"] += ok
            acc["abs"] += abs(err)
            acc["sq"] += err * err
        n_examples += 1
        n_tags += len(met)
        n_met += sum(met.values())
        strict += all(met.values())
        loose += any(met.values())
        if keep_examples:
            examples.append({"requested": dict(tags), "measured": {k: measured[k] for k in met}, "met": met})
    if n_examples == 0:
        raise ValueError("no examples to evaluate")
    report = {
        "n_examples": n_examples,
        "n_tags": n_tags,
        "zero_one_score": n_met / n_tags,
        "strictly_followed": strict / n_examples,
        "loosely_followed": loose / n_examples,
        "per_tag": {
            name: {
                "n": int(a["n"]),
                "accuracy": a["met"] / a["n"],
                "mae": a["abs"] / a["n"],
                "mse": a["sq"] / a["n"],
            }
            for name, a in sorted(per_tag.items(), key=lambda kv: FEATURES.index(kv[0]))
        },
        "tolerance": tol,
        "quantized": quantizer.to_dict() if quantizer is not None else None,
        "backend": backend,
    }
    if keep_examples:
        report["examples"] = examples
    return report


def format_table(report: Mapping) -> str:
    """A readable, column-aligned text table of a report."""
    head = (
        f"examples {report['n_examples']}  tags {report['n_tags']}  "
        f"zero_one_score {report['zero_one_score']:.4f}  strictly_followed {report['strictly_followed']:.4f}  "
        f"loosely_followed {report['loosely_followed']:.4f}"
    )
    rows = [("tag", "n", "accuracy", "mae", "mse")]
    for name, s in report["per_tag"].items():
        rows.append((name, str(s["n"]), f"{s['accuracy']:.4f}", f"{s['mae']:.4f}", f"{s['mse']:.4f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = [head]
    for j, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, 5)]))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(report: Mapping, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")


def run_eval(
    pairs: Iterable[tuple[Mapping[str, float], str]], out_path: str, *, print_table: bool = True, **kwargs
) -> tuple[dict, str]:
    """evaluate + write the JSON report + (print and) return the table."""
    report = evaluate(pairs, **kwargs)
    write_report(report, out_path)
    table = format_table(report)
    if print_table:
        print(table)
    return report, table


def read_pairs(path: str) -> list[tuple[dict, str]]:
    """(requested tags, generated text) per JSON line of ``path``: ``tags`` (a dict) or the ``[name: value]``
    tags in ``input``, and ``output``; ValueError naming the line that lacks ``output``."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            tags = row.get("tags")
            if tags is None:
                tags = parse_tags(row.get("input") or "")
            if "output" not in row:
                raise ValueError(f"{path}:{line_no}: no 'output' field")
            pairs.append((tags, row["output"]))
    return pairs
