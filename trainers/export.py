"""Final export in Hugging Face format (safetensors + config + tokenizer), loadable with ``from_pretrained``.

``export/`` holds the full model; for LoRA runs ``export_adapter/`` holds the adapter, and ``export/`` the base
model with the adapter merged in (``export.merge_lora``; otherwise only the adapter is written).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext

log = logging.getLogger(__name__)


def _full_state_dict(accelerator, policy) -> dict | None:
    """The whole model's state dict on the main process (every rank must call this). Under ZeRO-3 DeepSpeed
    gathers the shards layer by layer whether or not ``stage3_gather_16bit_weights_on_model_save`` is set
    (the weights come in the training dtype: fp32, or bf16 under DeepSpeed bf16)."""
    from trainers.distributed import zero_stage

    if zero_stage(accelerator) == 3:
        return policy._zero3_consolidated_16bit_state_dict()  # what accelerator.get_state_dict uses
    return accelerator.get_state_dict(policy)


@contextmanager
def _zero3_disabled():
    """transformers and peft treat every model as ZeRO-3-sharded while a ZeRO-3 DeepSpeed config is registered
    (collective gathers, ``deepspeed.zero.Init``); the plain copy on the main process alone must escape that."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _plain_copy(model, state: dict):
    """An unsharded copy of a ZeRO-3-sharded PEFT model on the CPU holding ``state``: PEFT's adapter export
    and merge read the module's own weights, which under ZeRO-3 are empty shards. Call under _zero3_disabled."""
    from peft import get_peft_model

    base = model.get_base_model()
    name = model.active_adapter
    plain = get_peft_model(type(base)(base.config), model.peft_config[name], adapter_name=name)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain


def export_model(accelerator, policy, tokenizer, output_dir: str, merge_lora: bool) -> str:
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(policy).model
    state = _full_state_dict(accelerator, policy)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if state else state
    target = os.path.join(output_dir, "export")
    if accelerator.is_main_process:
        is_peft = hasattr(model, "peft_config")
        if is_peft:
            from trainers.distributed import is_partitioned

            sharded = any(is_partitioned(p) for p in model.parameters())
            with _zero3_disabled() if sharded else nullcontext():
                if sharded:
                    model = _plain_copy(model, state)
                adapter_dir = os.path.join(output_dir, "export_adapter")
                model.save_pretrained(adapter_dir, state_dict=None, safe_serialization=True)
                tokenizer.save_pretrained(adapter_dir)
                log.info("LoRA adapter exported to %s", adapter_dir)
                if merge_lora:
                    merged = model.merge_and_unload()
                    merged.save_pretrained(target, safe_serialization=True)
                    tokenizer.save_pretrained(target)
                    log.info("merged model exported to %s", target)
        else:
            model.save_pretrained(target, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(target)
            log.info("model exported to %s", target)
    accelerator.wait_for_everyone()
    return target
