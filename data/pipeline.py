"""Recipe ``data`` block -> tokenized train and eval datasets, with counts of what was dropped and why.

Steps: load each source (its ``columns`` renamed; ``format: auto``, the default, picks the one format its columns
fit and logs it); keep its ``weight`` fraction of rows (alignment-handbook's dataset_mixer semantics: 0.5 keeps a
seeded half, 2.0 repeats it twice); split off eval rows (a source's own ``eval_split``, else a seeded
``eval_fraction``); drop and count pairs whose chosen and rejected responses are the same text; tokenize with
prompt masking; drop and count bad or over-long rows; then run the data stages the recipe names (e.g. SFTMix
confidence split, MCTune controls). Every dropped row is counted under the kind of its problem (``RowError.kind``,
an unreadable line's kind, ``identical responses``, ``too long``), with one example of each kind; the kinds'
counts add up to the rows dropped. A column of the source rows that the loss names in ``Needs.columns`` (e.g. the
``chosen_reward`` / ``rejected_reward`` of an on-policy pairs file, which the ``optune`` pair weighting reads) is
kept on the examples, NaN for a source that lacks it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import datasets
import pyarrow as pa
from omegaconf import OmegaConf

import tunelab.data.ifd  # noqa: F401  (registers the ifd_select stage)
import tunelab.data.mctune  # noqa: F401  (registers the mctune stage)
import tunelab.data.sftmix  # noqa: F401  (registers the sftmix_split stage and sftmix_pairs ordering)
from tunelab.data.formats import PAIR_FORMATS, RowError, detect_format
from tunelab.data.sources import expand_short_form, load_rows
from tunelab.data.stages import stages_at
from tunelab.data.templates import build_template, formatting_options
from tunelab.data.tokenize import tokenize_row, validate_data_config
from tunelab.data.unpaired import unpaired_examples

log = logging.getLogger(__name__)

IDENTICAL = "identical responses"
TOO_LONG = "too long (data.truncation=drop)"


@dataclass
class DroppedKind:
    count: int
    example: str  # "<file> row <n>: <reason>" of the first row dropped for this kind


class DataCounts(Counter):
    """Rows per ``<split>/<status>`` (ok, truncated, error, too_long, identical, unreadable), and in ``dropped``
    the rows dropped per kind of problem, each with one example."""

    def __init__(self):
        super().__init__()
        self.dropped: dict[str, DroppedKind] = {}

    def drop(self, kind: str, count: int, example: str) -> None:
        if kind in self.dropped:
            self.dropped[kind].count += count
        else:
            self.dropped[kind] = DroppedKind(count, example)

    def dropped_summary(self) -> str:
        total = sum(d.count for d in self.dropped.values())
        kinds = "; ".join(f"{kind} {d.count} (e.g. {d.example})" for kind, d in
                          sorted(self.dropped.items(), key=lambda item: -item[1].count))
        return f"dropped {total} rows: {kinds}" if total else "dropped 0 rows"


def _apply_weight(ds: datasets.Dataset, weight: float, seed: int) -> datasets.Dataset:
    if weight <= 0:
        raise ValueError(f"data source weight must be > 0, got {weight}")
    whole, frac = int(weight), weight - int(weight)
    parts = [ds] * whole
    if frac > 0:
        parts.append(ds.shuffle(seed=seed).select(range(int(round(frac * len(ds))))))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _split(ds: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if not fraction:
        return ds, None
    parts = ds.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def weighted_split(
    rows: datasets.Dataset, spec, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """A source's rows repeated/subsampled by its ``weight``, then (train, eval) rows: eval is None when the
    source names its own ``eval_split`` (the caller loads it) or ``eval_fraction`` is 0, else a seeded split."""
    rows = _apply_weight(rows, float(spec.get("weight", 1.0)), seed)
    if spec.get("eval_split"):
        return rows, None
    return _split(rows, eval_fraction, seed)


def _column_kind(arrow_type) -> str | None:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and pa.types.is_struct(
            arrow_type.value_type):
        return "turns"
    return None


def _resolve_format(spec, rows: datasets.Dataset, kind: str) -> str:
    """The source's ``format``; for ``auto`` (or none given) the one format its columns fit, logged."""
    fmt = spec.get("format") or "auto"
    if fmt != "auto":
        return fmt
    schema = rows.features.arrow_schema
    kinds = {field.name: _column_kind(field.type) for field in schema if field.name not in ("_source", "_row")}
    try:
        fmt, why = detect_format(kinds, rows[0] if len(rows) else {}, kind)
    except RowError as err:
        raise ValueError(f"source {spec.path} (format: auto): {err}") from None
    log.info("%s: format auto -> %s (%s)", spec.path, fmt, why)
    return fmt


def _same_responses(row: dict, converter) -> bool:
    try:
        _, chosen, rejected = converter(row)
    except RowError:
        return False  # a bad row: tokenization reports it with its reason
    return chosen["content"] == rejected["content"]


def _drop_identical_pairs(ds, spec, data_cfg, counts: DataCounts, split: str):
    """A pair whose responses are one text has no preference in it: a pairwise loss gets a constant with zero
    gradient from it, yet it counts in the batch's pairs and thins every other pair's weight."""
    if spec.format not in PAIR_FORMATS or len(ds) == 0:
        return ds  # an unknown format is reported by tokenization, with the valid ones
    same = ds.map(lambda row: {"same": _same_responses(row, PAIR_FORMATS[spec.format])}, remove_columns=ds.column_names,
                  num_proc=data_cfg.get("num_proc") or None, desc=f"identical pairs {spec.path} ({split})")["same"]
    dropped = [i for i, is_same in enumerate(same) if is_same]
    if dropped:
        first = ds[dropped[0]]
        counts[f"{split}/identical"] += len(dropped)
        counts.drop(IDENTICAL, len(dropped), f"{first['_source']} row {first['_row']}")
        log.warning("%s (%s): dropped %d pairs whose chosen and rejected responses are identical", spec.path,
                    split, len(dropped))
    return ds.select([i for i, is_same in enumerate(same) if not is_same]) if dropped else ds


def _tokenize(ds, spec, kind, template, tokenizer, data_cfg, counts: DataCounts, split: str, keep=frozenset()):
    fmt = spec.format
    if kind in ("pairs", "unpaired"):
        ds = _drop_identical_pairs(ds, spec, data_cfg, counts, split)
    columns = [c for c in ds.column_names if c not in ("_source", "_row") and c not in keep]
    ds = ds.map(
        tokenize_row,
        fn_kwargs=dict(kind=kind, fmt=fmt, template=template, tokenizer=tokenizer, data_cfg=data_cfg),
        remove_columns=columns,
        num_proc=data_cfg.get("num_proc") or None,
        desc=f"tokenize {spec.path} ({split})",
    )
    status = Counter(ds["status"])
    if status["error"]:
        bad = ds.filter(lambda r: r["status"] == "error")
        if data_cfg.on_error != "skip":
            first = bad[0]
            raise ValueError(
                f"{first['_source']} row {first['_row']}: {first['error']} "
                f"({status['error']} bad rows in this source; set data.on_error=skip to drop and count them)"
            )
        _count_by_kind(bad, bad["error_kind"], spec, split, counts)
    if status["too_long"]:
        long_rows = ds.filter(lambda r: r["status"] == "too_long")
        _count_by_kind(long_rows, [TOO_LONG] * len(long_rows), spec, split, counts)
    counts.update({f"{split}/{k}": v for k, v in status.items()})
    return ds.filter(lambda r: r["status"] in ("ok", "truncated")).remove_columns(["status", "error", "error_kind"])


def _with_loss_columns(parts: list, columns) -> list:
    """The sources' examples with every loss column that any source kept (NaN where a source lacks it), so that
    they concatenate."""
    kept = sorted({name for part in parts for name in part.column_names if name in columns})
    out = []
    for part in parts:
        for name in kept:
            if name not in part.column_names:
                part = part.add_column(name, [float("nan")] * len(part))
        out.append(part)
    return out


def _count_by_kind(dropped, kinds: list[str], spec, split: str, counts: DataCounts) -> None:
    """Count ``dropped`` rows per kind of problem, keeping the first of each as the example, and log each kind."""
    first_of_kind: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        first_of_kind.setdefault(kind, i)
    per_kind = Counter(kinds)
    for kind, n in per_kind.most_common():
        row = dropped[first_of_kind[kind]]
        reason = row["error"] or "the example does not fit data.max_length"
        example = f"{row['_source']} row {row['_row']}: {reason}"
        counts.drop(kind, n, example)
        log.warning("%s (%s): dropped %d rows, %s; e.g. %s", spec.path, split, n, kind, example)


def _count_unreadable(lines, split: str, counts: DataCounts) -> None:
    counts[f"{split}/unreadable"] += len(lines)
    for line in lines:
        counts.drop(line.kind, 1, f"{line.where}: {line.reason}")
    for kind, n in Counter(line.kind for line in lines).items():
        log.warning("%s: skipped %d unreadable lines, %s; e.g. %s", split, n, kind,
                    next(f"{line.where}: {line.reason}" for line in lines if line.kind == kind))


def build_datasets(data_cfg, tokenizer, kind: str, seed: int, columns=frozenset()):
    """Returns (train, eval or None, counts). ``kind`` is 'sft', 'pairs' or 'unpaired' (what the loss needs;
    unpaired examples come from data/unpaired.py, each with its mismatched completion). ``columns``: the loss's
    ``Needs.columns``; those the source rows hold are kept on the examples."""
    expand_short_form(data_cfg)
    validate_data_config(data_cfg, kind)
    if data_cfg.on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error={data_cfg.on_error!r}; valid: raise, skip")
    template = build_template(data_cfg.template, tokenizer, **formatting_options(data_cfg))
    counts = DataCounts()
    train_parts, eval_parts = [], []
    for i, spec in enumerate(data_cfg.sources):
        spec = OmegaConf.create(OmegaConf.to_container(spec, resolve=True))
        rows, unreadable = load_rows(spec, data_cfg.on_error)
        _count_unreadable(unreadable, "train", counts)
        spec.format = _resolve_format(spec, rows, kind)
        rows, eval_rows = weighted_split(rows, spec, data_cfg.get("eval_fraction", 0.0), seed + i)
        if spec.get("eval_split"):
            eval_rows, unreadable = load_rows(OmegaConf.merge(spec, {"split": spec.eval_split}), data_cfg.on_error)
            _count_unreadable(unreadable, "eval", counts)
        for stage, options in stages_at("rows", data_cfg.get("stages")):
            rows = stage(rows, split="train", seed=seed + i, **options)
            eval_rows = stage(eval_rows, split="eval", seed=seed + i, **options) if eval_rows is not None else None
        keep = frozenset(columns) & set(rows.column_names)
        train_parts.append(_tokenize(rows, spec, kind, template, tokenizer, data_cfg, counts, "train", keep))
        if eval_rows is not None:
            eval_parts.append(_tokenize(eval_rows, spec, kind, template, tokenizer, data_cfg, counts, "eval", keep))
    train = datasets.concatenate_datasets(_with_loss_columns(train_parts, columns))
    evaluation = datasets.concatenate_datasets(_with_loss_columns(eval_parts, columns)) if eval_parts else None
    if kind == "unpaired":
        train = unpaired_examples(train, seed, data_cfg.max_length)
        evaluation = unpaired_examples(evaluation, seed, data_cfg.max_length, split="eval")
    for stage, options in stages_at("examples", data_cfg.get("stages")):
        train = stage(train, split="train", seed=seed, **options)
        evaluation = stage(evaluation, split="eval", seed=seed, **options) if evaluation is not None else None
    if len(train) == 0:
        raise ValueError(f"no training examples left after filtering: {dict(counts)}")
    log.info("data: %d train / %d eval examples; %s; %s", len(train), len(evaluation or []),
             dict(sorted(counts.items())), counts.dropped_summary())
    return train, evaluation, counts
