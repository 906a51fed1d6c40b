"""Optimizer and learning-rate schedule from the recipe's ``train`` block (schedules are transformers').

Weights held in bfloat16 without an fp32 master copy (``model.master_weights=none``, trainers/precision.py) get
torch-optimi's Adam/AdamW with Kahan summation: each update's rounding error is kept in a bf16 compensation buffer
and added back at the next step, so updates smaller than a weight's bf16 resolution still accumulate.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine",
              "wsd": "warmup_stable_decay"}
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
COMPENSATED = ("adamw", "adam")


def build_optimizer(params, train_cfg, compensated: bool = False) -> torch.optim.Optimizer:
    """``compensated``: the trainable weights are in a half dtype; use Kahan-summation updates."""
    params = [p for p in params if p.requires_grad]
    name, lr, wd = train_cfg.optimizer, float(train_cfg.lr), float(train_cfg.weight_decay)
    if compensated:
        return _kahan_optimizer(params, train_cfg)
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        fused = bool(params) and params[0].is_cuda
        return cls(params, lr=lr, weight_decay=wd, betas=tuple(train_cfg.betas), eps=float(train_cfg.eps),
                   fused=fused or None, foreach=None if fused else True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=train_cfg.get("momentum", 0.0))
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False)
    raise KeyError(f"unknown train.optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def _kahan_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    import optimi

    name = train_cfg.optimizer
    if name not in COMPENSATED:
        raise ValueError(f"model.master_weights=none needs a Kahan-summation optimizer: train.optimizer={name!r} has "
                         f"none here; valid: {', '.join(COMPENSATED)} (or model.master_weights=fp32)")
    cls = optimi.AdamW if name == "adamw" else optimi.Adam
    return cls(params, lr=float(train_cfg.lr), weight_decay=float(train_cfg.weight_decay),
               betas=tuple(train_cfg.betas), eps=float(train_cfg.eps), kahan_sum=True, triton=False)


def build_scheduler(optimizer, train_cfg, total_steps: int):
    if train_cfg.scheduler not in SCHEDULERS:
        raise KeyError(f"unknown train.scheduler {train_cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    warmup = train_cfg.warmup_steps
    if warmup is None:
        warmup = math.ceil(float(train_cfg.warmup_ratio) * total_steps)
    kwargs = {}
    if train_cfg.scheduler == "wsd":
        decay = math.ceil(float(train_cfg.decay_ratio) * total_steps)
        kwargs = {"num_decay_steps": decay, "num_stable_steps": max(0, total_steps - warmup - decay)}
    return get_scheduler(SCHEDULERS[train_cfg.scheduler], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
