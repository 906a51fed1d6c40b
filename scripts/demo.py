"""The README demo: LoRA-tune SmolLM2-135M-Instruct on the bundled data on CPU, show before/after loss and
generations, and check that the exported model loads with ``from_pretrained``.

    python scripts/demo.py [hydra overrides, e.g. train.max_steps=10]
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from tunelab.trainers.config_schema import compose_config
from tunelab.trainers.logs import setup_logging
from tunelab.trainers.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUESTIONS = [
    [{"role": "user", "content": "What colour is the object?\n\ncarrot"}],
    [{"role": "user", "content": "Reverse the order of the words.\n\nriver lamp honey"}],
]


def generate(model, tokenizer, conversation, max_new_tokens: int = 24) -> str:
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def show(title: str, model, tokenizer) -> None:
    print(f"\n--- generations {title} ---")
    for conversation in QUESTIONS:
        print(f"Q: {conversation[0]['content']!r}\nA: {generate(model, tokenizer, conversation)!r}")


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup_logging()
    # no fixed output_dir: each demo run gets a fresh runs/demo/<time>_<id> (a used one is refused)
    cfg = compose_config(["recipe=sft_smollm2_lora_demo", *overrides])
    trainer = Trainer(cfg, recipe_name="demo")
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    model.eval()
    show("before training", model, trainer.tokenizer)
    summary = trainer.fit()
    merged = os.path.join(summary["output_dir"], "export")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoModelForCausalLM.from_pretrained(merged)
    show("after training (exported model loaded with from_pretrained)", tuned, AutoTokenizer.from_pretrained(merged))
    before, after = summary["eval_before"]["loss"], summary["eval_after"]["loss"]
    print(f"\neval loss before {before:.4f} -> after {after:.4f}")
    print(f"run directory: {summary['output_dir']} (metrics.jsonl, loss_curves.png, checkpoints/, export/, "
          "export_adapter/)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides of the demo recipe")
    main(parser.parse_args().overrides)
