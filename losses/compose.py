"""A weighted sum of loss terms, optionally with a per-pair weighting, built from the recipe's ``loss`` block.

Config shape (each key of ``loss`` is a registered loss name, or any label whose ``type`` names one, so one
loss can appear in several terms; ``weight`` scales that term, default 1)::

    loss:
      dpo: {beta: 0.1}
      ntp: {weight: 1.0}          # DPO + NLL without new code
    pair_weighting: {name: wpo, alignment: sampled}   # or null

    loss:                          # MPO (Wang et al. 2024): three weighted terms, two of them DPO loss types
      dpo: {loss_type: sigmoid, weight: 0.8}
      bco: {type: dpo, loss_type: bco_pair, weight: 0.2}
      ntp: {weight: 1.0}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tunelab.data.contract import ForwardOutputs
from tunelab.losses.base import Metric
from tunelab.losses.registry import LOSSES, PAIR_WEIGHTINGS, lookup


class LossSet:
    def __init__(self, terms: list[tuple[str, float, object]], pair_weighting=None):
        if not terms:
            raise ValueError(f"the recipe's `loss` block is empty; name at least one of: {', '.join(sorted(LOSSES))}")
        self.terms = terms
        self.pair_weighting = pair_weighting
        needs = terms[0][2].needs  # not Needs(): its defaults (token_logps) would outvote a term that declines them
        for _, _, loss in terms[1:]:
            needs = needs | loss.needs
        if pair_weighting is not None:
            if not needs.pairs:
                raise ValueError("pair_weighting needs a pairwise loss (dpo, simpo, ...) in `loss`")
            needs = needs | pair_weighting.needs
        self.needs = needs

    def __call__(self, out: ForwardOutputs) -> tuple[dict[str, torch.Tensor], dict[str, Metric]]:
        """Returns {unit: weighted sum of the terms counted in that unit} and the metrics of all terms."""
        metrics: dict[str, Metric] = {}
        if self.pair_weighting is not None:
            weights, weight_metrics = self.pair_weighting(out)
            out = out.with_pair_weights(weights)
            metrics.update(weight_metrics)
        sums: dict[str, torch.Tensor] = {}
        for name, weight, loss in self.terms:
            result = loss(out)
            sums[result.unit] = sums.get(result.unit, 0.0) + weight * result.total
            metrics[f"{name}/loss"] = Metric(result.total.detach().float(), unit=result.unit)
            for key, metric in result.metrics.items():
                metrics[key if "/" in key else f"{name}/{key}"] = metric
        return sums, metrics


    @property
    def stateful(self) -> bool:
        return any(loss.stateful for _, _, loss in self.terms)

    def after_step(self, step_metrics: dict[str, float]) -> None:
        """Hand each stateful term its own metrics of the applied step (reduced over micro-batches and ranks)."""
        for name, _, loss in self.terms:
            if loss.stateful:
                loss.after_step({key[len(name) + 1:]: value for key, value in step_metrics.items()
                                 if key.startswith(f"{name}/")})

    def state_dict(self) -> dict:
        """The stateful terms' state by term name, for ``accelerator.register_for_checkpointing``."""
        return {name: loss.state_dict() for name, _, loss in self.terms if loss.stateful}

    def load_state_dict(self, state: dict) -> None:
        mine = {name for name, _, loss in self.terms if loss.stateful}
        if set(state) != mine:
            raise ValueError(f"the checkpoint holds loss state for {sorted(state)}, this run's stateful loss terms "
                             f"are {sorted(mine)}")
        for name, _, loss in self.terms:
            if loss.stateful:
                loss.load_state_dict(state[name])


def build_loss(loss_cfg: Mapping, pair_weighting_cfg: Mapping | None = None) -> LossSet:
    terms = []
    for name, options in (loss_cfg or {}).items():
        options = dict(options or {})
        weight = float(options.pop("weight", 1.0))
        cls = lookup(LOSSES, options.pop("type", name), "loss")
        try:
            terms.append((name, weight, cls(**options)))
        except TypeError as err:
            raise TypeError(f"bad options for loss {name!r}: {err}") from None
    pair_weighting = None
    if pair_weighting_cfg:
        options = dict(pair_weighting_cfg)
        name = options.pop("name", None)
        cls = lookup(PAIR_WEIGHTINGS, name, "pair_weighting")
        pair_weighting = cls(**options)
    return LossSet(terms, pair_weighting)
