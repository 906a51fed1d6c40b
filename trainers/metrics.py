"""Accumulation of logged metrics over micro-batches, steps and ranks (sums, counts, extremes)."""

from __future__ import annotations

import torch

from tunelab.losses.base import Metric


class MetricAccumulator:
    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.units: dict[str, str | None] = {}
        self.extremes: dict[str, tuple[str, float]] = {}
        self.unit_counts: dict[str, float] = {}

    def add(self, metrics: dict[str, Metric]) -> None:
        for name, metric in metrics.items():
            value = float(metric.value) if not isinstance(metric.value, float) else metric.value
            if metric.reduce == "mean":
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0.0) + float(metric.count)
                self.units[name] = metric.unit
            else:
                pick = min if metric.reduce == "min" else max
                old = self.extremes.get(name)
                self.extremes[name] = (metric.reduce, value if old is None else pick(old[1], value))

    def add_units(self, counts: dict[str, float]) -> None:
        for unit, n in counts.items():
            self.unit_counts[unit] = self.unit_counts.get(unit, 0.0) + n

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's sums, counts and extremes (one step's into its logging interval's)."""
        for name, total in other.sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.counts[name] = self.counts.get(name, 0.0) + other.counts[name]
            self.units[name] = other.units[name]
        for name, (kind, value) in other.extremes.items():
            old = self.extremes.get(name)
            pick = min if kind == "min" else max
            self.extremes[name] = (kind, value if old is None else pick(old[1], value))
        self.add_units(other.unit_counts)

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over all ranks (the same metric names on every rank, in the same order)."""
        names = sorted(self.sums)
        units = sorted(self.unit_counts)
        flat = torch.tensor([self.sums[n] for n in names] + [self.counts[n] for n in names]
                            + [self.unit_counts[u] for u in units], dtype=torch.float64, device=accelerator.device)
        flat = accelerator.reduce(flat, reduction="sum")
        k = len(names)
        sums, counts = flat[:k].tolist(), flat[k:2 * k].tolist()
        unit_totals = dict(zip(units, flat[2 * k:].tolist()))
        out = {}
        for name, total, count in zip(names, sums, counts):
            unit = self.units[name]
            denominator = unit_totals.get(unit, 0.0) if unit else count
            if denominator > 0:
                out[name] = total / denominator
        for name in sorted(self.extremes):
            kind, value = self.extremes[name]
            t = torch.tensor([value if kind == "max" else -value], dtype=torch.float64, device=accelerator.device)
            if accelerator.num_processes > 1:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            out[name] = float(t) if kind == "max" else -float(t)
        return out
