"""Reference-model strategies for losses that declare ``Needs(reference=True)``.

- ``precomputed``: before training, the initial model scores every train and eval example once; the per-
  sequence log-probs are cached on disk under a key made of everything that changes them (``cache_key``: the
  resolved model and data configs, the precision the policy runs in, the scoring batch, chunk and tile sizes,
  the number of processes, a fingerprint of the weights and of the tokenized dataset), so a changed setting
  recomputes; they travel with the examples as a ``ref_logps`` column. Training then runs a single model.
- ``frozen_copy``: a frozen copy of the initial model scores each batch. Under ZeRO-3 the copy is sharded too:
  it runs in a second, optimizer-less DeepSpeed engine, so it costs each rank 1/N of the model.
- ``adapter_disabled``: the policy itself with its LoRA adapter switched off (no second copy in memory).

Every strategy scores at the policy's precision, so that a reference equal to the policy gives equal log-probs:
``precomputed`` and ``adapter_disabled`` run the prepared policy itself; the frozen copy is taken after the
policy's weights are in their training dtype (trainers/precision.py), takes the dtypes DeepSpeed gives the
prepared policy's parameters, and runs under the Accelerator's autocast, which the prepared policy's forward
carries and an unprepared module would not.

Under ZeRO-3 every scoring pass runs the sharded model, which gathers each layer's weights collectively: all
ranks run the same number of forwards in lockstep (a rank without work scores a dummy batch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os

import torch
from accelerate.utils import gather_object
from omegaconf import OmegaConf

from data.fingerprint import dataset_fingerprint
from losses.base import Needs
from trainers.distributed import is_partitioned, zero_stage
from trainers.forward import CausalLMWithLogProbs

log = logging.getLogger(__name__)
STRATEGIES = ("precomputed", "frozen_copy", "adapter_disabled")
NO_STATS = Needs()


def weights_fingerprint(model: torch.nn.Module, accelerator=None) -> str:
    """Hash of the parameter names and sums. Under ZeRO-3 (partitioned parameters) each rank sums its own
    shards and the sums are added over ranks, a collective call: every rank must call it. Those sums may differ
    from an unsharded model's in the last bits, so such a run can miss a cache made without ZeRO-3 (never hit a
    wrong one)."""
    named = list(model.named_parameters())
    if any(is_partitioned(p) for _, p in named):
        sums = torch.stack([p.ds_tensor.detach().double().sum().cpu() for _, p in named])
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        values = sums.tolist()
    else:
        values = [float(p.detach().double().sum()) for _, p in named]
    digest = hashlib.sha256()
    for (name, _), value in zip(named, values):
        digest.update(name.encode())
        digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


def score_dataset(accelerator, scorer: CausalLMWithLogProbs, dataset, collator, batch_size: int) -> list[list[float]]:
    """Per-example reference log-probs (one per sequence of the example), computed across all ranks."""
    rank, world = accelerator.process_index, accelerator.num_processes
    n = len(dataset)
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    steps = -(-per_rank // batch_size)
    results: list[tuple[int, list[float]]] = []
    scorer.eval()
    with torch.no_grad():
        for s in range(steps):
            chunk = mine[s * batch_size:(s + 1) * batch_size]
            idx = chunk or [0]  # ranks stay in lockstep (ZeRO-3 gathers weights collectively)
            examples = [dataset[i] for i in idx]
            batch = _to_device(collator(examples), accelerator.device)
            out = scorer(batch, NO_STATS)
            per_example = out.seq_logps.float().view(len(idx), -1).tolist()
            results += list(zip(chunk, per_example))
    gathered = accelerator.gather_for_metrics([results], use_gather_object=True) if world > 1 else [results]
    table = dict(pair for part in gathered for pair in part)
    return [table[i] for i in range(n)]


def _match_dtypes(copy_module: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Cast each floating parameter and buffer of ``copy_module`` to the dtype of the same-named one in ``policy``."""
    target = {name: t.dtype for name, t in [*policy.named_parameters(), *policy.named_buffers()]}
    for name, tensor in [*copy_module.named_parameters(), *copy_module.named_buffers()]:
        dtype = target.get(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Reference:
    """Built before ``accelerator.prepare`` (the copy and the weights fingerprint need the initial model);
    ``prepare`` and ``precompute`` run after it, with the prepared policy as the scorer."""

    def __init__(self, cfg, model, accelerator, rebuild=None):
        self.strategy = cfg.reference.strategy
        if self.strategy not in STRATEGIES:
            raise KeyError(f"unknown reference.strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        self.cfg = cfg
        self.accelerator = accelerator
        self.copy = None
        self.weights = None
        if self.strategy == "precomputed":
            self.weights = weights_fingerprint(model, accelerator)
        if self.strategy == "frozen_copy":
            partitioned = any(is_partitioned(p) for p in model.parameters())
            if partitioned and rebuild is None:
                raise ValueError("reference.strategy=frozen_copy: the model is sharded at load (ZeRO-3 init) and "
                                 "cannot be copied; use reference.strategy=precomputed")
            frozen = (rebuild() if partitioned else copy.deepcopy(model)).eval()
            frozen.requires_grad_(False)
            self.copy = CausalLMWithLogProbs(frozen, cfg.train.logits_chunk_size,
                                             attention_tile=cfg.train.attention_tile)
            if zero_stage(accelerator) != 3:
                self.copy = self.copy.to(accelerator.device)
        if self.strategy == "adapter_disabled" and not cfg.model.lora.enabled:
            raise ValueError("reference.strategy=adapter_disabled needs model.lora.enabled=true")

    def prepare(self, policy) -> None:
        """After the policy's ``prepare``: the frozen copy's tensors take the dtypes of the prepared policy's (which
        DeepSpeed casts to bf16/fp16 in its mixed-precision mode), and under ZeRO-3 it becomes a sharded,
        optimizer-less engine (cast by DeepSpeed the same way)."""
        if self.copy is None:
            return
        if zero_stage(self.accelerator) != 3:
            _match_dtypes(self.copy, self.accelerator.unwrap_model(policy))
            return
        import deepspeed

        config = copy.deepcopy(self.accelerator.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=self.copy, config=config)
        engine.eval()
        self.copy = engine
        log.info("reference.strategy=frozen_copy: the reference runs sharded (ZeRO-3, no optimizer)")

    def precompute(self, scorer, datasets: dict, collator) -> dict:
        """For ``precomputed``: datasets with a ``ref_logps`` column, from the cache when the key matches.
        ``scorer`` is the prepared policy before its first step (under ZeRO-3 every rank must call this)."""
        if self.strategy != "precomputed":
            return datasets
        out = {}
        for split, ds in datasets.items():
            if ds is None:
                out[split] = None
                continue
            path = os.path.join(self.cfg.reference.cache_dir, f"{self.cache_key(ds, collator)}.json")
            # every rank takes the same branch (a rank alone in score_dataset would wait for the others forever):
            # the cache is used only if every rank sees it (nodes may not share a file system)
            hit = [os.path.exists(path)]
            if self.accelerator.num_processes > 1:
                hit = gather_object(hit)
            if all(hit):
                with open(path) as handle:
                    values = json.load(handle)
                log.info("reference log-probs (%s): cache hit %s", split, path)
            else:
                values = score_dataset(self.accelerator, scorer, ds, collator, self.cfg.train.eval_batch_size)
                if self.accelerator.is_main_process:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    tmp = f"{path}.tmp{os.getpid()}"
                    with open(tmp, "w") as handle:
                        json.dump(values, handle)
                    os.replace(tmp, path)
                self.accelerator.wait_for_everyone()
                log.info("reference log-probs (%s): computed %d examples -> %s", split, len(values), path)
            out[split] = ds.add_column("ref_logps", values)
        return out

    def cache_key(self, dataset, collator) -> str:
        """Everything that changes the reference log-probs of ``dataset``. The tokenized content reflects the
        template and truncation; the data config is in the key as well because some of its settings (packing,
        shared prompts, row length) change how the tokens are laid out in rows, not the tokens. The layout, the
        scoring batch and the process count decide what shares a row, and so the float rounding."""
        acc, train = self.accelerator, self.cfg.train
        parts = {
            "model": OmegaConf.to_container(self.cfg.model, resolve=True),
            "data": OmegaConf.to_container(self.cfg.data, resolve=True),
            "precision": {"mixed_precision": str(acc.mixed_precision), "autocast": bool(acc.native_amp),
                          "distributed_type": str(acc.distributed_type), "zero_stage": zero_stage(acc)},
            "scoring": {"batch_size": train.eval_batch_size, "logits_chunk_size": train.logits_chunk_size,
                        "attention_tile": train.attention_tile, "processes": acc.num_processes,
                        "layout": collator.kind},
            "weights": self.weights,
            "content": dataset_fingerprint(dataset),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def attach(self, batch: dict, policy) -> None:
        """For live strategies: put the reference's per-sequence log-probs into the batch."""
        if self.strategy == "precomputed":
            return
        if self.strategy == "frozen_copy":
            scorer, context = self.copy, self.accelerator.autocast()
        else:
            scorer = policy
            context = self.accelerator.unwrap_model(policy).model.disable_adapter()
        with torch.no_grad(), context:
            batch["ref_seq_logps"] = scorer(batch, NO_STATS).seq_logps.detach()
