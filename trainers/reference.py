"""Reference-model strategies for losses that declare ``Needs(reference=True)``.

- ``auto`` (default): ``adapter_disabled`` for a LoRA run, else ``precomputed`` (``resolve_strategy``; the choice and
  its reason are logged).
- ``precomputed``: before training, the initial model scores the train examples the run's steps will draw (the
  sampler is deterministic: ``data.sampler.drawn_examples``) and every eval example once; the per-sequence
  log-probs are cached on disk per example under a key made of everything that changes them (``cache_key``: the
  resolved model and data configs, the precision the policy runs in, the scoring batch, chunk and tile sizes, the
  number of processes, a fingerprint of the weights and of the tokenized dataset), so a changed setting recomputes
  and a later run that draws more examples scores only those it lacks; they travel with the examples as a
  ``ref_logps`` column (null for an example no step draws). Training then runs a single model.
- ``frozen_copy``: a frozen copy of the initial model scores each batch. Under ZeRO-3 the copy is sharded too:
  it runs in a second, optimizer-less DeepSpeed engine, so it costs each rank 1/N of the model.
- ``adapter_disabled``: the policy itself with its LoRA adapter switched off (no second copy in memory).

With ``reference.model_path`` the reference is another model than the policy's initial weights (a Hugging Face
directory or hub id sharing the policy's tokenizer; e.g. the first model of an iterative run, trainers/rounds.py): it
is loaded as a frozen copy (``auto`` resolves to ``frozen_copy``; the other strategies score the policy itself and
are refused).

With ``reference.update_every`` > 0 (TR-DPO, frozen copy only) the copy follows the policy during training: after
every ``update_every``-th step, each weight the policy trains becomes ``alpha * policy + (1 - alpha) * reference``
(the weights the policy does not train are equal in both and stay so). The moved weights are part of every
checkpoint, so a resumed run scores against the reference the interrupted one had.

Every strategy scores at the policy's precision, so that a reference equal to the policy gives equal log-probs:
``precomputed`` and ``adapter_disabled`` run the prepared policy itself; the frozen copy is taken after the
policy's weights are in their training dtype (trainers/precision.py), takes the dtypes DeepSpeed gives the
prepared policy's parameters, and runs under the Accelerator's autocast, which the prepared policy's forward
carries and an unprepared module would not. Every reference pass runs in eval mode, so dropout in the base model
never makes the reference random.

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
from accelerate.utils import broadcast_object_list
from omegaconf import OmegaConf

from tunelab.data.contract import Batch
from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.trainers.distributed import is_partitioned, zero_stage
from tunelab.trainers.files import write_json_atomic
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.models import build_model
from tunelab.trainers.scoring import NO_STATS, score_examples

log = logging.getLogger(__name__)
STRATEGIES = ("auto", "precomputed", "frozen_copy", "adapter_disabled")


def resolve_strategy(cfg) -> tuple[str, str]:
    """``reference.strategy`` with ``auto`` resolved, and why. ``adapter_disabled`` is exact for LoRA: the reference
    is the initial model, which is the policy's base weights (LoRA's B starts at zero, so the adapter adds exactly
    nothing at step 0), run by the policy itself at its own precision and in eval mode; it saves the pass before
    training and a second model."""
    strategy = cfg.reference.strategy
    if strategy not in STRATEGIES:
        raise KeyError(f"unknown reference.strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    other = OmegaConf.select(cfg, "reference.model_path", default=None)
    if other and strategy not in ("auto", "frozen_copy"):
        raise ValueError(f"reference.model_path={other} needs reference.strategy=frozen_copy (or auto), not "
                         f"{strategy}, which scores with the policy's own weights")
    if other:
        return "frozen_copy", f"reference.model_path: a frozen copy of {other}"
    if strategy != "auto":
        return strategy, "set by reference.strategy"
    if cfg.model.lora.enabled:
        return "adapter_disabled", ("auto, LoRA run: the reference is the base model, i.e. the policy with its "
                                    "adapter switched off (same weights and precision, no pass before training)")
    return "precomputed", ("auto, no LoRA adapter to switch off: the initial model scores the data once before "
                           "training, cached")


def other_model_config(model_cfg, path: str):
    """``model_cfg`` for the model at ``path`` (source hf, its own tokenizer), without LoRA or checkpointing: the
    reference is frozen."""
    other = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    other.source, other.name_or_path, other.tokenizer = "hf", path, None
    other.lora.enabled, other.gradient_checkpointing, other.load_in_4bit = False, False, False
    return other


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


def _match_dtypes(copy_module: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Cast each floating parameter and buffer of ``copy_module`` to the dtype of the same-named one in ``policy``."""
    target = {name: t.dtype for name, t in [*policy.named_parameters(), *policy.named_buffers()]}
    for name, tensor in [*copy_module.named_parameters(), *copy_module.named_buffers()]:
        dtype = target.get(name)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


class Reference:
    """Built before ``accelerator.prepare`` (the copy and the weights fingerprint need the initial model);
    ``prepare`` and ``precompute`` run after it, with the prepared policy as the scorer."""

    def __init__(self, cfg, model, accelerator, rebuild=None, prefix: bool = False):
        self.strategy, self.why = resolve_strategy(cfg)
        self.prefix = prefix  # Needs.reference_prefix: the pairs' common-prefix log-probs too
        self.cfg = cfg
        self.accelerator = accelerator
        self.copy = None
        self.weights = None
        if self.strategy == "precomputed":
            self.weights = weights_fingerprint(model, accelerator)
        if self.strategy == "frozen_copy":
            partitioned = any(is_partitioned(p) for p in model.parameters())
            if partitioned and rebuild is None and not OmegaConf.select(cfg, "reference.model_path", default=None):
                raise ValueError("reference.strategy=frozen_copy: the model is sharded at load (ZeRO-3 init) and "
                                 "cannot be copied; use reference.strategy=precomputed")
            other = OmegaConf.select(cfg, "reference.model_path", default=None)
            if other:
                frozen = build_model(other_model_config(cfg.model, other), None, cfg.seed).eval()
            else:
                frozen = (rebuild() if partitioned else copy.deepcopy(model)).eval()
            frozen.requires_grad_(False)
            self.copy = CausalLMWithLogProbs(frozen, cfg.train.logits_chunk_size,
                                             attention_tile=cfg.train.attention_tile)
            if zero_stage(accelerator) != 3:
                self.copy = self.copy.to(accelerator.device)
        self.update_every = OmegaConf.select(cfg, "reference.update_every", default=0)
        if self.update_every and OmegaConf.select(cfg, "reference.model_path", default=None):
            raise ValueError("reference.update_every (TR-DPO) moves the policy's own initial copy; it cannot be "
                             "combined with reference.model_path")
        if self.update_every and zero_stage(accelerator) == 3:
            raise ValueError("reference.update_every (TR-DPO) is not supported under ZeRO-3, where the policy and the "
                             "reference copy are sharded in two engines; use ZeRO-2, DDP or one process")
        if self.strategy == "adapter_disabled" and not cfg.model.lora.enabled:
            raise ValueError("reference.strategy=adapter_disabled needs model.lora.enabled=true")

    def prepare(self, policy) -> None:
        """After the policy's ``prepare``: the frozen copy's tensors take the dtypes of the prepared policy's (which
        DeepSpeed casts to bf16/fp16 in its mixed-precision mode), and under ZeRO-3 it becomes a sharded,
        optimizer-less engine (cast by DeepSpeed the same way). Logs the strategy and why it was chosen."""
        if self.accelerator.is_main_process:
            log.info("reference: %s (%s)", self.strategy, self.why)
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

    def precompute(self, scorer, datasets: dict, collator, train_drawn: list[int], steps: range) -> dict:
        """For ``precomputed``: the datasets with a ``ref_logps`` column holding the log-probs of the train examples
        ``train_drawn`` (those the run's ``steps`` draw) and of every eval example; the rest stay null. Examples
        already in the cache are read from it, the others scored and added to it. ``scorer`` is the prepared policy
        before its first step (every rank must call this: under ZeRO-3 the scoring is collective)."""
        if self.strategy != "precomputed":
            return datasets
        wanted = {split: (train_drawn if split == "train" else range(len(ds)))
                  for split, ds in datasets.items() if ds is not None}
        paths = {split: os.path.join(self.cfg.reference.cache_dir, f"{self.cache_key(datasets[split], collator)}.json")
                 for split in wanted}
        stored = {split: self._read_cache(path) for split, path in paths.items()}
        found = {split: {i: stored[split][i] for i in wanted[split] if i in stored[split]} for split in wanted}
        # the main process's cache decides for every rank (nodes may not share a file system), so that all ranks
        # score the same examples in lockstep
        if self.accelerator.num_processes > 1:
            found = broadcast_object_list([found], from_process=0)[0]
        missing = {split: [i for i in wanted[split] if i not in found[split]] for split in wanted}
        unit = "pairs" if collator.kind == "pairs" else "examples"
        if self.accelerator.is_main_process:
            train_n, eval_n = len(datasets["train"]), len(wanted.get("eval", []))
            log.info("reference log-probs (the loss compares with the initial model): scoring %d of %d train %s "
                     "(steps %d-%d draw %d of them; %d cached) + %d of %d eval %s, cache %s", len(missing["train"]),
                     train_n, unit, steps.start + 1, steps.stop, len(wanted["train"]), len(found["train"]),
                     len(missing.get("eval", [])), eval_n, unit, self.cfg.reference.cache_dir)
        out = dict(datasets)
        for split, ds in datasets.items():
            if ds is None:
                continue
            values = found[split]
            if missing[split]:
                scored = score_examples(self.accelerator, scorer, ds, collator, self.cfg.train.eval_batch_size,
                                        indices=missing[split], description=f"reference log-probs ({split})",
                                        progress=self.cfg.train.progress_bar, with_prefix=self.prefix)
                values = {**values, **dict(zip(missing[split], scored))}
                if self.accelerator.is_main_process:
                    self._write_cache(paths[split], {**stored[split], **values})
                self.accelerator.wait_for_everyone()
            if self.prefix:  # each cached value holds the sequences' log-probs, then their common-prefix ones
                halves = [(v[:len(v) // 2], v[len(v) // 2:]) if v else (None, None)
                          for v in map(values.get, range(len(ds)))]
                ds = ds.add_column("ref_prefix_logps", [prefix for _, prefix in halves])
                out[split] = ds.add_column("ref_logps", [whole for whole, _ in halves])
            else:
                out[split] = ds.add_column("ref_logps", [values.get(i) for i in range(len(ds))])
        return out

    def _read_cache(self, path: str) -> dict[int, list[float]]:
        """The cached log-probs by example index (main process only; the others get an empty dict)."""
        if not (self.accelerator.is_main_process and os.path.exists(path)):
            return {}
        with open(path) as handle:
            return {int(i): values for i, values in json.load(handle).items()}

    @staticmethod
    def _write_cache(path: str, values: dict[int, list[float]]) -> None:
        write_json_atomic(path, {str(i): v for i, v in sorted(values.items())})

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
            "cache_format": "by_example_index",
        }
        if self.prefix:  # values twice as long: not interchangeable with a cache of sequence log-probs alone
            parts["with_prefix"] = True
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def after_step(self, step: int, policy) -> None:
        """After optimizer step ``step``: the TR-DPO update of the copy toward the policy, when one is due."""
        every = self.update_every
        if not every or step % every:
            return
        alpha = float(self.cfg.reference.update_alpha)
        with torch.no_grad():
            for mine, trained in self.moved_weights(policy).values():
                mine.mul_(1.0 - alpha).add_(trained.detach().to(mine.dtype), alpha=alpha)

    def moved_weights(self, policy) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (reference weight, policy weight) for every weight the policy trains: what a TR-DPO update moves."""
        trained = dict(self.accelerator.unwrap_model(policy).model.named_parameters())
        return {name: (p, trained[name]) for name, p in self.copy.model.named_parameters()
                if trained[name].requires_grad}

    def state_for_checkpoint(self, policy):
        """The weights a TR-DPO update moves, as an object Accelerate saves and restores with each checkpoint."""
        return _MovedWeights(self, policy)

    def with_logps(self, batch: Batch, policy) -> Batch:
        """The batch with the reference's per-sequence log-probs: as collated for the precomputed strategy (from the
        examples' ``ref_logps``), scored now by the live ones."""
        if self.strategy == "precomputed":
            return batch
        if self.strategy == "frozen_copy":
            scorer, context = self.copy, self.accelerator.autocast()
        else:
            scorer = policy
            context = self.accelerator.unwrap_model(policy).model.disable_adapter()
        # a DeepSpeed engine's own flag stays True whatever its train()/eval() did: ask the module it wraps
        was_training = self.accelerator.unwrap_model(scorer).training
        scorer.eval()  # the policy trains in train mode: its base model's dropout must not reach the reference
        with torch.no_grad(), context:
            out = scorer(batch, NO_STATS)
        scorer.train(was_training)
        return batch.with_reference(out.seq_logps.detach(), out.seq_prefix_logps.detach() if self.prefix else None)


class _MovedWeights:
    """The reference weights a TR-DPO update moves (those the policy trains), by name, for
    ``accelerator.register_for_checkpointing``."""

    def __init__(self, reference: Reference, policy):
        self.reference, self.policy = reference, policy

    def _named(self) -> dict[str, torch.Tensor]:
        return {name: mine for name, (mine, _) in self.reference.moved_weights(self.policy).items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().clone() for name, p in self._named().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        named = self._named()
        if set(state) != set(named):
            raise ValueError("the checkpoint's moved reference weights do not match this run's trained weights")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(state[name].to(p.device, p.dtype))
