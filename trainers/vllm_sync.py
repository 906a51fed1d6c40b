"""Online DPO's colocated vLLM engine (``online.backend=vllm``): built once from the policy's architecture, refreshed
with the policy's current weights, under their Hugging Face names, before every step samples.

The engine lives in the training process, one per rank, on the rank's GPU (vLLM's ``external_launcher``: no worker
processes; ``online.vllm_gpu_memory_utilization`` of the GPU's memory for its weights and KV cache, the rest left to
training). It is built from the policy's own config, generation config and tokenizer written to a temporary
directory, with vLLM's dummy weights: the source the run loaded (a hub id, a GGUF file, the random ``tiny`` model)
need not be one vLLM reads, nothing is loaded twice, and the engine holds no weight until the first push, which
happens before the first step samples like every later one.

The push (``ColocatedEngine.push``): ``policy_weights(model)`` yields every tensor of the base model's state dict
under its Hugging Face name (``model.layers.0.self_attn.q_proj.weight``, ...), which vLLM's ``load_weights`` takes
tensor by tensor (it fuses q/k/v and gate/up into its own layouts itself, and skips a tied LM head); then the prefix
cache is reset, whose KV blocks were computed with the old weights. Under LoRA each adapted matrix is sent merged,
W + scaling x B A, computed into a new tensor: the training model is never merged and unmerged in place, which
would round its float32 weights by a merge and an unmerge every step. A tensor is read only when the engine takes
it, so at most one merged matrix exists at a time.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import tempfile
import time
from collections.abc import Iterator

import numpy
import torch

from tunelab.trainers.distributed import free_port
from tunelab.trainers.generation import SamplingSettings, VllmBackend


def vllm_problem() -> str | None:
    """Why ``online.backend=vllm`` cannot run here, or None."""
    if not torch.cuda.is_available():
        return ("online.backend=vllm needs a CUDA GPU: vLLM's engine runs only there (this machine has no CUDA "
                "device); use online.backend=transformers on CPU")
    if importlib.util.find_spec("vllm") is None:
        return "online.backend=vllm needs the vllm package: pip install vllm"
    return None


@torch.no_grad()
def _merged(layer, weight: torch.Tensor) -> torch.Tensor:
    """The LoRA layer's base ``weight`` with its active adapters added, as a new tensor in the weight's dtype."""
    if layer.merged or layer.disable_adapters:  # the adapters are already in the weight, or switched off
        return weight.detach()
    total = weight.detach().float()  # the weight itself when it is float32, so never added to in place
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        delta = (layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()).mul_(layer.scaling[name])
        total = total + (delta.T if layer.fan_in_fan_out else delta)
    return total.to(weight.dtype)


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every entry of the state dict of the model ``model`` computes with: its own
    for a plain model; for a peft LoRA model, the base model's with each adapted weight merged (a new tensor), the
    adapter's own tensors left out. Nothing of ``model`` is modified; the other tensors are the model's own,
    detached."""
    if not hasattr(model, "peft_config"):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {}
    for prefix, module in base.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, LoraLinear) or any(module.use_dora.values()) or any(module.lora_bias.values()):
                raise ValueError(f"{prefix}: only plain LoRA on linear layers is merged for vLLM (no DoRA, LoRA "
                                 "bias, or adapted embeddings/convolutions)")
            layers[f"{prefix}.base_layer.weight"] = module
    adapter_parts = tuple(f".{part}." for part in LoraLayer.adapter_layer_names)
    for name, tensor in base.state_dict().items():
        if any(part in name for part in adapter_parts):
            continue
        layer = layers.get(name)
        yield name.replace(".base_layer.", "."), _merged(layer, tensor) if layer is not None else tensor.detach()


class ColocatedEngine:
    """One rank's vLLM engine, built from ``model`` (the unwrapped policy) and ``tokenizer`` (module docstring);
    ``push`` then ``generate`` each step."""

    def __init__(self, model, tokenizer, accelerator, dtype: str, gpu_memory_utilization: float):
        base = model.get_base_model() if hasattr(model, "peft_config") else model
        self.folder = tempfile.TemporaryDirectory(prefix="tunelab-vllm-")  # removed when the engine goes
        config = copy.deepcopy(base.config)
        config.architectures = [type(base).__name__]  # a model built from a config (tiny) has none recorded
        config.save_pretrained(self.folder.name)
        base.generation_config.save_pretrained(self.folder.name)  # its end-of-sequence ids stop vLLM's samples
        tokenizer.save_pretrained(self.folder.name)
        # the external launcher reads the rank layout from torch.distributed's variables; accelerate launch has set
        # them, a single process has not
        for key, value in (("RANK", accelerator.process_index), ("LOCAL_RANK", accelerator.local_process_index),
                           ("WORLD_SIZE", accelerator.num_processes), ("MASTER_ADDR", "localhost")):
            os.environ.setdefault(key, str(value))
        if not os.environ.get("MASTER_PORT"):
            os.environ["MASTER_PORT"] = str(free_port())
        # vLLM seeds the global random generators of the process it runs in; the run's own streams (dropout, ...)
        # continue as if it had not, so a run that builds the engine at a resumed step draws what it would have drawn
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        python_state, numpy_state = random.getstate(), numpy.random.get_state()
        with torch.random.fork_rng(devices=devices):
            self.backend = VllmBackend(self.folder.name, dtype=dtype, distributed_executor_backend="external_launcher",
                                       gpu_memory_utilization=gpu_memory_utilization, load_format="dummy",
                                       seed=accelerator.process_index)
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)

    @torch.no_grad()
    def push(self, model) -> float:
        """Load ``model``'s current weights into the engine and drop its cached KV blocks; returns the seconds."""
        started = time.perf_counter()
        runner = self.backend.llm.llm_engine.model_executor.driver_worker.model_runner
        for name, tensor in policy_weights(model):
            runner.model.load_weights([(name, tensor)])
        self.backend.llm.reset_prefix_cache()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies are asynchronous: count them in the push, not in the sampling
        return time.perf_counter() - started

    def generate(self, items: list[tuple[int, list[dict]]], settings: SamplingSettings) -> list[dict]:
        return self.backend.generate(items, settings)
