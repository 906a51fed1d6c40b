"""Final export in Hugging Face format (safetensors + config + tokenizer), loadable with ``from_pretrained``.

``export/`` holds the full model; for LoRA runs ``export_adapter/`` holds the adapter, and ``export/`` the base
model with the adapter merged in (``export.merge_lora``; otherwise only the adapter is written).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def export_model(accelerator, policy, tokenizer, output_dir: str, merge_lora: bool) -> str:
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(policy).model
    state = accelerator.get_state_dict(policy)  # gathers ZeRO-3 shards; every rank must call it
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if state else state
    target = os.path.join(output_dir, "export")
    if accelerator.is_main_process:
        is_peft = hasattr(model, "peft_config")
        if is_peft:
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
