"""Bradley-Terry reward-model loss on (chosen, rejected) scalar rewards, with optional margin and centering.

The ``reward`` loss trains a reward model with tunelab's core: it declares ``Needs(sequence_scores=True,
token_logps=False)``, so the model is built as a sequence classifier (the causal LM's body and a one-output linear
``score`` head), the forward reads the head at each response's last token (transformers' rule: the rightmost
token that is not pad) in any layout, packed or shared-prompt, and computes no LM-head logits. The export is an
``AutoModelForSequenceClassification`` that scores a prompt + response exactly as training did. Formula and
sources: docs/evaluation.md (reward models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.contract import ForwardOutputs, Needs
from tunelab.losses.base import Metric, PairwiseLoss, mean_metric
from tunelab.losses.registry import register_loss


def bradley_terry_pair_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, Metric]]:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2, and metrics.

    The margin is the per-pair rating gap of Llama 2's reward model (Touvron et al. 2023, section 3.2.2, eq. 2);
    the centering term with coefficient c pulls the pair's summed reward towards zero so rewards stay on one scale
    across runs (Eisenstein et al. 2023, "Helping or Herding?", section 3; TRL's ``center_rewards_coefficient``,
    0.01 there). Averaged over pairs, this is TRL 1.16's RewardTrainer loss.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.ndim != 1:
        raise ValueError(f"rewards must be two [P] tensors, got {tuple(chosen_rewards.shape)} and "
                         f"{tuple(rejected_rewards.shape)}")
    difference = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(difference if margin is None else difference - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    metrics = {
        "rewards/chosen": mean_metric(chosen_rewards),
        "rewards/rejected": mean_metric(rejected_rewards),
        "rewards/accuracies": mean_metric((difference > 0).float()),
        "rewards/margins": mean_metric(difference),
    }
    return losses, metrics


@register_loss("reward")
class RewardLoss(PairwiseLoss):
    """Bradley-Terry reward model on the score head, -log sigmoid(r_chosen - r_rejected [- margin]) per pair.

    Options:
    - ``center_rewards_coefficient``: c of the centering term c * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023;
      TRL's RewardConfig, which suggests 0.01); 0 = none, TRL's default.
    - ``margin_column``: a per-example column holding Llama 2's rating margin (Touvron et al. 2023, eq. 2),
      subtracted inside the sigmoid; null = no margin. A data stage or the source must provide the column.
    """

    def __init__(self, center_rewards_coefficient: float = 0.0, margin_column: str | None = None):
        self.center = float(center_rewards_coefficient)
        if self.center < 0:
            raise ValueError(f"reward center_rewards_coefficient must be >= 0, got {self.center}")
        self.margin_column = margin_column
        self.needs = Needs(pairs=True, sequence_scores=True, token_logps=False,
                           columns=frozenset({margin_column}) if margin_column else frozenset())

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        scores = out.seq_scores
        margin = out.seq_columns[self.margin_column][out.chosen] if self.margin_column else None
        return bradley_terry_pair_losses(scores[out.chosen], scores[out.rejected], margin, self.center)
