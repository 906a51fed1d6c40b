"""Bradley-Terry reward-model loss on (chosen, rejected) scalar rewards, with optional margin and centering."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.losses.base import Metric, mean_metric


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
