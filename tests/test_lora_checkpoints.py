"""LoRA runs: checkpoints hold the adapter's state without the frozen base and resume exactly; the exported adapter
loads with peft's AutoPeftModelForCausalLM, offline, and computes what the merged export computes."""

from __future__ import annotations

import os
import re

import pytest
from conftest import make_cfg, read_metrics
from safetensors import safe_open

from tunelab.trainers import checkpoint
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.trainer import Trainer

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]  # dropout stays on: RNG must resume too
SHORT = ["train.max_steps=4", "train.save_every=2", "train.keep_last=0", "train.log_every=1", "train.eval_every=0",
         "export.enabled=false"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def trainer(out, *overrides) -> Trainer:
    return Trainer(make_cfg([f"output_dir={out}", *SHORT, *overrides]), recipe_name="sft")


def step_dir(out, n) -> str:
    return os.path.join(out, "checkpoints", f"step_{n:07d}")


def test_a_lora_checkpoint_holds_only_the_trainable_state(tmp_path):
    run = trainer(tmp_path / "lora", *LORA, "train.max_steps=2")
    model = run.accelerator.unwrap_model(run.policy)
    adapter = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    every = sum(p.numel() for p in model.parameters())
    run.fit()
    saved = step_dir(tmp_path / "lora", 2)
    with safe_open(os.path.join(saved, "model.safetensors"), "pt") as weights:
        assert set(weights.keys()) == set(adapter)
    # fp32 values of the adapter plus the safetensors header (a name, dtype, shape and offsets per tensor)
    weights_bound = 4 * sum(adapter.values()) + 200 * len(adapter)
    assert os.path.getsize(os.path.join(saved, "model.safetensors")) <= weights_bound < 4 * every / 5
    # AdamW keeps two fp32 moments per adapter value; RNG, scheduler and trainer state are a few kB
    total = sum(os.path.getsize(os.path.join(saved, f)) for f in os.listdir(saved))
    assert total <= 3 * weights_bound + 64 * 1024
    assert checkpoint.read_state(saved)["model_weights"] == "trainable"
    assert checkpoint.verify(saved) is None


class Killed(Exception):
    pass


def test_a_resumed_lora_run_has_the_losses_of_an_uninterrupted_one(tmp_path, monkeypatch):
    trainer(tmp_path / "straight", *LORA).fit()
    reset_accelerate()
    save = checkpoint.save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):  # dies right after writing the step-2 checkpoint
        trainer(tmp_path / "resumed", *LORA).fit()
    monkeypatch.setattr(checkpoint, "save", save)
    reset_accelerate()
    assert checkpoint.read_state(step_dir(tmp_path / "resumed", 2))["model_weights"] == "trainable"
    trainer(tmp_path / "resumed", *LORA, "resume=latest").fit()
    straight, resumed = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_a_lora_checkpoint_without_one_adapter_tensor_is_refused_by_file_and_name(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "lora"
    trainer(out, *LORA, "train.max_steps=2").fit()
    reset_accelerate()
    saved = step_dir(out, 2)
    weights = load_file(os.path.join(saved, "model.safetensors"))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, os.path.join(saved, "model.safetensors"))
    checkpoint.write_manifest(saved)  # an intact file of the wrong content: only the key check can tell
    with pytest.raises(checkpoint.CheckpointError, match=rf"model.safetensors holds the trainable weights of another "
                                                          rf"model \(missing: {re.escape(dropped)}; not in this "
                                                          rf"model: none\)"):
        trainer(out, *LORA, "train.max_steps=3", "resume=latest").fit()


def test_a_full_fine_tune_still_stores_the_whole_model(tmp_path):
    run = trainer(tmp_path / "full", "train.max_steps=2")
    names = set(run.accelerator.unwrap_model(run.policy).state_dict())
    run.fit()
    saved = step_dir(tmp_path / "full", 2)
    with safe_open(os.path.join(saved, "model.safetensors"), "pt") as weights:
        stored = set(weights.keys())
    assert checkpoint.read_state(saved)["model_weights"] == "full"
    assert stored and stored <= names and len(stored) >= len(names) - 1  # the tied LM head is stored once


def test_the_exported_adapter_loads_with_peft_offline_and_matches_the_merged_export(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "lora"
    # a large learning rate, so that the trained adapter changes the logits well beyond the tolerance
    trainer(out, *LORA, "train.max_steps=2", "train.lr=1e-2", "export.enabled=true", "export.merge_lora=true").fit()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    merged = AutoModelForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(out / "export_base").eval()
    adapted = AutoPeftModelForCausalLM.from_pretrained(out / "export_adapter").eval()
    with torch.no_grad():
        expected, untrained = merged(ids).logits, base(ids).logits
        torch.testing.assert_close(adapted(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert (expected - untrained).abs().max() > 1e-2
    assert base.dtype == torch.float32  # model.dtype of the run
    moved = tmp_path / "moved"  # peft resolves the base by absolute path; a moved run names it explicitly
    os.rename(out, moved)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved / "export_base"),
                                         moved / "export_adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_lora_checkpoint_loads_for_scoring_onto_the_base_built_from_its_config(tmp_path):
    """SFTMix scores a finished run's checkpoints outside the run: a LoRA checkpoint without its frozen base loads
    onto the base rebuilt from the run's config and gives back exactly the trained model."""
    import torch

    from tunelab.trainers.forward import CausalLMWithLogProbs
    from tunelab.trainers.models import build_model
    from tunelab.trainers.sftmix_scores import load_checkpoint_weights

    run = trainer(tmp_path / "lora", *LORA, "train.max_steps=2")
    run.fit()
    trained = run.accelerator.unwrap_model(run.policy).state_dict()
    fresh = CausalLMWithLogProbs(build_model(run.cfg.model, run.tokenizer, run.cfg.seed),
                                 run.cfg.train.logits_chunk_size)
    load_checkpoint_weights(fresh, step_dir(tmp_path / "lora", 2))
    restored = fresh.state_dict()
    assert set(restored) == set(trained)
    assert all(torch.equal(restored[name], tensor.cpu()) for name, tensor in trained.items())
