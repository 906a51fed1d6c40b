"""A new method plugs in without core edits: a data stage, a token statistic and a loss defined only in this file,
the loss reading a per-example column that the stage adds (``Needs.columns``) and the new statistic
(``Needs.token_stats``), train through the unchanged Trainer, and the first step's loss equals a naive computation
from the model's full logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import make_cfg
from tunelab.data.contract import UNIT_SEQUENCES, ForwardOutputs, Needs, register_token_statistic
from tunelab.data.stages import register_stage
from tunelab.losses.base import Loss, LossOutput
from tunelab.losses.registry import register_loss
from tunelab.trainers.forward import fused_head_supported, target_logps
from tunelab.trainers.trainer import Trainer

# Entropy of the next-token distribution, declared with its logits form only (the fused head calls it per chunk).
STAT_TEST_ENTROPY = register_token_statistic(
    "test_entropy", lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1))


@register_stage("test_response_length_weight", "examples")
def add_response_length_weight(dataset, split, seed, context, scale: float = 1.0):
    """weight = scale * (1 + response tokens mod 3): a different number for neighbouring examples."""
    return dataset.map(lambda ex: {"weight": scale * (1 + sum(ex["target_mask"]) % 3)})


@register_loss("test_weighted_sequence_nll")
class WeightedSequenceNLL(Loss):
    """sum over tokens of weight(sequence) * exp(-entropy_t) * (-log p(y_t)), averaged over sequences: confident
    positions count more."""

    needs = Needs(columns=frozenset({"weight"}), token_stats=frozenset({STAT_TEST_ENTROPY}))

    def __call__(self, out: ForwardOutputs) -> LossOutput:
        token_weight = out.seq_columns["weight"][out.token_seq] * torch.exp(-out.token_stats[STAT_TEST_ENTROPY])
        return LossOutput(-(token_weight * out.token_logps).sum(), UNIT_SEQUENCES)


def naive_weighted_nll(model, examples: list[dict]) -> float:
    """The same objective from the full-vocabulary log-softmax of each example run on its own."""
    total = 0.0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logps = torch.log_softmax(model(ids).logits[0].double(), -1)
            entropy = -(logps.exp() * logps).sum(-1)
            labelled = [t for t in range(1, len(ex["input_ids"])) if ex["target_mask"][t]]
            total -= ex["weight"] * sum(float(torch.exp(-entropy[t - 1]) * logps[t - 1, ex["input_ids"][t]])
                                        for t in labelled)
    return total / len(examples)


def test_a_loss_reads_a_new_column_and_statistic_and_trains_through_the_unchanged_core(tmp_path):
    cfg = make_cfg(["~loss.ntp", "+loss.test_weighted_sequence_nll={}", f"output_dir={tmp_path / 'run'}",
                    "+data.stages=[{name: test_response_length_weight, scale: 0.5}]", "train.max_steps=1",
                    "train.eval_every=0", "train.eval_at_start=false", "export.enabled=false",
                    "train.global_batch_size=8", "train.micro_batch_size=4"])
    trainer = Trainer(cfg)
    order = trainer.ordering(trainer.train_ds, cfg.seed, 0)
    examples = [trainer.train_ds[i] for i in order[:8]]
    weights = {ex["weight"] for ex in examples}
    assert len(weights) > 1 and weights <= {0.5, 1.0, 1.5}  # the stage's column, with more than one value
    expected = naive_weighted_nll(trainer.accelerator.unwrap_model(trainer.policy).model, examples)
    batch = trainer._step_batches(0)[0]
    assert batch.seq_columns["weight"].tolist() == [ex["weight"] for ex in examples[:4]]
    assert trainer.train_step().loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_a_registered_statistic_is_computed_by_both_lm_head_paths(fused):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(8, 29, bias=False)
    head.weight.data.copy_(torch.randn(29, 8, generator=g))
    hidden, targets = torch.randn(11, 8, generator=g), torch.randint(0, 29, (11,), generator=g)
    assert fused_head_supported(head)
    _, stats = target_logps(head, hidden, targets, 4, [STAT_TEST_ENTROPY], fused=fused)
    logps = torch.log_softmax(hidden.double() @ head.weight.double().t(), -1)
    torch.testing.assert_close(stats[STAT_TEST_ENTROPY].double(), -(logps.exp() * logps).sum(-1), rtol=0, atol=1e-5)


def test_an_unregistered_statistic_is_a_clear_error():
    head = nn.Linear(4, 5, bias=False)
    with pytest.raises(ValueError, match="unknown token statistics.*'no_such_stat'.*register_token_statistic"):
        target_logps(head, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 4, ["no_such_stat"])
