"""SimPO: Simple Preference Optimization with a reference-free reward (Meng, Xia & Chen 2024, arXiv 2405.14734;
princeton-nlp/SimPO). docs/methods_preference.md (simpo).

With per-token average log-probs (avg logp = sum logp / |y|, EOS included) and no reference model:

    u_i = avg logp(y_w) - avg logp(y_l),    gamma = beta * gamma_beta_ratio
    sigmoid: loss_i = -(1 - eps) log sigma(beta u_i - gamma) - eps log sigma(-(beta u_i - gamma))
    hinge:   loss_i = max(0, 1 - (beta u_i - gamma))

averaged over the pairs of the optimizer step. Defaults are those of the authors' SimPOConfig (beta 2.0,
gamma_beta_ratio 0.25, label smoothing 0, sigmoid). Label smoothing applies to ``sigmoid`` only (an error
with ``hinge``, where the authors' trainer warns and ignores it).

Rewards (logged, detached) are beta * avg logp, without gamma; ``logps/*`` are per-token averages.

``sft_weight``: the authors' trainer adds ``sft_weight * CE`` where CE is ``nn.CrossEntropyLoss()`` over the
chosen responses' labels, i.e. a token-mean over every chosen token of the batch, not a mean of per-pair
means. In tunelab that term is exactly the ``ntp`` loss (in a preference batch it trains on chosen tokens,
averaged over the step's chosen tokens: docs/methods.md (NTP / SFT)), which has its own unit, so a recipe composes it:

    loss:
      simpo: {beta: 2.0, gamma_beta_ratio: 0.5}
      ntp: {weight: <sft_weight>}

``simpo.sft_weight`` is accepted only as 0 and otherwise raises an error that shows this composition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.contract import STAT_LOGIT_MEAN, ForwardOutputs, Needs
from tunelab.losses.base import Metric, PairwiseLoss, preference_metrics
from tunelab.losses.dpo import check_beta
from tunelab.losses.registry import register_loss

LOSS_TYPES = ("sigmoid", "hinge")


@register_loss("simpo")
class SimPOLoss(PairwiseLoss):
    """SimPO: length-normalised, reference-free reward with a target margin (Meng et al. 2024).

    Options:
    - ``beta``: reward scale; 2.0 is the authors' SimPOConfig default (paper settings use 2.0-10).
    - ``gamma_beta_ratio``: the margin gamma as a fraction of beta; 0.25 is the authors' default.
    - ``label_smoothing``: eps of the smoothed sigmoid (sigmoid only); 0 = none.
    - ``loss_type``: sigmoid (the paper) | hinge.
    - ``sft_weight``: only 0; the authors' SFT term is a composed ``ntp`` (this module's docstring).
    """
    needs = Needs(pairs=True, token_stats=frozenset({STAT_LOGIT_MEAN}))

    def __init__(self, beta: float = 2.0, gamma_beta_ratio: float = 0.25, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid", sft_weight: float = 0.0):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown simpo loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        self.beta = check_beta(beta)
        self.gamma_beta_ratio = float(gamma_beta_ratio)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        if loss_type == "sigmoid" and not 0.0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"simpo label_smoothing must lie in [0, 0.5], got {self.label_smoothing}")
        if loss_type == "hinge" and self.label_smoothing != 0.0:
            raise ValueError("simpo label_smoothing has no meaning for loss_type=hinge")
        if float(sft_weight) != 0.0:
            raise ValueError(
                f"simpo.sft_weight={sft_weight}: SimPO's SFT term is a token-mean NLL over chosen tokens, which is "
                "the `ntp` loss; compose it in the recipe instead: "
                f"loss: {{simpo: {{...}}, ntp: {{weight: {sft_weight}}}}}"
            )

    @property
    def gamma(self) -> float:
        return self.beta * self.gamma_beta_ratio

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        avg = out.seq_avg_logps
        chosen, rejected = avg[out.chosen], avg[out.rejected]
        z = self.beta * (chosen - rejected) - self.gamma
        if self.loss_type == "sigmoid":
            eps = self.label_smoothing
            losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        else:
            losses = torch.relu(1.0 - z)
        rewards = self.beta * chosen.detach(), self.beta * rejected.detach()
        metrics = preference_metrics(out, *rewards, average_logps=True)
        return losses, metrics
