"""Integration: tiny-model SFT learns; accumulation/normalisation exactness; resume; export; bad config."""

from __future__ import annotations

import math
import os

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import make_cfg, read_metrics

from trainers import checkpoint
from trainers.trainer import NonFiniteError, Trainer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(tmp_path, name, *overrides, fit=True):
    cfg = make_cfg([f"output_dir={tmp_path / name}", "export.enabled=false", *overrides])
    trainer = Trainer(cfg, recipe_name="sft")
    return trainer, (trainer.fit() if fit else None)


def test_tiny_sft_loss_falls(tmp_path):
    _, summary = run(tmp_path, "learn", "train.max_steps=30", "train.eval_every=0")
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"] - 1.0
    assert os.path.exists(tmp_path / "learn" / "config.yaml")
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "learn"))]
    assert losses[-1] < losses[0]


def one_step_params(tmp_path, name, micro):
    trainer, _ = run(tmp_path, name, "train.global_batch_size=8", f"train.micro_batch_size={micro}",
                     "train.optimizer=sgd", "train.lr=1.0", "train.max_grad_norm=null", "train.scheduler=constant",
                     "train.warmup_steps=0", "train.max_steps=1", "train.eval_every=0", fit=False)
    trainer.evaluate = lambda: {}
    batches = trainer._step_batches(0)
    trainer.fit()
    params = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
    return params, batches, trainer


def test_accumulation_gives_the_update_of_one_big_batch(tmp_path):
    big, big_batches, _ = one_step_params(tmp_path, "big", 8)
    small, small_batches, trainer = one_step_params(tmp_path, "small", 2)
    assert len(big_batches) == 1 and len(small_batches) == 4
    # micro-batches hold different numbers of labelled tokens, so a per-micro-batch mean would differ
    tokens = [b["counts"]["target_tokens"] for b in small_batches]
    assert len(set(tokens)) > 1
    torch.testing.assert_close(small, big, atol=2e-6, rtol=1e-5)
    # and the logged step loss is the token mean over the whole global batch
    logged = read_metrics(str(tmp_path / "small"))[0]["loss"]
    assert logged == pytest.approx(read_metrics(str(tmp_path / "big"))[0]["loss"], abs=1e-5)


class Killed(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    common = ["train.max_steps=6", "train.log_every=1", "train.save_every=3", "train.eval_every=0"]
    run(tmp_path, "straight", *common)
    save = checkpoint.save

    def save_then_die(accelerator, output_dir, step, state, keep_last):
        save(accelerator, output_dir, step, state, keep_last)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path, "resumed", *common)
    monkeypatch.setattr(checkpoint, "save", save)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run(tmp_path, "resumed", *common, "resume=latest")
    straight = [r["loss"] for r in read_metrics(str(tmp_path / "straight"))]
    resumed = [r["loss"] for r in read_metrics(str(tmp_path / "resumed"))]
    assert len(straight) == 6 and len(resumed) == 6
    assert resumed == pytest.approx(straight, abs=1e-6)


def test_checkpoints_rotate_and_are_complete(tmp_path):
    run(tmp_path, "rot", "train.max_steps=6", "train.save_every=2", "train.keep_last=2", "train.eval_every=0")
    names = sorted(os.listdir(tmp_path / "rot" / "checkpoints"))
    assert names == ["step_0000004", "step_0000006"]
    assert os.path.exists(tmp_path / "rot" / "checkpoints" / "step_0000006" / "trainer_state.json")


def test_export_loads_with_from_pretrained_and_matches(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, _ = run(tmp_path, "exp", "train.max_steps=2", "train.eval_every=0", "export.enabled=true")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "export")
    tok = AutoTokenizer.from_pretrained(tmp_path / "exp" / "export")
    ids = torch.tensor([tok("The sky is blue.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.policy.model(ids).logits)


def test_lora_export_writes_adapter_and_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer, _ = run(tmp_path, "lora", "train.max_steps=2", "train.eval_every=0", "export.enabled=true",
                     "model.lora.enabled=true", "model.lora.r=4")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "export")
    assert os.path.exists(tmp_path / "lora" / "export_adapter" / "adapter_model.safetensors")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trainer.policy.model(ids).logits, atol=1e-5, rtol=1e-5)
    assert PeftModel  # adapter dir is a peft adapter (loaded in test above via export_adapter files)


def test_nonfinite_loss_stops_with_a_message_or_is_skipped(tmp_path):
    with pytest.raises(NonFiniteError, match="train.on_nonfinite=skip"):
        run(tmp_path, "nan", "train.max_steps=3", "train.eval_every=0", "train.lr=1e30", "train.max_grad_norm=null",
            "train.optimizer=sgd", "train.warmup_steps=0")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    _, summary = run(tmp_path, "nan_skip", "train.max_steps=3", "train.eval_every=0", "train.lr=1e30",
                     "train.max_grad_norm=null", "train.optimizer=sgd", "train.warmup_steps=0",
                     "train.on_nonfinite=skip")
    assert summary["skipped_steps"] >= 1


def poison_gradients_at(trainer, bad_steps):
    """Gradients of one weight become NaN during the optimizer steps numbered in bad_steps (1-based) while the
    loss stays finite: the case a loss-only check misses."""
    first = next(p for p in trainer.policy.parameters() if p.requires_grad)
    first.register_hook(lambda grad: grad * math.nan if trainer.step + 1 in bad_steps else grad)


def exported_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


def checkpoint_weights(step_dir):
    from safetensors.torch import load_file

    return load_file(str(step_dir / "model.safetensors"))


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_nan_gradient_with_finite_loss_stops_before_the_optimizer_step(tmp_path, clip):
    trainer, _ = run(tmp_path, "stop", "train.max_steps=4", "train.save_every=1", "train.eval_every=0",
                     f"train.max_grad_norm={clip}", fit=False)
    poison_gradients_at(trainer, {3})
    with pytest.raises(NonFiniteError, match="gradient norm is nan at step 3 .*no weight was changed"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    saved = sorted(os.listdir(tmp_path / "stop" / "checkpoints"))
    assert saved == ["step_0000001", "step_0000002"]
    for name in saved:
        weights = checkpoint_weights(tmp_path / "stop" / "checkpoints" / name)
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_gradient_is_skipped_and_counted_and_never_exported(tmp_path):
    trainer, _ = run(tmp_path, "skip", "train.max_steps=4", "train.eval_every=0", "train.log_every=1",
                     "train.on_nonfinite=skip", "export.enabled=true", fit=False)
    poison_gradients_at(trainer, {2})
    before_skip = {}
    original = trainer.train_step

    def train_step(accum):
        if trainer.step == 1:
            before_skip.update({n: p.detach().clone() for n, p in trainer.policy.named_parameters()})
        loss = original(accum)
        if trainer.step == 1:  # the skipped step changed no weight and did not advance the schedule
            for name, param in trainer.policy.named_parameters():
                torch.testing.assert_close(param.detach(), before_skip[name], rtol=0, atol=0)
        return loss

    trainer.train_step = train_step
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    assert all(torch.isfinite(t).all() for t in exported_weights(tmp_path / "skip").values())
    lrs = [r["lr"] for r in read_metrics(str(tmp_path / "skip"))]
    assert lrs[1] == lrs[0]  # no scheduler step on the skipped step
    assert [r["skipped_steps"] for r in read_metrics(str(tmp_path / "skip"))[1:]] == [1, 1, 1]


def test_nonfinite_weights_are_never_checkpointed_or_exported(tmp_path):
    trainer, _ = run(tmp_path, "nanw", "train.max_steps=2", "train.eval_every=0", "train.on_nonfinite=skip",
                     "export.enabled=true", fit=False)
    with torch.no_grad():
        next(iter(trainer.policy.parameters())).fill_(math.nan)
    with pytest.raises(NonFiniteError, match="refusing to write the step-2 checkpoint at step 2: 1 parameter"):
        trainer.fit()
    assert not os.path.exists(tmp_path / "nanw" / "checkpoints" / "step_0000002")
    assert not os.path.exists(tmp_path / "nanw" / "export")


def test_inconsistent_batch_sizes_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=10 is not a multiple of train.micro_batch_size=4"):
        run(tmp_path, "bad", "train.global_batch_size=10", "train.micro_batch_size=4", fit=False)


def test_trackers_work_offline_and_the_loss_plot_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, "track", "train.max_steps=2", "train.log_every=1", "train.eval_every=0", "train.plot=true",
        "train.trackers=[tensorboard,wandb]")
    out = tmp_path / "track"
    assert (out / "loss_curves.png").stat().st_size > 1000
    event_files = [f for _, _, files in os.walk(out) for f in files if f.startswith("events.out.tfevents")]
    assert event_files
    assert any(d.startswith("offline-run") for d in os.listdir(out / "wandb"))


def test_unknown_tracker_is_rejected(tmp_path):
    with pytest.raises(KeyError, match="valid: wandb, tensorboard"):
        run(tmp_path, "badtrack", "train.max_steps=1", "train.trackers=[mlflow]")
