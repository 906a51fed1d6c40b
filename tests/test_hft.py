"""Half Fine-Tuning: the paper's per-layer selection, the frozen half untouched (weights and optimizer moments) for a
whole stage, new draws at stage boundaries, and a resume mid-stage equal to the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg, read_metrics
from test_layout import tiny_model

from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.hft import ATTENTION, FEED_FORWARD, HalfFineTuning, hft_options
from tunelab.trainers.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def four_layer_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=4,
                         num_attention_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def leaves(names, layer: int) -> set[str]:
    prefix = f"model.layers.{layer}."
    return {n[len(prefix):].split(".")[1] for n in names if n.startswith(prefix) and "norm" not in n}


@pytest.mark.parametrize("stage", range(5))
def test_selection_is_the_papers_per_layer_half(stage):
    model = four_layer_model()
    hft = HalfFineTuning(model.named_parameters(), {}, seed=3)
    trained = hft.trained(stage)
    two_ff = 0
    for layer in range(4):
        chosen = leaves(trained, layer)
        assert len(chosen & set(ATTENTION)) == 2  # 2 of q/k/v/o in every layer
        ff = len(chosen & set(FEED_FORWARD))
        assert ff in (1, 2)
        two_ff += ff == 2
        norms = {n for n in trained if n.startswith(f"model.layers.{layer}.") and "norm" in n}
        assert len(norms) == 1  # one of the layer's two norms (others: half)
    assert two_ff == 2  # half of the layers train 2 of 3 feed-forward projections, the other half 1
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    layer_params = {n for n in sizes if ".layers." in n and "norm" not in n}
    assert sum(sizes[n] for n in trained & layer_params) == sum(sizes[n] for n in layer_params) / 2  # exactly half
    fraction = sum(sizes[n] for n in trained) / sum(sizes.values())
    assert 0.3 < fraction < 0.7


def test_others_option_and_bad_options():
    model = four_layer_model()
    outside = {n for n, _ in model.named_parameters() if ".layers." not in n or "norm" in n}
    assert outside <= HalfFineTuning(model.named_parameters(), {"others": "train"}, 0).trained(0)
    assert not outside & HalfFineTuning(model.named_parameters(), {"others": "freeze"}, 0).trained(0)
    with pytest.raises(ValueError, match="stage_steps must be a positive integer"):
        hft_options({"stage_steps": 0})
    with pytest.raises(ValueError, match=r"unknown train.hft option\(s\) \['stage'\]"):
        hft_options({"stage": 2})
    with pytest.raises(ValueError, match="q/k/v/o and gate/up/down"):
        HalfFineTuning(torch.nn.Linear(2, 2).named_parameters(), {}, 0)


def test_draws_depend_on_seed_and_stage_only():
    model = tiny_model().model
    a = HalfFineTuning(model.named_parameters(), {"stage_steps": 2}, seed=1)
    b = HalfFineTuning(model.named_parameters(), {"stage_steps": 2}, seed=1)
    assert [a.trained(s) for s in range(6)] == [b.trained(s) for s in range(6)]
    assert len({a.trained(s) for s in range(6)}) > 1
    assert [a.stage(t) for t in range(5)] == [0, 0, 1, 1, 2]
    assert HalfFineTuning(model.named_parameters(), {}, seed=1).stage(10 ** 6) == 0  # one stage: one draw


# ---- in training runs ----------------------------------------------------------------------------------------------

def run(tmp_path, name, *overrides, steps=4):
    cfg = make_cfg([f"output_dir={tmp_path / name}", "export.enabled=false", f"train.max_steps={steps}",
                    "train.eval_every=0", "train.eval_at_start=false", "train.log_every=1",
                    "train.global_batch_size=8", "train.micro_batch_size=4", "train.scheduler=constant",
                    "train.warmup_steps=0", "train.weight_decay=0.1", *overrides])
    return Trainer(cfg, recipe_name=name)


def snapshot(trainer):
    params = dict(trainer.half_fine_tuning.params)
    state = trainer.optimizer.optimizer.state
    moments = {n: {k: v.clone() for k, v in state[p].items()} if p in state else None for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}, moments


@pytest.mark.slow
def test_frozen_half_is_untouched_for_its_stage_and_changes_at_the_boundary(tmp_path):
    trainer = run(tmp_path, "stages", "train.hft={stage_steps:2}")
    hft = trainer.half_fine_tuning
    before, _ = snapshot(trainer)
    trainer.train_step()
    after_1, moments_1 = snapshot(trainer)
    trainer.train_step()
    after_2, moments_2 = snapshot(trainer)
    frozen = set(hft.params) - hft.trained(0)
    assert frozen and hft.trained(0) != hft.trained(1)
    for name in frozen:  # weights bit-identical (weight decay 0.1 not applied), no optimizer state created
        assert torch.equal(after_2[name], before[name]) and moments_2[name] is None
    for name in hft.trained(0):
        assert not torch.equal(after_1[name], before[name]) and not torch.equal(after_2[name], after_1[name])
        assert moments_2[name]["step"].item() == 2
    assert hft.applied_steps() == 2
    trainer.train_step()  # stage 1: its own half trains, the rest (incl. what stage 0 trained) keeps its moments
    after_3, moments_3 = snapshot(trainer)
    for name in set(hft.params) - hft.trained(1):
        assert torch.equal(after_3[name], after_2[name])
        if moments_2[name] is not None:
            assert all(torch.equal(moments_3[name][k], moments_2[name][k]) for k in moments_2[name])
    for name in hft.trained(1):
        assert not torch.equal(after_3[name], after_2[name])


@pytest.mark.slow
def test_resume_mid_stage_equals_the_uninterrupted_run(tmp_path):
    option = "train.hft={stage_steps:3}"
    straight = run(tmp_path, "straight", option, steps=5)
    straight.fit()
    reset_accelerate()
    run(tmp_path, "resumed", option, "train.save_every=2", steps=2).fit()  # stops inside stage 0
    reset_accelerate()
    resumed = run(tmp_path, "resumed", option, "resume=latest", steps=5)
    resumed.fit()
    assert resumed.half_fine_tuning.applied_steps() == 5
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "resumed"))]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(str(tmp_path / "straight"))], abs=1e-6)
    for name, param in straight.half_fine_tuning.params.items():
        torch.testing.assert_close(resumed.half_fine_tuning.params[name], param, atol=1e-6, rtol=0)
