"""DPO and its classic variants: sigmoid (DPO / cDPO), IPO, robust DPO, hinge (METHODS.md §2).

With sum log-probs over response tokens and the frozen reference's log-probs (no gradient),

    Delta_i = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]

and per pair i (the core averages over the pairs of the optimizer step):

- ``sigmoid`` (Rafailov et al. 2023, arXiv 2305.18290), with label smoothing eps giving conservative DPO
  (cDPO, Mitchell 2023):  -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta),  eps in [0, 0.5].
- ``robust`` (Chowdhury et al. 2024, arXiv 2403.00409), an unbiased loss under label noise of rate eps:
  [-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps),  eps in [0, 0.5).
- ``hinge`` (SLiC-style; Zhao et al. 2023, arXiv 2305.10425):  max(0, 1 - beta Delta).
- ``ipo`` (Azar et al. 2023, arXiv 2310.12036, Eq. 17 with tau = beta):  (h - 1/(2 beta))^2, where h is the
  *length-normalised* difference of log-ratios: h = [log-ratio(y_w)] / |y_w| - [log-ratio(y_l)] / |y_l|. TRL's
  DPOTrainer (1.16) normalises the same way (per-token averages of the sum log-ratios); the paper's equation
  has sequence-level log-ratios, and the per-token form is the one the IPO authors confirmed to TRL.

Label smoothing applies to ``sigmoid`` and ``robust`` only; asking for it with ``hinge`` or ``ipo`` is an
error rather than silently ignored. Implicit rewards (logged, detached) are beta * (log pi - log ref) with
sum log-probs, for every loss type (as TRL logs them). ``logps/*`` are sum log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.base import STAT_LOGIT_MEAN, ForwardOutputs, Metric, Needs, PairwiseLoss, preference_metrics
from losses.registry import register_loss

LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"{name} must be > 0, got {beta}")
    return beta


def check_label_smoothing(eps: float, loss_type: str) -> float:
    eps = float(eps)
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5] for loss_type=sigmoid (cDPO), got {eps}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type=robust (it divides by 1 - 2 eps), "
                         f"got {eps}")
    if loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"label_smoothing has no meaning for loss_type={loss_type}; use sigmoid (cDPO) or robust")
    return eps


def reference_logps(out: ForwardOutputs) -> torch.Tensor:
    if out.ref_seq_logps is None:
        raise RuntimeError("this loss needs reference log-probs but the batch has none (reference.strategy?)")
    return out.ref_seq_logps.to(out.seq_logps.dtype)


@register_loss("dpo")
class DPOLoss(PairwiseLoss):
    needs = Needs(pairs=True, reference=True, token_stats=frozenset({STAT_LOGIT_MEAN}))

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        self.beta = check_beta(beta)
        self.loss_type = loss_type
        self.label_smoothing = check_label_smoothing(label_smoothing, loss_type)

    def preference_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        """The DPO-family loss of each pair and the rewards/logps/logits metrics."""
        ref = reference_logps(out)
        ratios = out.seq_logps - ref  # [S] log pi - log ref, with gradient through log pi only
        chosen, rejected = ratios[out.chosen], ratios[out.rejected]
        beta, eps = self.beta, self.label_smoothing
        if self.loss_type == "ipo":
            lengths = out.seq_tokens.clamp(min=1)
            h = chosen / lengths[out.chosen] - rejected / lengths[out.rejected]
            losses = (h - 1.0 / (2.0 * beta)) ** 2
        else:
            z = beta * (chosen - rejected)
            if self.loss_type == "sigmoid":
                losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            elif self.loss_type == "robust":
                losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
            else:  # hinge
                losses = torch.relu(1.0 - z)
        metrics = preference_metrics(out, beta * chosen.detach(), beta * rejected.detach(), average_logps=False)
        return losses, metrics

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        return self.preference_losses(out)

