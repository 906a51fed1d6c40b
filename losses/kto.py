"""KTO, Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306), on unpaired labelled completions.

With sum log-probs over completion tokens, the implicit reward of a completion y to prompt x is the log-ratio
``r(x, y) = log pi(y|x) - log ref(y|x)``. The reference point z0 is the policy's KL from the reference, estimated on
mismatched pairs (x, y'), the prompt with another example's completion (data/unpaired.py builds them):

    z0 = max(0, mean over the micro-batch's mismatched sequences of r(x, y')),  detached (no gradient)

and each labelled completion's loss (paper Eq. 7, the value function without the constant lambda_y):

    desirable:    w_d * (1 - sigmoid(beta * (r(x, y) - z0)))
    undesirable:  w_u * (1 - sigmoid(beta * (z0 - r(x, y))))

averaged over the desirable and undesirable completions of the optimizer step (TRL 1.16 ``KTOTrainer``: the mean
of the weighted losses of a batch). Defaults beta 0.1, w_d = w_u = 1 (TRL 1.16 ``KTOConfig``; the paper's beta).
The paper's guidance for imbalanced data (Sec. 4.2, Eq. 8): w_d * n_d / (w_u * n_u) in [1, 4/3]; the data pipeline
logs the training split's label counts with the weights that satisfy it (data/unpaired.label_balance_note), as TRL
does when the counts differ.

z0 is a statistic of the micro-batch, not a sum over items, so the core cannot spread it over the optimizer step as
it does the loss sums: it is estimated per micro-batch on each rank. TRL estimates it per micro-batch as well, and
additionally averages the per-process estimates over processes (``gather_for_metrics(kl).mean()``); with one
process and no gradient accumulation the two are identical, and tests/test_kto.py checks that against TRL.
"""

from __future__ import annotations

import torch

from tunelab.data.contract import (
    ROLE_DESIRABLE,
    ROLE_MISMATCHED,
    ROLE_UNDESIRABLE,
    STAT_LOGIT_MEAN,
    UNIT_UNPAIRED,
    ForwardOutputs,
    Needs,
)
from tunelab.losses.base import Loss, LossOutput, Metric, mean_metric
from tunelab.losses.dpo import check_beta, reference_logps
from tunelab.losses.registry import register_loss


@register_loss("kto")
class KTOLoss(Loss):
    """KTO on unpaired completions labelled desirable / undesirable (docs/methods_preference.md, `kto`).

    Options:
    - ``beta``: scale of the implicit reward inside the sigmoid; 0.1, the paper's and TRL 1.16's default.
    - ``desirable_weight``: w_d, the weight of a desirable completion's loss; TRL's default 1.0.
    - ``undesirable_weight``: w_u, the weight of an undesirable completion's loss; TRL's default 1.0. Pick the pair so
      that w_d n_d / (w_u n_u) lies in [1, 4/3] (paper Sec. 4.2); the data log names the range for the counts.
    """

    needs = Needs(unpaired=True, reference=True, token_stats=frozenset({STAT_LOGIT_MEAN}))

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta = check_beta(beta)
        self.desirable_weight = check_beta(desirable_weight, "desirable_weight")
        self.undesirable_weight = check_beta(undesirable_weight, "undesirable_weight")

    def reference_point(self, ratios: torch.Tensor, role: torch.Tensor) -> torch.Tensor:
        """z0: the mean log-ratio of the mismatched sequences, detached, clamped at 0."""
        mismatched = ratios.detach()[role == ROLE_MISMATCHED]
        if mismatched.numel() == 0:
            return ratios.new_zeros(())
        return mismatched.mean().clamp(min=0)

    def __call__(self, out: ForwardOutputs) -> LossOutput:
        role = out.seq_role
        ratios = out.seq_logps - reference_logps(out)
        z0 = self.reference_point(ratios, role)
        desirable, undesirable = role == ROLE_DESIRABLE, role == ROLE_UNDESIRABLE
        losses_d = self.desirable_weight * (1.0 - torch.sigmoid(self.beta * (ratios[desirable] - z0)))
        losses_u = self.undesirable_weight * (1.0 - torch.sigmoid(self.beta * (z0 - ratios[undesirable])))
        rewards = self.beta * ratios.detach()
        # every (desirable, undesirable) couple of the micro-batch: does the implicit reward rank them right?
        margins = (rewards[desirable][:, None] - rewards[undesirable][None, :]).flatten()
        metrics = {
            "rewards/chosen": mean_metric(rewards[desirable]),
            "rewards/rejected": mean_metric(rewards[undesirable]),
            "rewards/accuracies": mean_metric((margins > 0).float()),
            "rewards/margins": mean_metric(margins),
            "logps/chosen": mean_metric(out.seq_logps[desirable]),
            "logps/rejected": mean_metric(out.seq_logps[undesirable]),
            "kl": Metric(z0.float()),
        }
        if STAT_LOGIT_MEAN in out.token_stats:
            token_role = role[out.token_seq]
            logits = out.token_stats[STAT_LOGIT_MEAN]
            metrics["logits/chosen"] = mean_metric(logits[token_role == ROLE_DESIRABLE])
            metrics["logits/rejected"] = mean_metric(logits[token_role == ROLE_UNDESIRABLE])
        return LossOutput(losses_d.sum() + losses_u.sum(), UNIT_UNPAIRED, metrics)
