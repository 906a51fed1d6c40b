"""Final export in Hugging Face format (safetensors + config + tokenizer), loadable with ``from_pretrained``.

``export/`` holds the full model; for LoRA runs ``export_adapter/`` holds the adapter, and ``export/`` the base
model with the adapter merged in (``export.merge_lora``; otherwise only the adapter is written).

``peft.AutoPeftModelForCausalLM.from_pretrained(<run>/export_adapter)`` loads the adapter over the base its
``adapter_config.json`` names. An ``hf`` model's base is its hub id or directory. ``tiny`` and ``gguf`` bases exist
nowhere in Hugging Face form, so the export writes the frozen base to ``export_base/`` (weights in the dtype the run
held them in, ``model.dtype``: the de-quantized GGUF weights are exactly what was trained on) and names it by its
absolute path: peft hands that name to ``from_pretrained``, which resolves a relative one against the working
directory, not the adapter's. After moving the run directory, name the base explicitly::

    base = AutoModelForCausalLM.from_pretrained("<run>/export_base")
    model = PeftModel.from_pretrained(base, "<run>/export_adapter")
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
    from tunelab.trainers.distributed import zero_stage

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


def _write_base(model, state: dict, tokenizer, output_dir: str) -> str:
    """The frozen base of PEFT model ``model`` (``state``: its full state dict) as a Hugging Face model in
    ``export_base/``; returns that directory's absolute path."""
    prefix = "base_model.model."
    base_state = {name[len(prefix):].replace(".base_layer.", "."): tensor for name, tensor in state.items()
                  if name.startswith(prefix) and ".lora_" not in name}
    target = os.path.abspath(os.path.join(output_dir, "export_base"))
    model.get_base_model().save_pretrained(target, state_dict=base_state, safe_serialization=True)
    tokenizer.save_pretrained(target)
    log.info("base model (for the adapter) exported to %s", target)
    return target


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
            from tunelab.trainers.distributed import is_partitioned

            sharded = any(is_partitioned(p) for p in model.parameters())
            # read first: wrapping the plain copy fills an empty reference with the base config's own name
            reference = model.peft_config[model.active_adapter].base_model_name_or_path
            with _zero3_disabled() if sharded else nullcontext():
                if sharded:
                    model = _plain_copy(model, state)
                adapter_dir = os.path.join(output_dir, "export_adapter")
                model.peft_config[model.active_adapter].base_model_name_or_path = (
                    reference or _write_base(model, state, tokenizer, output_dir))
                # tunelab never resizes the vocabulary, so the full embedding matrices need not be stored; peft's
                # "auto" would look for the base's config (on the hub, if not local) to find that out
                model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
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
