"""Model builders: the real SmolLM2-135M-Instruct from its GGUF package, and LoRA wrapping."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg

from tunelab.data.collate import Collator
from tunelab.data.contract import Needs
from tunelab.data.templates import build_template, encode_segments
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.models import build_model, build_tokenizer


@pytest.mark.slow
def test_smollm2_loads_offline_and_is_really_pretrained():
    cfg = make_cfg(["model=smollm2-135m", "model.lora.enabled=true", "model.lora.r=4"])
    tok = build_tokenizer(cfg.model)
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    model = build_model(cfg.model, tok, seed=0)
    trainable, total = model.get_nb_trainable_parameters()
    assert 130e6 < total < 140e6 and trainable < 0.01 * total
    turns = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is Paris."}]
    ids, mask = encode_segments(tok, build_template("chat", tok).segments(turns))
    batch = Collator("sft", packing=True, shared_prompt=True, row_length=256)([{"input_ids": ids, "target_mask": mask}])
    with torch.no_grad():
        out = CausalLMWithLogProbs(model).eval()(batch, Needs())
    nll = -float(out.token_logps.mean())
    # a random model would sit near log(49152) = 10.8 nats per token; the pretrained one knows this answer
    assert nll < 1.5 < math.log(49152)


@pytest.mark.slow
def test_smollm2_lora_run_exports_a_merged_model_that_from_pretrained_loads(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from tunelab.trainers.export import export_model

    cfg = make_cfg(["model=smollm2-135m", "model.lora.enabled=true", "model.lora.r=4"])
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok, seed=0)
    with torch.no_grad():  # a non-zero adapter, so that merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = torch.tensor([tok.encode("The capital of France is Paris.")])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits  # eval: no LoRA dropout
    target = export_model(Accelerator(cpu=True), CausalLMWithLogProbs(model), tok, str(tmp_path), merge_lora=True)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
