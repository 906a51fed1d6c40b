"""A new method plugs in without core edits: a data stage and a loss defined only in this file, the loss reading a
per-example column that the stage adds (declared in its ``Needs.columns``), train through the unchanged Trainer,
and the first step's loss equals a naive computation from the model's full logits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_cfg
from tunelab.data.contract import UNIT_SEQUENCES, ForwardOutputs, Needs
from tunelab.data.stages import register_stage
from tunelab.losses.base import Loss, LossOutput
from tunelab.losses.registry import register_loss
from tunelab.trainers.trainer import Trainer


@register_stage("test_response_length_weight", "examples")
def add_response_length_weight(dataset, split, seed, context, scale: float = 1.0):
    """weight = scale * (1 + response tokens mod 3): a different number for neighbouring examples."""
    return dataset.map(lambda ex: {"weight": scale * (1 + sum(ex["target_mask"]) % 3)})


@register_loss("test_weighted_sequence_nll")
class WeightedSequenceNLL(Loss):
    """sum over sequences of weight * (-log p(response)), averaged over sequences."""

    needs = Needs(columns=frozenset({"weight"}))

    def __call__(self, out: ForwardOutputs) -> LossOutput:
        return LossOutput(-(out.seq_columns["weight"] * out.seq_logps).sum(), UNIT_SEQUENCES)


def naive_weighted_nll(model, examples: list[dict]) -> float:
    """The same objective from the full-vocabulary log-softmax of each example run on its own."""
    total = 0.0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logps = torch.log_softmax(model(ids).logits[0].double(), -1)
            labelled = [t for t in range(1, len(ex["input_ids"])) if ex["target_mask"][t]]
            total -= ex["weight"] * sum(float(logps[t - 1, ex["input_ids"][t]]) for t in labelled)
    return total / len(examples)


def test_a_loss_reads_a_column_a_stage_adds_and_trains_through_the_unchanged_core(tmp_path):
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
    assert batch["seq_columns"]["weight"].tolist() == [ex["weight"] for ex in examples[:4]]
    assert trainer.train_step().loss == pytest.approx(expected, rel=1e-5)
