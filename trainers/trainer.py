"""The Trainer core: one loss-agnostic loop on Accelerate (DDP, DeepSpeed, FSDP, CPU alike).

Per optimizer step: take this rank's micro-batches, count every unit a loss can average over (labelled
tokens, sequences, pairs) across all micro-batches and ranks, then for each micro-batch run the forward,
let the loss set turn ``ForwardOutputs`` into per-unit sums, divide each by its global count and backpropagate.
The result is the gradient of the true mean over the whole global batch, however it is split.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import time
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import OmegaConf

from tunelab.data.collate import Collator
from tunelab.data.contract import Batch
from tunelab.data.fingerprint import check_same_data_on_every_rank
from tunelab.data.pipeline import build_datasets
from tunelab.data.sampler import (
    DEFAULT_ORDERING,
    ORDERINGS,
    derive_accumulation,
    drawn_examples,
    micro_batches,
    steps_per_epoch,
)
from tunelab.data.sources import expand_short_form
from tunelab.losses import build_loss
from tunelab.losses.base import Metric
from tunelab.trainers import checkpoint
from tunelab.trainers.config_check import check_config, check_resume_compatible
from tunelab.trainers.distributed import build_accelerator, fill_model_keys, init_state, is_deepspeed, zero_stage
from tunelab.trainers.evaluation import greedy_answers
from tunelab.trainers.export import export_model
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.hft import attach_half_fine_tuning
from tunelab.trainers.input_noise import InputNoise
from tunelab.trainers.interrupt import StopRequest, TrainingInterrupted
from tunelab.trainers.metrics import MetricAccumulator
from tunelab.trainers.models import build_model, build_tokenizer
from tunelab.trainers.online import OnlineSource, prompt_dataset
from tunelab.trainers.optim import build_optimizer, build_scheduler
from tunelab.trainers.precision import resolve_precision
from tunelab.trainers.reference import Reference
from tunelab.trainers.scoring import rank_batches
from tunelab.trainers.sequence_parallel import enable_sequence_parallel
from tunelab.trainers.tracking import RunTracker, format_summary, tracker_names

log = logging.getLogger("tunelab")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm, or the weights about to be written, hold NaN or inf."""


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of this rank's parameters holding NaN or inf (under ZeRO-3, in this rank's shard)."""
    return [name for name, param in module.named_parameters()
            if not torch.isfinite(getattr(param, "ds_tensor", param.data)).all()]


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, as ``Trainer.train_step`` returns it."""

    step: int  # the step just completed, counted from 1; Trainer.step equals it afterwards
    loss: float  # the objective over the whole global batch (every micro-batch on every rank)
    tokens: int  # tokens in the step's rows on all ranks, prompts included and padding not
    metrics: MetricAccumulator  # this rank's unreduced metric sums, merged into the logging interval's
    skipped: bool  # the loss or gradient norm was non-finite and train.on_nonfinite=skip: no update was applied


class OfflineSource:
    """Each step's batches from a fixed dataset: the drawn examples, collated (the online source, trainers/online.py,
    samples them from the policy instead)."""

    metrics: dict[str, Metric] = {}  # nothing to add to a step's metrics

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, step: int, micro: list[list[int]], dataset, policy) -> list[Batch]:
        return [self.collator([dataset[i] for i in idx]) for idx in micro]


class RunDirError(FileExistsError):
    """output_dir holds another run and this one does not resume it."""


def decide_on_main(state: PartialState, decide):
    """Run ``decide()`` on the main process only and give its result, or its error, to every rank, so that all
    ranks go on with the same choice or all stop."""
    outcome = [None, None]
    if state.is_main_process:
        try:
            outcome[0] = decide()
        except Exception as err:  # re-raised below on every rank
            outcome[1] = err
    if state.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def prompt_ids(example: dict) -> list[int]:
    """A tokenized example's prompt (chat template applied, up to the first labelled token of an SFT example)."""
    if "prompt_ids" in example:
        return list(example["prompt_ids"])
    return list(example["input_ids"][:list(example["target_mask"]).index(1)])


def new_run_dir(recipe_name: str) -> str:
    """A fresh runs/<recipe>/<time>_<random id>: creating it fails if it exists, so runs started in the same
    second (or given the same id) never share one."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    while True:
        path = os.path.join("runs", recipe_name, f"{stamp}_{secrets.token_hex(3)}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


def prepare_run_dir(cfg, resolved: dict, recipe_name: str) -> tuple[str, str | None]:
    """The run directory and the verified checkpoint to resume from (or None). A given output_dir that is not
    empty belongs to another run unless this one resumes; the checkpoint's config must be compatible."""
    resuming = cfg.resume not in (None, "", "none")
    if cfg.output_dir:
        output_dir = str(cfg.output_dir)
        entries = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
        if entries and not resuming:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunDirError(
                f"output_dir={output_dir} is not empty ({shown}): it holds another run. Continue that run with "
                "resume=auto or resume=latest, or choose another output_dir (or none, for a fresh "
                f"runs/{recipe_name}/<time>_<id>)"
            )
    else:
        output_dir = new_run_dir(recipe_name)
    resume_from = checkpoint.resolve_resume(cfg.resume, output_dir)
    if resume_from:
        check_resume_compatible(checkpoint.read_state(resume_from).get("config"), resolved, resume_from)
    return output_dir, resume_from


class Trainer:
    def __init__(self, cfg, recipe_name: str = "run"):
        expand_short_form(cfg.data)  # before the config is checked and saved: it records the one-source list
        check_config(cfg)
        self.cfg = cfg
        self.recipe_name = recipe_name
        self.resolved_config = OmegaConf.to_container(cfg, resolve=True)
        train = cfg.train
        self.loss_set = build_loss(cfg.loss, cfg.get("pair_weighting"))
        self.needs = self.loss_set.needs
        if train.eval_samples and self.needs.sequence_scores:
            raise ValueError("train.eval_samples: this run trains a score head (a reward model), which does not "
                             "generate; set train.eval_samples=0")
        self.kind = self.needs.layout
        state = init_state()
        sequence_parallel = train.sequence_parallel  # ranks sharing each micro-batch's positions
        self.accumulation = derive_accumulation(train.global_batch_size, train.micro_batch_size,
                                                state.num_processes // sequence_parallel)
        self.output_dir, self.resume_from = decide_on_main(
            state, lambda: prepare_run_dir(cfg, self.resolved_config, recipe_name))
        self.precision = resolve_precision(cfg.model, train, state)
        self.accelerator = acc = build_accelerator(train, state, self.accumulation, self.output_dir,
                                                   self.precision.mixed_precision,
                                                   log_with=tracker_names(train) or None)
        set_seed(cfg.seed)
        if acc.is_main_process:
            os.makedirs(self.output_dir, exist_ok=True)
            OmegaConf.save(cfg, os.path.join(self.output_dir, "config.yaml"), resolve=True)

        self.tokenizer = build_tokenizer(cfg.model)
        online = cfg.online.enabled  # online: the data config gives prompts, and each step samples its pairs
        with acc.main_process_first():
            train_ds, eval_ds, self.data_counts = (prompt_dataset if online else build_datasets)(
                cfg.data, self.tokenizer, self.kind, cfg.seed, columns=self.needs.columns)
        check_same_data_on_every_rank({"train": train_ds, "eval": eval_ds})
        self.collator = Collator(
            self.kind, packing=cfg.data.packing, shared_prompt=cfg.data.shared_prompt, row_length=cfg.data.max_length,
            columns=sorted(self.needs.columns),
        )
        # where each step's batches come from: the drawn examples collated, or pairs sampled from the policy
        self.batch_source = (OnlineSource(cfg, self.tokenizer, self.collator, acc, self.output_dir) if online
                             else OfflineSource(self.collator))
        model = self.precision.prepare_model(
            build_model(cfg.model, self.tokenizer, cfg.seed, sequence_scores=self.needs.sequence_scores))
        self.reference = None
        if self.needs.reference:
            rebuild = lambda: build_model(cfg.model, self.tokenizer, cfg.seed)  # noqa: E731 (ZeRO-3 frozen copy)
            self.reference = Reference(cfg, model, acc, rebuild=rebuild, prefix=self.needs.reference_prefix)

        self.steps_per_epoch = steps_per_epoch(len(train_ds), train.global_batch_size)
        self.total_steps = train.max_steps or self.steps_per_epoch * train.epochs
        self.input_noise = InputNoise(train, model, self.tokenizer, self.kind, self.total_steps, cfg.seed)
        self.sequence_parallel = (enable_sequence_parallel(model, sequence_parallel, acc.num_processes,
                                                           is_deepspeed(acc), self.needs)
                                  if sequence_parallel > 1 else None)
        policy = CausalLMWithLogProbs(model, train.logits_chunk_size, keep_bytes=int(train.logits_keep_mb * 2 ** 20),
                                      attention_tile=train.attention_tile, sequence_parallel=self.sequence_parallel)
        optimizer = build_optimizer(policy.parameters(), train, self.precision.compensated_updates)
        self.half_fine_tuning = attach_half_fine_tuning(optimizer, model, train, cfg.seed, acc)
        self.scheduler = build_scheduler(optimizer, train, self.total_steps)
        fill_model_keys(acc, model)
        self.policy, self.optimizer = acc.prepare(policy, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        if self.loss_set.stateful:
            acc.register_for_checkpointing(self.loss_set)
        self.ordering = ORDERINGS[cfg.data.get("ordering", DEFAULT_ORDERING)]  # a known name: check_config saw to it
        if self.reference is not None:
            # scored by the prepared policy (under ZeRO-3 only the engine can run the sharded model); only the train
            # examples the remaining steps draw
            self.reference.prepare(self.policy)
            if self.reference.update_every:
                acc.register_for_checkpointing(self.reference.state_for_checkpoint(self.policy))
            start = checkpoint.read_state(self.resume_from)["step"] if self.resume_from else 0
            steps = range(start, self.total_steps)
            drawn = drawn_examples(self.ordering, train_ds, cfg.seed, train.global_batch_size, steps)
            datasets = self.reference.precompute(self.policy, {"train": train_ds, "eval": eval_ds}, self.collator,
                                                 drawn, steps)
            train_ds, eval_ds = datasets["train"], datasets["eval"]
        self.train_ds, self.eval_ds = train_ds, eval_ds
        self.step = 0
        self.skipped_steps = 0
        self.history: list[dict] = []

    # ---- batches -------------------------------------------------------------------------------------------
    def _step_batches(self, step: int) -> list[Batch]:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        order = self.ordering(self.train_ds, self.cfg.seed, epoch)
        rank, ranks = self._data_parallel()
        groups = micro_batches(order, in_epoch, self.cfg.train.global_batch_size, rank, ranks,
                               self.cfg.train.micro_batch_size)
        return self.batch_source(step, groups, self.train_ds, self.policy)

    def _data_parallel(self) -> tuple[int, int]:
        """(this rank's index, number of ranks) among those given distinct micro-batches: the ranks of a sequence-
        parallel group share theirs."""
        acc = self.accelerator
        if self.sequence_parallel is None:
            return acc.process_index, acc.num_processes
        return self.sequence_parallel.data_parallel(acc.process_index, acc.num_processes)

    def _sum_over_batches(self, local: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of per-rank totals of the step's micro-batches, each micro-batch counted once."""
        total = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum")
        return total / self.sequence_parallel.size if self.sequence_parallel is not None else total

    def _global_counts(self, batches: list[Batch]) -> dict[str, float]:
        units = sorted(batches[0].counts)
        local = torch.tensor([[b.counts[u] for u in units] for b in batches], dtype=torch.float64).sum(0)
        return dict(zip(units, self._sum_over_batches(local).tolist()))

    def _loss_sums(self, batch: Batch) -> tuple[dict, dict[str, Metric]]:
        """The loss set's per-unit sums and metrics for one micro-batch: the one forward-and-loss path, shared by
        training (which divides by the step's global counts) and evaluation (which divides by the eval set's)."""
        batch = batch.to(self.accelerator.device)
        if self.reference is not None:
            batch = self.reference.with_logps(batch, self.policy)
        return self.loss_set(self.policy(batch, self.needs))

    # ---- training ------------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:
        """Run optimizer step ``self.step + 1`` (or skip it, see StepResult.skipped) and advance ``self.step``."""
        acc = self.accelerator
        started = time.perf_counter()
        batches = self._step_batches(self.step)
        batches_done = time.perf_counter()
        counts = self._global_counts(batches)
        accum = MetricAccumulator()
        accum.add(self.batch_source.metrics)
        # every rank adds its micro-batches' metric sums (a sequence-parallel group adds the same ones size times)
        accum.add_units({u: c / self._data_parallel()[1] for u, c in counts.items()})
        step_loss = torch.zeros((), dtype=torch.float64, device=acc.device)
        tokens = 0
        self.policy.train()
        for micro, batch in enumerate(batches):
            with acc.accumulate(self.policy), \
                    self.input_noise.applied(batch, self.step, acc.process_index, micro) as batch:
                sums, metrics = self._loss_sums(batch)
                loss = sum(total / counts[unit] for unit, total in sums.items() if counts[unit] > 0)
                # Accelerate (or DeepSpeed) divides by the accumulation steps and DDP averages over ranks:
                # undo both so the gradient is that of the global-batch mean. (Sequence parallelism: each rank's
                # gradient is its positions' share, and the sum over all ranks the unsharded gradient.)
                acc.backward(loss * acc.num_processes * self.accumulation)
                step_loss += loss.detach().double()
                accum.add(metrics)
                tokens += batch.num_tokens
        local = torch.stack([step_loss, torch.tensor(float(tokens), dtype=torch.float64, device=acc.device)])
        step_loss, tokens = self._sum_over_batches(local).tolist()
        grad_norm = self._grad_norm()
        if grad_norm is not None:
            accum.add({"grad_norm": Metric(grad_norm)})
        # Under fp16 loss scaling an overflowing gradient is routine: the scaler skips that step and lowers its
        # scale, so only the loss decides there.
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm) and acc.mixed_precision != "fp16"
        skipped = not math.isfinite(step_loss) or bad_norm
        if skipped:
            what = f"loss is {step_loss}" if not math.isfinite(step_loss) else f"gradient norm is {grad_norm}"
            if self.cfg.train.on_nonfinite == "stop":
                applied = ("DeepSpeed applied its optimizer step in memory; nothing was written" if is_deepspeed(acc)
                           else "raised before its optimizer step: no weight was changed")
                raise NonFiniteError(
                    f"{what} at step {self.step + 1} ({applied}); last metrics: "
                    f"{self.history[-1] if self.history else 'none'}. Lower train.lr, check the data, or set "
                    "train.on_nonfinite=skip to skip such steps and count them."
                )
            self.skipped_steps += 1
            log.warning("%s at step %d: step skipped (%d so far)", what, self.step + 1, self.skipped_steps)
        else:
            self.optimizer.step()
            self.scheduler.step()
            if self.loss_set.stateful:
                self.loss_set.after_step(accum.reduce(acc))
        self.optimizer.zero_grad(set_to_none=True)
        accum.add({"time/batches_s": Metric(batches_done - started),  # online: sampling and labelling the pairs
                   "time/train_s": Metric(time.perf_counter() - batches_done)})  # forward, backward, update
        self.step += 1
        if self.reference is not None:
            self.reference.after_step(self.step, self.policy)
        return StepResult(self.step, step_loss, int(tokens), accum, skipped)

    def _grad_norm(self) -> float | None:
        """The global gradient norm after unscaling, clipped to train.max_grad_norm if set. Without clipping the
        bound is infinite, which measures the norm and scales every gradient by exactly 1. None under DeepSpeed
        before its engine has stepped."""
        max_norm = self.cfg.train.max_grad_norm or math.inf
        norm = self.accelerator.clip_grad_norm_(self.policy.parameters(), max_norm)
        return None if norm is None else float(norm)

    def _refuse_nonfinite_weights(self, what: str) -> None:
        """Every rank checks its parameters (its shards under ZeRO-3); all ranks refuse together."""
        local = nonfinite_parameters(self.policy)
        total = int(self.accelerator.reduce(torch.tensor(len(local), device=self.accelerator.device), "sum"))
        if total:
            named = f" (this rank: {', '.join(local[:3])}{', ...' if len(local) > 3 else ''})" if local else ""
            raise NonFiniteError(
                f"refusing to write {what} at step {self.step}: {total} parameter tensors hold NaN or inf{named}. "
                "Nothing was written; the checkpoints already on disk are intact. Lower train.lr or check the data, "
                "then resume from the last checkpoint."
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_ds is None:
            return {}
        acc = self.accelerator
        self.policy.eval()
        accum = MetricAccumulator()
        sums: dict[str, float] = {}
        unit_totals: dict[str, float] = {}
        for idx in rank_batches(len(self.eval_ds), self.cfg.train.eval_batch_size, acc.process_index,
                                acc.num_processes):
            batch = self.collator([self.eval_ds[i] for i in (idx or [0])])
            unit_sums, metrics = self._loss_sums(batch)
            if not idx:  # a forward only to keep the ranks in lockstep: not counted
                continue
            for unit, total in unit_sums.items():
                sums[unit] = sums.get(unit, 0.0) + float(total)
            for unit, c in batch.counts.items():
                unit_totals[unit] = unit_totals.get(unit, 0.0) + c
            accum.add(metrics)
        accum.add_units(unit_totals)
        units = sorted(set(sums) | set(unit_totals))
        flat = torch.tensor([sums.get(u, 0.0) for u in units] + [unit_totals.get(u, 0.0) for u in units],
                            dtype=torch.float64, device=acc.device)
        flat = acc.reduce(flat, reduction="sum").tolist()
        k = len(units)
        loss = sum(flat[i] / flat[k + i] for i in range(k) if flat[k + i] > 0 and units[i] in sums)
        self.policy.train()
        return {"loss": loss, **accum.reduce(acc)}

    def _log_samples(self, tracker: RunTracker) -> None:
        """Greedy answers to the first ``train.eval_samples`` eval prompts (train prompts without eval data), logged
        at an evaluation. Every rank generates the same answers: under ZeRO-3 the weights are gathered collectively."""
        count = self.cfg.train.eval_samples
        data = self.eval_ds if self.eval_ds is not None else self.train_ds
        if not count:
            return
        prompts = [prompt_ids(data[i]) for i in range(min(count, len(data)))]
        model = self.accelerator.unwrap_model(self.policy).model
        model.eval()
        answers = greedy_answers(model, self.tokenizer, prompts, self.cfg.train.eval_sample_tokens,
                                 synced_gpus=zero_stage(self.accelerator) == 3)
        model.train()
        tracker.log_samples(self.step, [{"prompt": self.tokenizer.decode(p, skip_special_tokens=True), "output": a}
                                        for p, a in zip(prompts, answers)])

    def _interrupted_message(self, signal_number: int, saved: str) -> str:
        name = signal.Signals(signal_number).name
        return (f"stopped by {name} after step {self.step}/{self.total_steps}: checkpoint {saved}. To continue, "
                f"run the same command with output_dir={self.output_dir} resume=latest")

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if self.resume_from:
            state = checkpoint.load(acc, self.resume_from)
            self.step, self.skipped_steps = state["step"], state.get("skipped_steps", 0)
            log.info("resumed from %s at step %d", self.resume_from, self.step)
        if acc.is_main_process:
            log.info("run dir %s | %d examples, %d steps (%d/epoch) | global batch %d = %d micro x %d ranks x %d "
                     "accumulation", self.output_dir, len(self.train_ds), self.total_steps, self.steps_per_epoch,
                     cfg.train.global_batch_size, cfg.train.micro_batch_size, self._data_parallel()[1],
                     self.accumulation)
        tracker = RunTracker(acc, self.output_dir, self.total_steps, self.step, cfg.train,
                             OmegaConf.to_container(cfg, resolve=True))
        started = tracker.clock()
        first_eval = self.evaluate() if self.step == 0 and cfg.train.eval_at_start else None
        if first_eval:
            tracker.log(0, "eval", first_eval)
        if self.step == 0 and cfg.train.eval_at_start:
            self._log_samples(tracker)
        interval, interval_losses = MetricAccumulator(), []
        last_eval, saved = first_eval, None
        with StopRequest().listening() as stop:
            while self.step < self.total_steps:
                tracker.start_step()
                result = self.train_step()
                tracker.step(result.tokens, result.loss)
                interval.merge(result.metrics)
                interval_losses.append(result.loss)
                last = self.step == self.total_steps
                signal_number = 0 if last else stop.agreed(acc)
                if self.step % cfg.train.log_every == 0 or last or signal_number:
                    metrics = {"loss": sum(interval_losses) / len(interval_losses), **interval.reduce(acc),
                               "lr": self.scheduler.get_last_lr()[0],
                               "tokens_per_s": tracker.interval_tokens_per_second()}
                    if self.skipped_steps:
                        metrics["skipped_steps"] = self.skipped_steps
                    tracker.log(self.step, "train", metrics)
                    self.history.append(metrics)
                    interval, interval_losses = MetricAccumulator(), []
                if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last:
                    last_eval = self.evaluate()
                    if last_eval:
                        tracker.log(self.step, "eval", last_eval)
                    self._log_samples(tracker)
                if self.step % cfg.train.save_every == 0 or last or signal_number:
                    self._refuse_nonfinite_weights(f"the step-{self.step} checkpoint")
                    saved = checkpoint.save(acc, self.output_dir, self.step,
                                            {"step": self.step, "skipped_steps": self.skipped_steps,
                                             "config": self.resolved_config}, cfg.train.keep_last)
                if signal_number:
                    tracker.close(self._plot_title() if cfg.train.plot else None)
                    raise TrainingInterrupted(signal_number, self._interrupted_message(signal_number, saved))
        curves = tracker.close(self._plot_title() if cfg.train.plot else None)
        exported = None
        if cfg.export.enabled:
            self._refuse_nonfinite_weights("the export")
            exported = export_model(acc, self.policy, self.tokenizer, self.output_dir, cfg.export.merge_lora)
        summary = {"output_dir": self.output_dir, "steps": self.step, "skipped_steps": self.skipped_steps,
                   "eval_before": first_eval, "eval_after": last_eval,
                   "train_last": self.history[-1] if self.history else None,
                   "wall_seconds": tracker.clock() - started, "train_seconds": tracker.train_seconds,
                   "tokens": tracker.tokens, "metrics_file": tracker.path, "checkpoint": saved, "export": exported,
                   "curves": curves}
        if acc.is_main_process:
            log.info("%s", format_summary(summary))
        return summary

    def _plot_title(self) -> str:
        model = self.cfg.model
        return (f"{os.path.basename(self.output_dir)} | recipe {self.recipe_name} | "
                f"model {model.get('name_or_path') or model.source}")
