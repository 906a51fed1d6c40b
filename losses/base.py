"""What every loss module builds on: the ``Loss`` base class, its ``LossOutput`` and logged ``Metric``s.

The core runs one forward pass and hands a loss a ``ForwardOutputs`` (data/contract.py): per-token and per-sequence
log-probabilities of the labelled (response) tokens, plus whatever optional quantities the loss declared in
its ``Needs``. A loss returns a *sum* over its items and names the unit those items are counted in
(``tokens``, ``pairs``, ...); the core divides by the count of that unit over the whole optimizer step
(all micro-batches, all ranks), so gradient accumulation and data parallelism give the same update as one big
batch. The core never looks at a loss's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from tunelab.data.contract import (
    ROLE_CHOSEN,
    ROLE_REJECTED,
    STAT_LOGIT_MEAN,
    UNIT_PAIRS,
    ForwardOutputs,
    Needs,
)


@dataclass
class Metric:
    """A logged quantity: ``value`` is a sum over ``count`` items (reduce="mean"), or an extreme.

    With ``unit`` set, the sum is divided by the step's count of that unit instead (how loss terms are logged).
    """

    value: torch.Tensor | float
    count: float = 1.0
    reduce: str = "mean"  # "mean" | "min" | "max"
    unit: str | None = None


@dataclass
class LossOutput:
    total: torch.Tensor  # sum over items of the per-item loss
    unit: str  # one of UNITS: what the sum is averaged over across the optimizer step
    metrics: dict[str, Metric] = field(default_factory=dict)


def mean_metric(values: torch.Tensor) -> Metric:
    values = values.detach().float()
    return Metric(values.sum(), values.numel())


class Loss:
    """Base class. Subclasses set ``needs`` and implement ``__call__``; options are constructor kwargs.

    A loss with state across steps (BCO's running reward shift) sets ``stateful``; after every applied optimizer
    step the core then calls ``after_step`` with the loss's own metrics of that step, reduced over its micro-batches
    and ranks (keys without the term's name), and saves ``state_dict()`` in every checkpoint.
    """

    needs: ClassVar[Needs] = Needs()
    stateful: bool = False

    def __call__(self, out: ForwardOutputs) -> LossOutput:
        raise NotImplementedError

    def after_step(self, step_metrics: dict[str, float]) -> None:
        """Update the state from one applied optimizer step's metrics (stateful losses only)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (stateful losses only)."""


class PairwiseLoss(Loss):
    """A loss defined per (chosen, rejected) pair: subclasses implement ``pair_losses``.

    If a pair weighting (WPO) has set ``out.pair_weights``, each pair's loss is multiplied by its weight and
    the result is still averaged over pairs (WPO's definition: not divided by the sum of weights).
    """

    needs: ClassVar[Needs] = Needs(pairs=True)

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        raise NotImplementedError

    def __call__(self, out: ForwardOutputs) -> LossOutput:
        losses, metrics = self.pair_losses(out)
        if out.pair_weights is not None:
            losses = losses * out.pair_weights
        return LossOutput(losses.sum(), UNIT_PAIRS, metrics)


def preference_metrics(
    out: ForwardOutputs, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, average_logps: bool,
    logps: torch.Tensor | None = None,
) -> dict[str, Metric]:
    """The rewards/*, logps/* and logits/* metrics every preference loss logs (docs/methods_preference.md (dpo));
    ``logps`` [S] replaces the sums or averages where a loss reweights its log-probs (LD-DPO)."""
    if logps is None:
        logps = out.seq_avg_logps if average_logps else out.seq_logps
    metrics = {
        "rewards/chosen": mean_metric(chosen_rewards),
        "rewards/rejected": mean_metric(rejected_rewards),
        "rewards/accuracies": mean_metric((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": mean_metric(chosen_rewards - rejected_rewards),
        "logps/chosen": mean_metric(logps[out.chosen]),
        "logps/rejected": mean_metric(logps[out.rejected]),
    }
    if STAT_LOGIT_MEAN in out.token_stats:
        role = out.seq_role[out.token_seq]
        logits = out.token_stats[STAT_LOGIT_MEAN]
        metrics["logits/chosen"] = mean_metric(logits[role == ROLE_CHOSEN])
        metrics["logits/rejected"] = mean_metric(logits[role == ROLE_REJECTED])
    return metrics
