"""``model.liger=true``: Liger's Triton kernels for the model body (RMSNorm, RoPE, SwiGLU), patched into the model.

liger-kernel (Hsu et al. 2024, arXiv 2410.10989) patches a transformers model instance by its model type
(``_apply_liger_kernel_to_instance``, the entry TRL's trainers use as well). tunelab asks for the body's kernels
only: rms_norm, rope and swiglu. Liger's (fused linear) cross-entropy is left off because tunelab's forward never
calls the model's LM head or loss: trainers/forward.py scores only the labelled positions through its own chunked
head (per-token log-probs for every loss, not a mean cross-entropy), which Liger's fused loss would not replace.

Liger's kernels are Triton programs that need CUDA, and liger_kernel imports triton when it is imported, so the
import is guarded here and ``liger_problem`` lets the config check refuse the option on a machine without CUDA or
without the package (tests/test_attention.py); only a GPU run exercises the kernels (scripts/gpu_check.sh).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

# The body's kernels on, Liger's losses off (see the docstring)
KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
           "fused_linear_cross_entropy": False}


def liger_problem() -> str | None:
    """Why ``model.liger=true`` cannot run here, or None."""
    if not torch.cuda.is_available():
        return ("model.liger=true needs a CUDA GPU: Liger's kernels are Triton programs (this machine has no CUDA "
                "device); leave model.liger=false on CPU")
    if importlib.util.find_spec("liger_kernel") is None:
        return "model.liger=true needs the liger-kernel package: pip install liger-kernel"
    return None


def apply_liger(model) -> None:
    """Patch ``model`` in place with Liger's RMSNorm, RoPE and SwiGLU kernels; a model type Liger does not know is
    an error (liger-kernel itself would skip it silently)."""
    liger = importlib.import_module("liger_kernel.transformers.monkey_patch")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in liger.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"model.liger=true: liger-kernel has no kernels for model type {model_type!r} (it knows "
                         f"{', '.join(sorted(liger.MODEL_TYPE_TO_APPLY_LIGER_FN))})")
    liger._apply_liger_kernel_to_instance(model=model, **KERNELS)
