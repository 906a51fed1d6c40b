"""The run's numeric precision: what ``model.dtype``, ``model.master_weights`` and ``train.mixed_precision`` mean
together, checked once at start-up, and the model's trainable weights put in the precision the optimizer updates.

- ``model.dtype`` (float32 | bfloat16 | float16) is the precision the model computes in; its weights load in it.
  A half dtype implies autocast in that dtype (Accelerate's ``mixed_precision``; DeepSpeed's bf16/fp16 mode under
  DeepSpeed), so ``train.mixed_precision`` may be ``no`` (or ``auto``) or the same half type; the other half type is
  an error naming both keys.
- ``model.master_weights``: ``fp32`` (default) holds every trainable weight in float32, so that updates far below a
  bf16 weight's resolution (lr 1e-6 on weights of size 1e-2) accumulate instead of rounding away; outside DeepSpeed
  the weights are upcast here and the forward runs under autocast, under DeepSpeed its bf16/fp16 mode keeps the
  fp32 master copy itself. Frozen weights (a LoRA base) stay in ``model.dtype``. ``none`` (bfloat16 only, not under
  DeepSpeed) keeps the trainable weights in bf16 and has ``trainers/optim.py`` add Kahan-compensated updates.
- fp16 needs a GPU: Accelerate runs no fp16 autocast on a CPU, so the run would silently be fp32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("tunelab")

MASTER_WEIGHTS = ("fp32", "none")
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
HALF_AUTOCAST = {"bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Precision:
    dtype: str               # model.dtype: the weights as loaded, and the compute precision
    mixed_precision: str     # what the Accelerator gets: no | bf16 | fp16
    master_weights: str      # fp32 | none
    deepspeed: bool

    @property
    def compensated_updates(self) -> bool:
        """Trainable weights held in a half dtype: the optimizer must compensate for the rounding of each update."""
        return self.master_weights == "none" and self.dtype in HALF_AUTOCAST

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Trainable weights to float32 for fp32 master weights outside DeepSpeed (exact: every half value is a
        float32 value); frozen ones and buffers keep their dtype. In place (tied weights stay one parameter)."""
        if self.master_weights != "fp32" or self.deepspeed:
            return model
        upcast = 0
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
                upcast += param.numel()
        if upcast:
            log.info("model.master_weights=fp32: %d trainable parameters held in float32, computed under %s autocast",
                     upcast, self.mixed_precision)
        return model


def _requested(train_mixed_precision) -> str:
    """train.mixed_precision, with auto/null resolved to the launcher's (``accelerate launch`` exports it)."""
    value = "auto" if train_mixed_precision is None else str(train_mixed_precision)
    if value not in MIXED_PRECISION:
        raise ValueError(f"train.mixed_precision={value!r}; valid: {', '.join(MIXED_PRECISION)}")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if value == "auto":
        return launcher or "no"
    if launcher and launcher != value:
        log.warning("the launcher asks for mixed_precision=%s but train.mixed_precision=%s wins; set "
                    "train.mixed_precision=auto to follow the launcher", launcher, value)
    return value


def resolve_precision(model_cfg, train_cfg, state) -> Precision:
    """The precision of a run in ``state`` (Accelerate's PartialState: DeepSpeed or not, the device)."""
    from accelerate.utils import DistributedType

    from tunelab.trainers.models import DTYPES

    deepspeed = state.distributed_type == DistributedType.DEEPSPEED
    device_type = state.device.type

    dtype = str(model_cfg.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    master = str(model_cfg.get("master_weights", "fp32"))
    if master not in MASTER_WEIGHTS:
        raise ValueError(f"model.master_weights={master!r}; valid: {', '.join(MASTER_WEIGHTS)}")
    requested = _requested(train_cfg.mixed_precision)
    mixed = requested
    implied = HALF_AUTOCAST.get(dtype)
    if implied is not None:
        if requested not in ("no", implied):
            raise ValueError(f"model.dtype={dtype} computes in {implied} but train.mixed_precision={requested}: set "
                             f"train.mixed_precision={implied} (or no), or model.dtype to match")
        if requested == "no":
            log.info("model.dtype=%s: training under %s autocast (train.mixed_precision=no is implied %s)",
                     dtype, implied, implied)
        mixed = implied
    if mixed == "fp16" and device_type == "cpu":
        raise ValueError("fp16 (model.dtype=float16 or train.mixed_precision=fp16) needs a GPU: Accelerate runs no "
                         "fp16 autocast on a CPU, so the run would be fp32; use bfloat16 / bf16 on a CPU")
    if master == "none" and implied is not None:
        if dtype != "bfloat16":
            raise ValueError(f"model.master_weights=none supports model.dtype=bfloat16 only (got {dtype}): fp16 "
                             "weights need loss scaling, which refuses fp16 gradients; use master_weights=fp32")
        if deepspeed:
            raise ValueError("model.master_weights=none is for runs without DeepSpeed: DeepSpeed's bf16 mode always "
                             "keeps its own fp32 master copy; use model.master_weights=fp32 under DeepSpeed")
    return Precision(dtype=dtype, mixed_precision=mixed, master_weights=master, deepspeed=deepspeed)
