"""RPO: Regularized Preference Optimization (Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF:
Your SFT Loss is Implicitly an Adversarial Regularizer", arXiv 2405.16436; YSLIU627/Regularized-Preference-
Optimization). docs/methods_preference.md (rpo).

DPO plus eta times an SFT term on the chosen response (the paper's "baseline distribution" instantiated as
the chosen responses). The authors' repository has two variants:

- ``cumulative`` (main paper; alignment-handbook code):  loss_i = DPO_i - eta * beta * logp(y_w), with the
  same (non-detached) log-probs as the DPO term: the sum over the response's tokens, except with
  ``loss_type: ipo``, where the authors' trainer (``alignment-handbook/scripts/rpo_trainer.py``,
  ``concatenated_forward``) divides every sequence log-prob by its token count before both the IPO term and the
  SFT term, so the SFT term is -eta * beta * avg logp(y_w) (still times beta).
- ``average`` (appendix F; OpenRLHF code):  L = mean_i DPO_i + eta * mean_i [-avg logp(y_w)], the per-token
  average NLL of each chosen response, averaged over pairs, with no beta factor.

Both are per-pair, so either composes with a pair weighting (WPO multiplies the whole per-pair loss). The DPO
term takes every ``dpo`` option (``beta``, ``loss_type``, ``label_smoothing``): the authors' cumulative code
subtracts the SFT term after whichever DPO loss type is configured.

Name clash: TRL's ``rpo_alpha`` is *Iterative* RPO (Pang et al. 2024, "Iterative Reasoning Preference
Optimization", arXiv 2404.19733): DPO + alpha * NLL of the chosen response averaged over its tokens (in TRL a
token-mean over the batch's chosen tokens). That is a different method with a different normalisation; in
tunelab it is written without new code as ``loss: {dpo: {...}, ntp: {weight: alpha}}``. The ``rpo`` loss here
always means Liu et al.

Metrics: those of DPO (rewards = beta * log-ratio, sum logps) plus ``rpo/sft``, the regulariser's value per
pair before the eta factor (cumulative: -beta * sum logp(y_w), or -beta * avg logp(y_w) with IPO; average:
-avg logp(y_w)).
"""

from __future__ import annotations

import torch

from tunelab.data.contract import ForwardOutputs
from tunelab.losses.base import Metric, mean_metric
from tunelab.losses.dpo import DPOLoss
from tunelab.losses.registry import register_loss

VARIANTS = ("cumulative", "average")


@register_loss("rpo")
class RPOLoss(DPOLoss):
    """DPO plus eta times an SFT term on the chosen response (Liu et al. 2024).

    Options:
    - ``beta``, ``loss_type``, ``label_smoothing``: the DPO term's, as for ``dpo``.
    - ``eta``: weight of the SFT regulariser; 0.005 is the authors' alignment-handbook setting.
    - ``variant``: cumulative (main paper, DPO - eta * beta * logp(y_w)) | average (appendix F, token-mean NLL).
    """
    def __init__(self, beta: float = 0.1, eta: float = 0.005, variant: str = "cumulative",
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        super().__init__(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        if variant not in VARIANTS:
            raise ValueError(f"unknown rpo variant {variant!r}; valid: {', '.join(VARIANTS)}")
        self.eta = float(eta)
        if self.eta < 0:
            raise ValueError(f"rpo eta must be >= 0, got {self.eta}")
        self.variant = variant

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        losses, metrics = self.preference_losses(out)
        if self.variant == "cumulative":
            logps = out.seq_avg_logps if self.loss_type == "ipo" else out.seq_logps
            sft = -self.beta * logps[out.chosen]
        else:
            sft = -out.seq_avg_logps[out.chosen]
        metrics["rpo/sft"] = mean_metric(sft)
        return losses + self.eta * sft, metrics
