"""ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee & Thorne 2024, arXiv 2403.07691;
xfactlab/orpo). docs/methods_preference.md (orpo).

With P(y) = exp(avg logp(y)) (per-token average, EOS included) and no reference model:

    log odds(y) = log P(y) - log(1 - P(y)) = avg logp(y) - log1mexp(avg logp(y))
    log OR_i    = log odds(y_w) - log odds(y_l)
    L_OR        = mean_i [-log sigma(log OR_i)]
    L_ORPO      = L_SFT + lambda * L_OR,    lambda = 0.1 (paper and authors' scripts)

This module is the odds-ratio term ``lambda * L_OR`` only. L_SFT is the NLL of the chosen response, a token
mean over the chosen tokens of the batch in both the authors' code (the HF model's ``outputs.loss``) and TRL's
ORPOTrainer; a token mean has its own unit (labelled tokens), so it is the ``ntp`` term of the recipe:

    loss:
      ntp: {}                 # L_SFT
      orpo: {lambda: 0.1}     # lambda * L_OR

and the ``orpo`` recipe contains both. Differences, documented: the authors' first release and TRL compute the
NLL over the prompt *and* the response tokens of the chosen sequence; tunelab's ``ntp`` trains on response
tokens only, which is the paper's definition (Eq. 2: the NLL of y_w given x) and the authors' later
``disable_prompt_loss`` option.

Stability: log1mexp(x) = log(1 - exp(x)) for x < 0 is computed as log(-expm1(x)) for x > -ln 2 and
log1p(-exp(x)) otherwise (Maechler 2012), in float64. An average log-prob of exactly 0 (P = 1) would give
log(0): x is capped at -1e-12 inside log1mexp only, so the loss and its gradient stay finite.

Metrics: rewards = lambda * avg logp (TRL's convention), logps/* per-token averages, ``orpo/log_odds_ratio``
(mean log OR; TRL calls it ``log_odds_chosen``) and ``orpo/log_sigmoid_odds_ratio`` (mean log sigma(log OR);
TRL's ``log_odds_ratio``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tunelab.data.contract import STAT_LOGIT_MEAN, ForwardOutputs, Needs
from tunelab.losses.base import Metric, PairwiseLoss, mean_metric, preference_metrics
from tunelab.losses.registry import register_loss

LOG_HALF = -math.log(2.0)
MAX_AVG_LOGP = -1e-12


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    x = x.clamp(max=MAX_AVG_LOGP)
    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x.clamp(max=LOG_HALF))))


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    return avg_logps - log1mexp(avg_logps)


@register_loss("orpo")
class ORPOLoss(PairwiseLoss):
    """ORPO's odds-ratio term lambda * L_OR (Hong et al. 2024); L_SFT is a composed ``ntp``.

    Options:
    - ``lambda``: weight of the odds-ratio term, default 0.1 (the paper and the authors' scripts).
    """
    needs = Needs(pairs=True, token_stats=frozenset({STAT_LOGIT_MEAN}))

    def __init__(self, **options):
        lam = float(options.pop("lambda", 0.1))
        if options:
            raise TypeError(f"unexpected option(s) {', '.join(sorted(options))}; valid: lambda")
        if lam < 0:
            raise ValueError(f"orpo lambda must be >= 0, got {lam}")
        self.lam = lam

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        avg = out.seq_avg_logps.double()
        chosen, rejected = avg[out.chosen], avg[out.rejected]
        ratio = log_odds(chosen) - log_odds(rejected)
        log_sigmoid = F.logsigmoid(ratio)
        losses = (-self.lam * log_sigmoid).to(out.seq_logps.dtype)
        metrics = preference_metrics(out, self.lam * chosen.detach(), self.lam * rejected.detach(), average_logps=True)
        metrics["orpo/log_odds_ratio"] = mean_metric(ratio)
        metrics["orpo/log_sigmoid_odds_ratio"] = mean_metric(log_sigmoid)
        return losses, metrics
