"""CPO: Contrastive Preference Optimization (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the
Boundaries of LLM Performance in Machine Translation", arXiv 2401.08417; docs/methods_preference.md, `cpo`).

DPO with the reference dropped (the paper's uniform-reference approximation), on the policy's own log-probs:

    z_i = beta * [log pi(y_w) - log pi(y_l)]
    sigmoid (the paper's Eq. 3; eps > 0 is the conservative, label-smoothed form):
            loss_i = -(1 - eps) log sigma(z_i) - eps log sigma(-z_i)
    hinge:  loss_i = max(0, 1 - z_i)
    ipo:    loss_i = (h_i - 1/(2 beta))^2 with h_i the difference of per-token AVERAGE log-probs

Sum log-probs for sigmoid and hinge, averages for ipo, as TRL's CPOTrainer (the authors' implementation was
merged there). The paper's behaviour-cloning term, NLL of the chosen response, is a token-mean over the chosen
tokens of the batch: exactly tunelab's ``ntp`` loss in a preference batch, so a recipe composes it (TRL's
``cpo_alpha`` is its weight; the paper uses 1):

    loss:
      cpo: {beta: 0.1}
      ntp: {weight: 1.0}

Rewards (logged, detached) are beta * the log-probs used by the loss (sum, or average for ipo), as TRL logs them.
"""

from __future__ import annotations

import torch

from tunelab.data.contract import STAT_LOGIT_MEAN, ForwardOutputs, Needs
from tunelab.losses.base import Metric, PairwiseLoss, preference_metrics
from tunelab.losses.dpo import check_beta, check_label_smoothing, smoothed_sigmoid
from tunelab.losses.registry import register_loss

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@register_loss("cpo")
class CPOLoss(PairwiseLoss):
    """Reference-free DPO on the policy's log-probs (Xu et al. 2024); the NLL term is a composed ``ntp``.

    Options:
    - ``beta``: 0.1, the paper's and TRL's CPOConfig default.
    - ``loss_type``: sigmoid (the paper's Eq. 3) | hinge | ipo.
    - ``label_smoothing``: eps of the conservative sigmoid form; 0 = none.
    """
    needs = Needs(pairs=True, token_stats=frozenset({STAT_LOGIT_MEAN}))

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown cpo loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        self.beta = check_beta(beta)
        self.loss_type = loss_type
        self.label_smoothing = check_label_smoothing(label_smoothing, loss_type)

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        average = self.loss_type == "ipo"
        logps = out.seq_avg_logps if average else out.seq_logps
        chosen, rejected = logps[out.chosen], logps[out.rejected]
        margin = chosen - rejected
        if self.loss_type == "sigmoid":
            losses = smoothed_sigmoid(self.beta * margin, self.label_smoothing)
        elif self.loss_type == "hinge":
            losses = torch.relu(1.0 - self.beta * margin)
        else:
            losses = (margin - 1.0 / (2.0 * self.beta)) ** 2
        metrics = preference_metrics(out, self.beta * chosen.detach(), self.beta * rejected.detach(),
                                     average_logps=average)
        return losses, metrics
