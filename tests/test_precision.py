"""Precision: what model.dtype / model.master_weights / train.mixed_precision mean together, fp32 master weights
under a half dtype (updates far below bf16 resolution are kept), Kahan-compensated updates for pure-bf16 weights,
and every reference strategy scoring at the policy's precision (a reference equal to the policy gives log 2)."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import make_cfg

from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.models import build_model, tiny_tokenizer
from tunelab.trainers.optim import build_optimizer
from tunelab.trainers.precision import resolve_precision
from tunelab.trainers.reference import _match_dtypes
from tunelab.trainers.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _state(deepspeed: bool = False, device: str = "cpu"):
    kind = DistributedType.DEEPSPEED if deepspeed else DistributedType.NO
    return SimpleNamespace(distributed_type=kind, device=torch.device(device))


def _resolve(overrides: list[str], **state):
    cfg = make_cfg(overrides)
    return resolve_precision(cfg.model, cfg.train, _state(**state))


# ---- the keys and their combinations --------------------------------------------------------------------------

def test_a_half_dtype_implies_its_autocast_and_keeps_fp32_master_weights(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for mixed in ("no", "bf16", "auto"):
        p = _resolve(["model.dtype=bfloat16", f"train.mixed_precision={mixed}"])
        assert (p.mixed_precision, p.master_weights, p.compensated_updates) == ("bf16", "fp32", False)
    p = _resolve(["model.dtype=float32", "train.mixed_precision=bf16"])
    assert p.mixed_precision == "bf16"
    assert _resolve(["model.dtype=float32", "train.mixed_precision=no"]).mixed_precision == "no"
    assert _resolve(["model.dtype=float16"], device="cuda").mixed_precision == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` exports
    assert _resolve(["model.dtype=float32", "train.mixed_precision=auto"]).mixed_precision == "bf16"


@pytest.mark.parametrize("overrides, state, words", [
    (["model.dtype=bfloat16", "train.mixed_precision=fp16"], {"device": "cuda"},
     ["model.dtype=bfloat16", "train.mixed_precision=fp16"]),
    (["model.dtype=float16", "train.mixed_precision=bf16"], {"device": "cuda"},
     ["model.dtype=float16", "train.mixed_precision=bf16"]),
    (["model.dtype=float16"], {}, ["needs a GPU"]),
    (["model.dtype=float32", "train.mixed_precision=fp16"], {}, ["needs a GPU"]),
    (["model.dtype=bfloat16", "model.master_weights=none"], {"deepspeed": True},
     ["model.master_weights=none", "DeepSpeed"]),
    (["model.dtype=float16", "model.master_weights=none"], {"device": "cuda"},
     ["model.master_weights=none", "bfloat16"]),
    (["model.master_weights=bf16"], {}, ["model.master_weights='bf16'", "fp32, none"]),
    (["model.dtype=half"], {}, ["model.dtype='half'", "float32, bfloat16, float16"]),
    (["train.mixed_precision=fp8"], {}, ["train.mixed_precision='fp8'", "no, bf16, fp16, auto"]),
])
def test_incoherent_precision_settings_are_refused_naming_the_keys(overrides, state, words):
    with pytest.raises(ValueError) as err:
        _resolve(overrides, **state)
    for word in words:
        assert word in str(err.value)


def test_master_weights_upcast_the_trainable_weights_only():
    """Full fine-tuning: every weight fp32 (tied embeddings stay one parameter); LoRA: adapters fp32, base bf16."""
    tok = tiny_tokenizer()
    p = _resolve(["model.dtype=bfloat16"])
    full = p.prepare_model(build_model(make_cfg(["model.dtype=bfloat16"]).model, tok, seed=0))
    assert {q.dtype for q in full.parameters()} == {torch.float32}
    assert full.lm_head.weight is full.model.embed_tokens.weight
    lora = p.prepare_model(build_model(make_cfg(["model.dtype=bfloat16", "model.lora.enabled=true"]).model, tok, 0))
    trainable = {q.dtype for q in lora.parameters() if q.requires_grad}
    frozen = {q.dtype for q in lora.parameters() if not q.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


# ---- fp32 master weights keep small updates -------------------------------------------------------------------

def test_a_bf16_step_at_lr_5e_7_applies_adams_update_to_every_weight(tmp_path):
    """At lr 5e-7 Adam's first step moves each weight by about lr, 1/40000 of a weight of size 0.02: far below its
    bf16 resolution (~1e-4), so bf16 weights would not move at all. The fp32 master weights move by exactly
    -lr * g / (|g| + eps), g the (clipped) gradient the optimizer recorded, up to float32 rounding."""
    lr = 5e-7
    cfg = make_cfg(["model.dtype=bfloat16", "train.mixed_precision=bf16", f"train.lr={lr}", "train.scheduler=constant",
                    "train.warmup_steps=0", "train.max_steps=1", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    params = dict(trainer.accelerator.unwrap_model(trainer.policy).named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    trainer.train_step()
    optimizer = trainer.optimizer.optimizer
    beta1, eps = cfg.train.betas[0], cfg.train.eps
    moved = total = 0
    for name, p in params.items():
        g = optimizer.state[p]["exp_avg"] / (1 - beta1)
        expected = -lr * g / (g.abs() + eps)
        # the new weight is the update rounded to float32 at the weight's magnitude (half a spacing at most)
        error = (p.detach() - before[name] - expected).abs()
        assert torch.all(error <= torch.finfo(torch.float32).eps * before[name].abs() + 1e-3 * expected.abs()), name
        moved += int(((p.detach() != before[name]) & (g.abs() > 1e-6)).sum())
        total += int((g.abs() > 1e-6).sum())
    assert total > 100_000 and moved == total
    assert {p.dtype for p in params.values()} == {torch.float32}


@pytest.mark.slow
def test_bf16_training_lowers_the_eval_loss_like_fp32(tmp_path):
    """20 steps at lr 1e-5 on the tiny model: the eval-loss decrease with model.dtype=bfloat16 is at least 0.8x the
    fp32 run's (measured 0.99x; with AdamW on the bf16 weights themselves it was 0.14x)."""
    def decrease(name: str, overrides: list[str]) -> float:
        cfg = make_cfg(["train.max_steps=20", "train.lr=1e-5", "train.eval_every=0", "export.enabled=false",
                        f"output_dir={tmp_path / name}"] + overrides)
        summary = Trainer(cfg).fit()
        reset_accelerate()
        return summary["eval_before"]["loss"] - summary["eval_after"]["loss"]

    fp32 = decrease("fp32", ["model.dtype=float32"])
    bf16 = decrease("bf16", ["model.dtype=bfloat16", "train.mixed_precision=bf16"])
    assert fp32 > 0.03 and bf16 >= 0.8 * fp32


# ---- pure bf16: Kahan-compensated updates ---------------------------------------------------------------------

def _train_cfg(optimizer="adamw", lr=1e-4, weight_decay=0.0):
    return SimpleNamespace(optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=[0.9, 0.999], eps=1e-8)


def _run(param: torch.Tensor, optimizer, grads: list[torch.Tensor]) -> torch.Tensor:
    for g in grads:
        param.grad = g.to(param.dtype)
        optimizer.step()
    return param.detach().float()


def test_compensated_optimizer_is_torch_adamw_in_exact_arithmetic():
    """In fp32 (no rounding to compensate) the Kahan optimizer takes torch's AdamW steps, weight decay included."""
    torch.manual_seed(0)
    start = torch.randn(64)
    grads = [torch.randn(64) for _ in range(5)]
    cfg = _train_cfg(lr=1e-2, weight_decay=0.1)
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    torch.testing.assert_close(
        _run(ours, build_optimizer([ours], cfg, compensated=True), grads),
        _run(theirs, torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8), grads),
        rtol=1e-5, atol=1e-6)


def test_kahan_summation_keeps_updates_that_plain_bf16_adamw_loses():
    """200 steps of 1e-4 on weights of 1.0 (bf16 spacing there: 2^-7): plain AdamW on bf16 weights rounds every
    update away; the compensated optimizer ends within one bf16 spacing of the fp32 result (~0.98)."""
    grads = [torch.ones(32)] * 200
    cfg = _train_cfg(lr=1e-4)
    fp32 = torch.nn.Parameter(torch.ones(32))
    reference = _run(fp32, build_optimizer([fp32], cfg), grads)
    plain = torch.nn.Parameter(torch.ones(32, dtype=torch.bfloat16))
    stalled = _run(plain, build_optimizer([plain], cfg), grads)
    kahan = torch.nn.Parameter(torch.ones(32, dtype=torch.bfloat16))
    compensated = _run(kahan, build_optimizer([kahan], cfg, compensated=True), grads)
    assert torch.all(stalled == 1.0)
    assert torch.all((compensated - reference).abs() <= 2 ** -7) and torch.all(reference < 0.985)


def test_compensated_updates_refuse_an_optimizer_without_them():
    with pytest.raises(ValueError, match="train.optimizer='adafactor'.*adamw, adam"):
        build_optimizer([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], _train_cfg("adafactor"), True)


def test_master_weights_none_trains_bf16_weights_with_the_kahan_optimizer(tmp_path):
    """One step at lr 1e-3: the weights stay bf16, and weight + compensation moves by Adam's first update (the
    part of it below a weight's bf16 spacing, e.g. all of it for the norms' weights of 1.0, is in the buffer)."""
    import optimi

    lr = 1e-3
    cfg = make_cfg(["model.dtype=bfloat16", "model.master_weights=none", "train.max_steps=1", f"train.lr={lr}",
                    "train.scheduler=constant", "train.warmup_steps=0", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    params = dict(trainer.accelerator.unwrap_model(trainer.policy).named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    trainer.train_step()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, optimi.AdamW)
    for name, p in params.items():
        state = optimizer.state[p]
        assert p.dtype == state["kahan_comp"].dtype == torch.bfloat16, name
        g = state["exp_avg"].float()  # optimi's averages are bias-corrected: the gradient itself at step 1
        expected = -lr * g / (g.abs() + cfg.train.eps)
        moved = p.detach().float() + state["kahan_comp"].float() - before[name].float()
        torch.testing.assert_close(moved, expected, rtol=1e-2, atol=1e-5, msg=name)


# ---- one precision for policy and reference -------------------------------------------------------------------

@pytest.mark.parametrize("strategy, dtype", [
    ("precomputed", "float32"), ("frozen_copy", "float32"), ("adapter_disabled", "float32"),
    ("frozen_copy", "bfloat16"), ("adapter_disabled", "bfloat16"),  # fp32 master weights; LoRA: a bf16 base
])
def test_step0_dpo_under_bf16_autocast_scores_the_reference_like_the_policy(strategy, dtype, tmp_path, cache_dir):
    """Reference == policy at step 0: every pair's reward margin is 0, so the DPO loss is log 2 and no pair counts
    as correctly ranked. A reference scored at another precision than the policy gives noise around both."""
    lora = ["model.lora.enabled=true"] if strategy == "adapter_disabled" else []
    cfg = make_cfg(["recipe=dpo", f"reference.strategy={strategy}", f"model.dtype={dtype}",
                    "train.mixed_precision=bf16", "data.sources.0.num_rows=200", f"output_dir={tmp_path}"] + lora)
    metrics = Trainer(cfg).evaluate()
    assert abs(metrics["loss"] - math.log(2)) < 1e-6
    assert metrics["rewards/accuracies"] == 0.0


def test_a_reference_cache_made_at_another_precision_is_recomputed(tmp_path, cache_dir):
    common = ["recipe=dpo", "reference.strategy=precomputed", "data.sources.0.num_rows=80"]
    Trainer(make_cfg(common + ["train.mixed_precision=no", f"output_dir={tmp_path / 'fp32'}"]))
    made = sorted(os.listdir(cache_dir / "ref_logps"))
    reset_accelerate()
    trainer = Trainer(make_cfg(common + ["train.mixed_precision=bf16", f"output_dir={tmp_path / 'bf16'}"]))
    assert len(made) == 2 and len(os.listdir(cache_dir / "ref_logps")) == 4  # train and eval, once per precision
    assert abs(trainer.evaluate()["loss"] - math.log(2)) < 1e-6


def test_the_reference_cache_key_changes_with_every_setting_that_changes_the_numbers(monkeypatch):
    import tunelab.trainers.reference as reference_module

    base = ["recipe=dpo", "reference.strategy=precomputed"]
    model = build_model(make_cfg(base).model, tiny_tokenizer(), seed=0)
    monkeypatch.setattr(reference_module, "dataset_fingerprint", lambda dataset: "the same tokens")

    def deepspeed_stage(stage: int):
        return SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))

    def key(overrides=(), **accelerator):
        acc = dict(mixed_precision="no", native_amp=False, distributed_type=DistributedType.NO, num_processes=1)
        acc.update(accelerator)
        reference = reference_module.Reference(make_cfg(base + list(overrides)), model, SimpleNamespace(**acc))
        return reference.cache_key(None, SimpleNamespace(kind="pairs"))

    keys = [key(), key(mixed_precision="bf16", native_amp=True), key(["model.dtype=bfloat16"]),
            key(["model.attn_implementation=sdpa"]), key(["train.attention_tile=64"]),
            key(["train.logits_chunk_size=256"]), key(["train.eval_batch_size=8"]), key(num_processes=2),
            key(["data.max_prompt_length=64"]), key(["data.truncation=drop"]),
            key(distributed_type=DistributedType.DEEPSPEED, state=deepspeed_stage(2)),
            key(distributed_type=DistributedType.DEEPSPEED, state=deepspeed_stage(3))]
    assert len(set(keys)) == len(keys)
    assert key() == keys[0]  # and it is a function of the settings alone


def test_a_frozen_copy_takes_the_prepared_policys_dtypes():
    """DeepSpeed casts the prepared policy's parameters to bf16 but not a copy made before ``prepare``."""
    policy = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    copy = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    policy[0].to(torch.bfloat16)
    _match_dtypes(copy, policy)
    assert [p.dtype for p in copy.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2


class EngineLike(torch.nn.Module):
    """Wraps a module as a DeepSpeed engine does for this purpose: train()/eval() reach the module, while the
    wrapper's own ``training`` flag stays True."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def forward(self, batch, needs):
        return self.module(batch, needs)


class ModeRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, batch, needs):
        self.modes.append(self.training)
        return SimpleNamespace(seq_logps=torch.zeros(batch.seq_role.shape[0]), seq_prefix_logps=None)


@pytest.mark.parametrize("mode", [False, True])
def test_reference_scoring_restores_the_mode_of_the_module_inside_a_deepspeed_engine(mode):
    """A live reference scores in eval mode and then leaves the scorer as it found it, read from the wrapped module:
    an engine's own flag is always True, so evaluation under DeepSpeed went on in train mode (dropout on)."""
    from contextlib import nullcontext

    from tunelab.data.collate import Collator
    from tunelab.trainers.reference import Reference

    inner = ModeRecorder().train(mode)
    reference = Reference.__new__(Reference)
    reference.strategy, reference.prefix, reference.copy = "frozen_copy", False, EngineLike(inner)
    reference.accelerator = SimpleNamespace(autocast=nullcontext,
                                            unwrap_model=lambda m: m.module if isinstance(m, EngineLike) else m)
    batch = Collator("pairs", packing=True, shared_prompt=True, row_length=32)(
        [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]}])
    out = reference.with_logps(batch, policy=None)
    assert inner.modes == [False] and inner.training is mode
    assert out.ref_seq_logps.tolist() == [0.0, 0.0]
