"""The Bradley-Terry reward loss against hand-computed values and TRL 1.16's RewardTrainer.compute_loss."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tunelab.losses.reward import bradley_terry_pair_losses

trl = pytest.importorskip("trl")

CHOSEN = torch.tensor([1.0, 0.0, 2.0])
REJECTED = torch.tensor([0.0, 0.5, -1.0])


def softplus(x):
    return math.log1p(math.exp(x))


def test_hand_values_plain_margin_and_centering():
    losses, metrics = bradley_terry_pair_losses(CHOSEN, REJECTED)
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -0.5, 3
    assert losses.tolist() == pytest.approx([softplus(-1.0), softplus(0.5), softplus(-3.0)], abs=1e-6)
    assert float(metrics["rewards/accuracies"].value) / metrics["rewards/accuracies"].count == pytest.approx(2 / 3)
    assert float(metrics["rewards/margins"].value) / metrics["rewards/margins"].count == pytest.approx(3.5 / 3)

    margin = torch.tensor([0.5, 0.0, 4.0])
    losses, _ = bradley_terry_pair_losses(CHOSEN, REJECTED, margin=margin)
    assert losses.tolist() == pytest.approx([softplus(-0.5), softplus(0.5), softplus(1.0)], abs=1e-6)

    losses, _ = bradley_terry_pair_losses(CHOSEN, REJECTED, center_coefficient=0.1)
    # + 0.1 * (c + r)^2 with sums 1, 0.5, 1
    assert losses.tolist() == pytest.approx([softplus(-1.0) + 0.1, softplus(0.5) + 0.025, softplus(-3.0) + 0.1],
                                            abs=1e-6)


class _FixedRewards(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


def _trl_loss(chosen, rejected, margin, center):
    """TRL's own compute_loss on a stand-in model whose logits are the given rewards ([chosen; rejected] rows)."""
    logits = torch.cat([chosen, rejected]).unsqueeze(-1)
    model = _FixedRewards(logits).train()
    identity = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=identity, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(center_rewards_coefficient=center), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = trl.RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("margin,center", [(None, None), (torch.tensor([0.5, 0.0, 4.0]), None), (None, 0.01)])
def test_parity_with_trl_reward_trainer(margin, center):
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5), torch.randn(5)
    if margin is not None:
        margin = torch.rand(5)
    theirs, their_metrics = _trl_loss(chosen, rejected, margin, center)
    losses, metrics = bradley_terry_pair_losses(chosen, rejected, margin=margin, center_coefficient=center or 0.0)
    assert losses.mean().item() == pytest.approx(theirs.item(), abs=1e-6)
    for ours, name in (("rewards/accuracies", "accuracy"), ("rewards/margins", "margin")):
        assert float(metrics[ours].value) / metrics[ours].count == pytest.approx(their_metrics[name][0], abs=1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"two \[P\] tensors"):
        bradley_terry_pair_losses(CHOSEN, REJECTED[:2])
