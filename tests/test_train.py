"""Integration: tiny-model SFT learns; accumulation/normalisation exactness; resume; export; bad config."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import make_cfg, read_metrics
from omegaconf import OmegaConf

from tunelab.trainers import checkpoint
from tunelab.trainers import trainer as trainer_module
from tunelab.trainers.config_check import ConfigError
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.models import build_model
from tunelab.trainers.tracking import RunTracker, format_summary, metrics_figure
from tunelab.trainers.trainer import NonFiniteError, StepResult, Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
    tokens = [b.counts["target_tokens"] for b in small_batches]
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
    reset_accelerate()
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
                     "model.lora.enabled=true", "model.lora.r=4", fit=False)
    # the run trains a LoRA adapter: only adapter weights learn (a silently full fine-tune would fail here)
    trained = trainer.accelerator.unwrap_model(trainer.policy).model
    assert isinstance(trained, PeftModel)
    learning = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert learning and all("lora_" in n for n in learning)
    # all-linear at r=4: A [4, in] and B [out, 4] beside every linear layer of the plain model except the LM head
    plain = build_model(OmegaConf.merge(trainer.cfg.model, {"lora": {"enabled": False}}), trainer.tokenizer, 0)
    head = plain.get_output_embeddings()
    expected = sum(4 * (m.in_features + m.out_features) for m in plain.modules()
                   if isinstance(m, torch.nn.Linear) and m is not head)
    assert sum(p.numel() for p in trained.parameters() if p.requires_grad) == expected > 0
    trainer.fit()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "export")
    assert os.path.exists(tmp_path / "lora" / "export_adapter" / "adapter_model.safetensors")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trainer.policy.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_nonfinite_loss_stops_with_a_message_or_is_skipped(tmp_path):
    with pytest.raises(NonFiniteError, match="train.on_nonfinite=skip"):
        run(tmp_path, "nan", "train.max_steps=3", "train.eval_every=0", "train.lr=1e30", "train.max_grad_norm=null",
            "train.optimizer=sgd", "train.warmup_steps=0")
    reset_accelerate()
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
    results = []

    def train_step():
        if trainer.step == 1:
            before_skip.update({n: p.detach().clone() for n, p in trainer.policy.named_parameters()})
        result = original()
        results.append(result)
        if result.skipped:  # the skipped step changed no weight and did not advance the schedule
            for name, param in trainer.policy.named_parameters():
                torch.testing.assert_close(param.detach(), before_skip[name], rtol=0, atol=0)
        return result

    trainer.train_step = train_step
    summary = trainer.fit()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    assert [(r.step, r.skipped) for r in results] == [(1, False), (2, True), (3, False), (4, False)]
    assert all(r.tokens > 0 for r in results)  # the skipped step's own tokens, not a stale count
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


def test_unknown_tracker_is_rejected_before_the_run_directory_is_made(tmp_path):
    with pytest.raises(ConfigError, match=r"train.trackers=.*mlflow.*valid values are a list of any of wandb, "):
        run(tmp_path, "badtrack", "train.max_steps=1", "train.trackers=[mlflow]")
    assert not os.path.exists(tmp_path / "badtrack")


def test_unknown_data_ordering_is_refused_before_any_model_is_built(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(trainer_module, "build_model", no_model)
    monkeypatch.setattr(trainer_module, "build_tokenizer", no_model)
    with pytest.raises(ConfigError, match=r"data.ordering='shuffled' is invalid: valid values are one of random, "
                                          r"sftmix_pairs"):
        run(tmp_path, "badorder", "+data.ordering=shuffled", fit=False)
    assert not os.path.exists(tmp_path / "badorder")


# ---- the step API --------------------------------------------------------------------------------------------------

def test_train_step_returns_its_result_and_advances_the_step(tmp_path):
    trainer, _ = run(tmp_path, "api", "train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=4",
                     fit=False)
    rows = [b.num_tokens for b in trainer._step_batches(0)]
    first = trainer.train_step()
    assert isinstance(first, StepResult)
    assert (first.step, trainer.step, first.skipped) == (1, 1, False)
    assert len(rows) == 2 and first.tokens == sum(rows)  # both micro-batches, prompts included
    # the step's metrics are its own: the NTP term averaged over exactly this step's labelled tokens
    assert first.metrics.reduce(trainer.accelerator)["ntp/loss"] == pytest.approx(first.loss, rel=1e-6)
    second = trainer.train_step()
    assert (second.step, trainer.step) == (2, 2)
    assert second.tokens == sum(b.num_tokens for b in trainer._step_batches(1))


def test_training_and_evaluation_compute_the_same_loss_for_the_same_examples(tmp_path):
    """The eval set's loss equals the training objective on a step made of exactly those examples."""
    trainer, _ = run(tmp_path, "same", "train.max_steps=1", "train.global_batch_size=8", "train.micro_batch_size=4",
                     "train.eval_batch_size=3", "train.optimizer=sgd", "train.lr=1e-9", fit=False)
    trainer.train_ds = trainer.eval_ds.select(range(8))
    trainer.eval_ds = trainer.train_ds
    trainer.ordering = lambda dataset, seed, epoch: list(range(len(dataset)))
    evaluated = trainer.evaluate()["loss"]
    assert trainer.train_step().loss == pytest.approx(evaluated, rel=1e-6)


# ---- what a person sees ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("at_start", [True, False])
def test_eval_at_start_switch(tmp_path, at_start):
    _, summary = run(tmp_path, "start", "train.max_steps=2", "train.eval_every=0", f"train.eval_at_start={at_start}")
    eval_steps = [r["step"] for r in read_metrics(str(tmp_path / "start"), split="eval")]
    assert eval_steps == ([0, 2] if at_start else [2])
    assert (summary["eval_before"] is not None) == at_start
    assert summary["eval_after"]["loss"] > 0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_counts_only_the_last_logging_interval():
    clock = FakeClock()
    tracker = RunTracker(FakeAccelerator(), "unused", 10, 0, make_cfg([]).train, {}, clock=clock)
    for tokens, seconds, pause in [(1000, 1.0, 0.0), (3000, 1.0, 50.0)]:  # a slow start, then an evaluation
        tracker.start_step()
        clock.now += seconds
        tracker.step(tokens, 1.0)
        clock.now += pause
    assert tracker.interval_tokens_per_second() == pytest.approx(2000.0)  # 4000 tokens in 2 s of steps
    tracker.start_step()
    clock.now += 0.5
    tracker.step(3000, 1.0)
    assert tracker.interval_tokens_per_second() == pytest.approx(6000.0)  # not (7000 / 2.5 s) since the start
    assert (tracker.tokens, tracker.train_seconds) == (7000, pytest.approx(2.5))


class FakeAccelerator:
    is_main_process = False
    trackers = []


def test_the_plot_has_one_panel_per_metric_family_and_a_title():
    records = [
        {"step": 0, "split": "eval", "loss": 0.69, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
        {"step": 1, "split": "train", "loss": 0.68, "dpo/loss": 0.68, "rewards/accuracies": 0.5,
         "rewards/margins": 0.01, "grad_norm": 2.0, "lr": 1e-3, "tokens_per_s": 900.0},
        {"step": 2, "split": "train", "loss": 0.66, "dpo/loss": 0.66, "rewards/accuracies": 0.6,
         "rewards/margins": 0.02, "grad_norm": 1.5, "lr": 5e-4, "tokens_per_s": 950.0},
        {"step": 2, "split": "eval", "loss": 0.65, "rewards/accuracies": 0.7, "rewards/margins": 0.03},
    ]
    fig = metrics_figure(records, "run_x | recipe dpo | model tiny")
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == ["loss", "dpo", "grad_norm", "lr", "rewards", "tokens_per_s"]
    assert fig._suptitle.get_text() == "run_x | recipe dpo | model tiny"
    labels = sorted(line.get_label() for line in panels["rewards"].get_lines())
    assert labels == ["eval rewards/accuracies", "eval rewards/margins", "train rewards/accuracies",
                      "train rewards/margins"]
    assert [line.get_label() for line in panels["loss"].get_lines()] == ["eval loss", "train loss"]


def test_the_run_ends_with_a_summary_of_time_tokens_metrics_and_paths(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="tunelab"):
        _, summary = run(tmp_path, "summary", "train.max_steps=3", "train.eval_every=0", "train.plot=true",
                         "export.enabled=true")
    out = tmp_path / "summary"
    assert summary["tokens"] > 0 and 0 < summary["train_seconds"] <= summary["wall_seconds"]
    assert summary["checkpoint"] == str(out / "checkpoints" / "step_0000003")
    assert summary["export"] == str(out / "export") and summary["curves"] == str(out / "loss_curves.png")
    text = format_summary(summary)
    assert text.startswith(f"run finished: 3 steps (0 skipped) in {summary['wall_seconds']:.1f} s, "
                           f"{summary['train_seconds']:.1f} s of them training; {summary['tokens']:,} tokens")
    before, after = summary["eval_before"]["loss"], summary["eval_after"]["loss"]
    assert f"final eval: loss {before:.4f} -> {after:.4f} (before -> after training)" in text
    assert f"final train: loss {summary['train_last']['loss']:.4f}" in text
    for path in ("metrics.jsonl", "checkpoints/step_0000003", "export", "loss_curves.png"):
        assert str(out / path) in text
    assert text in caplog.text
