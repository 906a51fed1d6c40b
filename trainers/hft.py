"""Half Fine-Tuning (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466): in each
stage a random half of the parameters is trained and the other half frozen, skipped by the optimizer.

The half is drawn per decoder layer at the level of weight matrices (the paper's "category-level" selection):
- self-attention: 2 of the 4 projections (q, k, v, o) are trained;
- feed-forward: in a random half of the layers 2 of the 3 projections (gate, up, down) are trained, in the other
  half 1 of 3, so that over the model half of the feed-forward weights train;
- everything else (embeddings, LM head, norms, a score head): ``others`` decides. The paper's rule above covers
  the matrices of each layer; for the rest tunelab's default ``half`` trains one of each layer's norms and gives
  every other tensor a fair coin, ``train`` trains them all, ``freeze`` none.
A module's bias follows its weight; tied weights are one tensor and are drawn once.

Stages: the paper draws one selection per training stage (an SFT run, a DPO run, each task of a continual
sequence); ``stage_steps: N`` draws a new one every N applied optimizer steps within a run. The selection of stage s
is a pure function of (seed, s), and the count of applied steps lives in the optimizer's param groups, which every
checkpoint saves, so a resumed run freezes exactly what the uninterrupted one did.

How a frozen tensor is skipped: its gradient is cleared as soon as backward accumulates it (so on one process the
clipped global gradient norm is that of the trained half, as when the frozen half has no gradient at all; under DDP
the gradient reduction may write the averaged gradient back before clipping, which only changes that norm) and
again just before the optimizer step, which decides. torch's optimizers leave a parameter whose
grad is None untouched: no update, no weight decay, its moments and step count unchanged. ZeRO and FSDP flatten the
parameters into shards the optimizer owns, so HFT is refused there; LoRA trains an adapter, not the model's
weights, and is refused too.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

import torch
from accelerate.utils import DistributedType

HFT_DEFAULTS = {"stage_steps": None, "others": "half"}
OTHERS = ("half", "train", "freeze")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
STEP_KEY = "hft_applied_steps"  # kept in every optimizer param group: checkpointed with the optimizer's state
_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def hft_options(value) -> dict:
    """``train.hft`` (a mapping) with its defaults filled in, checked."""
    options = {**HFT_DEFAULTS, **dict(value)}
    unknown = set(options) - set(HFT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown train.hft option(s) {sorted(unknown)}; valid: {', '.join(HFT_DEFAULTS)}")
    steps = options["stage_steps"]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"train.hft.stage_steps must be a positive integer or null (one stage), got {steps!r}")
    if options["others"] not in OTHERS:
        raise ValueError(f"train.hft.others must be one of {', '.join(OTHERS)}, got {options['others']!r}")
    return options


def _module_of(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj`` (its bias goes with it)."""
    return name.rsplit(".", 1)[0]


class HalfFineTuning:
    """The per-stage selection over ``named_parameters`` (trainable ones) and the hooks that enforce it."""

    def __init__(self, named_parameters, options: dict, seed: int):
        self.options = hft_options(options)
        self.seed = int(seed)
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        self.layers: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.others: list[list[str]] = []  # groups of tensors drawn together (a module's weight and bias)
        layer_norms: dict[int, list[list[str]]] = defaultdict(list)
        modules: dict[str, list[str]] = defaultdict(list)
        for name in self.params:
            modules[_module_of(name)].append(name)
        for module, names in modules.items():
            match = _LAYER.match(module)
            leaf = module.rsplit(".", 1)[-1]
            if match and leaf in ATTENTION + FEED_FORWARD:
                self.layers[int(match.group(1))][leaf] += names
            elif match and "norm" in leaf:
                layer_norms[int(match.group(1))].append(names)
            else:
                self.others.append(names)
        self.layer_norms = dict(layer_norms)
        missing = [i for i, parts in self.layers.items() if set(parts) != set(ATTENTION + FEED_FORWARD)]
        if not self.layers or missing:
            raise ValueError("train.hft selects among each decoder layer's q/k/v/o and gate/up/down projections "
                             "(Llama-style module names, as in the paper); this model's layers "
                             f"{missing or 'were not found'} do not have all seven. Unset train.hft")
        self.optimizer: torch.optim.Optimizer | None = None
        self._stage_cache: dict[int, frozenset[str]] = {}

    # ---- the selection ------------------------------------------------------------------------------------------
    def stage(self, applied_steps: int) -> int:
        steps = self.options["stage_steps"]
        return 0 if steps is None else applied_steps // steps

    def trained(self, stage: int) -> frozenset[str]:
        """Names of the parameters stage ``stage`` trains; the rest are frozen for that stage."""
        if stage not in self._stage_cache:
            self._stage_cache[stage] = self._draw(random.Random(f"hft:{self.seed}:{stage}"))
        return self._stage_cache[stage]

    def _draw(self, rng: random.Random) -> frozenset[str]:
        chosen: list[str] = []
        layer_ids = sorted(self.layers)
        two_ff = set(rng.sample(layer_ids, len(layer_ids) // 2 + rng.randrange(len(layer_ids) % 2 + 1)))
        for i in layer_ids:
            parts = self.layers[i]
            for leaf in rng.sample(ATTENTION, 2):
                chosen += parts[leaf]
            for leaf in rng.sample(FEED_FORWARD, 2 if i in two_ff else 1):
                chosen += parts[leaf]
        others = self.options["others"]
        if others == "train":
            chosen += [n for names in self.others for n in names]
            chosen += [n for norms in self.layer_norms.values() for names in norms for n in names]
        elif others == "half":
            for i in sorted(self.layer_norms):
                norms = self.layer_norms[i]
                for names in rng.sample(norms, len(norms) // 2 + rng.randrange(len(norms) % 2 + 1)):
                    chosen += names
            for names in self.others:
                if rng.random() < 0.5:
                    chosen += names
        return frozenset(chosen)

    # ---- enforcing it -------------------------------------------------------------------------------------------
    def applied_steps(self) -> int:
        return int(self.optimizer.param_groups[0][STEP_KEY])

    def frozen_now(self) -> frozenset[str]:
        return frozenset(self.params) - self.trained(self.stage(self.applied_steps()))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Arm the hooks on ``optimizer`` (before Accelerate wraps it) and on the parameters."""
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault(STEP_KEY, 0)
        for name, param in self.params.items():
            param.register_post_accumulate_grad_hook(self._drop_if_frozen(name))
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _drop_if_frozen(self, name: str):
        def hook(param: torch.Tensor) -> None:
            if name not in self.trained(self.stage(self.applied_steps())):
                param.grad = None
        return hook

    def _before_step(self, optimizer, args, kwargs) -> None:
        for name in self.frozen_now():
            self.params[name].grad = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            group[STEP_KEY] += 1


def attach_half_fine_tuning(optimizer, model: torch.nn.Module, train_cfg, seed: int, accelerator):
    """HFT armed on ``optimizer`` when ``train.hft`` is set (None otherwise)."""
    value = train_cfg.get("hft")
    if value is None:
        return None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise ValueError(f"train.hft skips frozen tensors in the optimizer, which {accelerator.distributed_type.value} "
                         "shards into flat buffers it owns; use DDP or one process, or unset train.hft")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("train.hft selects half of the model's own weights; a LoRA run trains an adapter instead. "
                         "Set model.lora.enabled=false or unset train.hft")
    hft = HalfFineTuning(model.named_parameters(), value, seed)
    hft.attach(optimizer)
    return hft
