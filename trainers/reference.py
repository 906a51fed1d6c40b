"""Reference-model strategies for losses that declare ``Needs(reference=True)``.

- ``precomputed``: before training, the initial model scores every train and eval example once; the per-
  sequence log-probs are cached on disk under a key made of the model's config, a fingerprint of its weights
  and the tokenized dataset's fingerprint (so a changed model or dataset misses the cache), and travel with the
  examples as a ``ref_logps`` column. Training then runs a single model.
- ``frozen_copy``: a frozen copy of the initial model scores each batch.
- ``adapter_disabled``: the policy itself with its LoRA adapter switched off (no second copy in memory).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from contextlib import nullcontext

import torch
from omegaconf import OmegaConf

from losses.base import Needs
from trainers.forward import CausalLMWithLogProbs

log = logging.getLogger(__name__)
STRATEGIES = ("precomputed", "frozen_copy", "adapter_disabled")
NO_STATS = Needs()


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(repr(float(param.detach().double().sum())).encode())
    return digest.hexdigest()[:16]


def content_fingerprint(dataset) -> str:
    """Hash of a dataset's token columns (datasets' own fingerprint is random for in-memory data)."""
    digest = hashlib.sha256()
    table = dataset.with_format(None).data.table
    if dataset._indices is not None:
        table = dataset.flatten_indices().data.table
    for name in sorted(table.column_names):
        digest.update(name.encode())
        for chunk in table.column(name).chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(memoryview(buffer))
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


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Reference:
    def __init__(self, cfg, model, accelerator):
        self.strategy = cfg.reference.strategy
        if self.strategy not in STRATEGIES:
            raise KeyError(f"unknown reference.strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        self.cfg = cfg
        self.accelerator = accelerator
        self.copy = None
        if self.strategy == "frozen_copy":
            frozen = copy.deepcopy(model).eval()
            frozen.requires_grad_(False)
            self.copy = CausalLMWithLogProbs(frozen, cfg.train.logits_chunk_size).to(accelerator.device)
        if self.strategy == "adapter_disabled" and not cfg.model.lora.enabled:
            raise ValueError("reference.strategy=adapter_disabled needs model.lora.enabled=true")

    def precompute(self, model, datasets: dict, collator) -> dict:
        """For ``precomputed``: datasets with a ``ref_logps`` column, from the cache when the key matches."""
        if self.strategy != "precomputed":
            return datasets
        scorer = CausalLMWithLogProbs(model, self.cfg.train.logits_chunk_size).to(self.accelerator.device)
        model_key = json.dumps(OmegaConf.to_container(self.cfg.model, resolve=True), sort_keys=True)
        weights = weights_fingerprint(model)
        out = {}
        for split, ds in datasets.items():
            if ds is None:
                out[split] = None
                continue
            key_text = f"{model_key}|{weights}|{content_fingerprint(ds)}|{collator.kind}"
            key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
            path = os.path.join(self.cfg.reference.cache_dir, f"{key}.json")
            if os.path.exists(path):
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
                log.info("reference log-probs (%s): computed %d examples -> %s", split, len(values), path)
            out[split] = ds.add_column("ref_logps", values)
        return out

    def attach(self, batch: dict, policy) -> None:
        """For live strategies: put the reference's per-sequence log-probs into the batch."""
        if self.strategy == "precomputed":
            return
        if self.strategy == "frozen_copy":
            scorer, context = self.copy, nullcontext()
        else:
            scorer = policy
            context = self.accelerator.unwrap_model(policy).model.disable_adapter()
        with torch.no_grad(), context:
            batch["ref_seq_logps"] = scorer(batch, NO_STATS).seq_logps.detach()
