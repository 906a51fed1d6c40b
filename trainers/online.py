"""Online preference learning (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
2402.04792): the batch source that samples each optimizer step's pairs from the current policy and labels them with
a reward model, so any pairwise loss (dpo, simpo, ...) trains on fresh, on-policy pairs.

The Trainer draws a step's prompts exactly as it draws offline examples (data/sampler.py: a function of seed, epoch
and step) and hands each rank its micro-batches of prompts; ``OnlineSource`` turns them into pair batches:

1. sample ``online.samples_per_prompt`` responses per prompt from the policy as it is now (the unwrapped model, LoRA
   adapter included, in eval mode and without gradient; trainers/generation.TransformersBackend: the tokenizer's
   chat template, KV cache). Each sample has its own generator seeded by (seed, step, prompt index, sample index)
   (``step_seed`` then generation's ``sample_seed``), so a resumed run regenerates the very same samples. With
   ``online.backend=vllm`` a colocated vLLM engine samples instead (trainers/vllm_sync.py: built at the first step,
   the policy's weights pushed to it before every step's sampling, seeded per sample in the same way);
2. score every sample with the reward model (trainers/reward_scoring.RewardScorer, no cache: each text is new);
3. pair best against worst (data/onpolicy.best_and_worst; with two samples, the better against the other). A prompt
   whose samples tie (equal rewards, which includes identical texts) or are empty gives no pair: it is dropped and
   counted (``online/tie_rate`` and the per-step summary), never trained on with an arbitrary label;
4. tokenize each pair as train.py tokenizes a ``pairwise_messages`` row (data/tokenize.pair_example with the data
   config's template and truncation), carrying ``chosen_reward`` / ``rejected_reward`` as columns (a pair
   weighting such as ``optune`` reads them through ``Needs.columns``), and collate. The rank's pairs are spread
   over its micro-batches (the loss is a mean over the step's pairs, so where a pair sits changes nothing), which
   keeps every micro-batch non-empty when some prompts gave no pair.

Each step's pairs, with their rewards, are written to ``<run>/online/step_<n>.jsonl`` (``.rank<r>-of-<W>`` under
data parallelism; each rank generates for its own micro-batches), in the ``pairwise_messages`` format that
``train.py data.path=<file> data.format=pairwise_messages`` reads, and a summary line per step and rank (prompts,
pairs, drops by reason, mean reward, seconds spent generating and scoring, and with vLLM pushing the weights) to
``online/steps.jsonl`` (a resumed run rewrites the step files it redoes with the same pairs, and appends their
summaries again).

Each rank samples with its whole model, so the source runs with one process, DDP or ZeRO-1/2 (ZeRO-3 and FSDP are
refused: the ranks' generation lengths differ, and a sharded model's gathers need every rank in step).

Prompts come from the data config's sources in any format that has a prompt (data/onpolicy.prompt_turns: a prompt
string or turns, messages, alpaca instructions, any pair format); there is no eval split (the pairs of a step exist
only once it is drawn), so evaluation is off and the run's figures are the logged online metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter

import datasets
import torch
from accelerate.utils import DistributedType

from tunelab.data.collate import Collator
from tunelab.data.contract import Batch
from tunelab.data.formats import RowError
from tunelab.data.onpolicy import ALL_TIED, best_and_worst, pair_row, prompt_turns
from tunelab.data.pipeline import DataCounts
from tunelab.data.sources import load_rows
from tunelab.data.templates import build_template, formatting_options
from tunelab.data.tokenize import pair_example
from tunelab.losses.base import Metric
from tunelab.trainers.distributed import zero_stage
from tunelab.trainers.generation import SamplingSettings, TransformersBackend, chat_text, shard_path
from tunelab.trainers.reward_scoring import RewardScorer, load_reward_model
from tunelab.trainers.vllm_sync import ColocatedEngine

REWARD_COLUMNS = ("chosen_reward", "rejected_reward")  # the per-pair columns a pair weighting may read


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of optimizer step ``step`` (0-based): generation then seeds each sample from it with its
    prompt and sample index, so every (seed, step, prompt, sample) has its own stream."""
    digest = hashlib.sha256(f"online/{seed}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_dataset(data_cfg, tokenizer, kind: str, seed: int, columns=frozenset()):
    """(prompts, None, counts) in build_datasets' shape: one row per source row, its prompt turns as JSON, the ids
    the chat template gives them (``prompt_ids``, for the logged eval samples) and where it came from. A row
    without a usable prompt is an error naming its file and row. (``kind``, ``seed`` and ``columns`` are
    build_datasets' arguments: the rows are prompts whatever the loss, and each sampled pair gets its reward columns
    from the online source.)"""
    rows_out = []
    for spec in data_cfg.sources:
        rows, unreadable = load_rows(spec, data_cfg.get("on_error", "raise"))
        if unreadable:
            raise ValueError(f"{unreadable[0].where}: {unreadable[0].reason}")
        for row in rows:
            try:
                turns = prompt_turns({k: v for k, v in row.items() if v is not None and not k.startswith("_")})
            except RowError as err:
                raise ValueError(f"{row['_source']} row {row['_row']}: {err} (online prompts)") from err
            ids = tokenizer(chat_text(tokenizer, turns), add_special_tokens=False)["input_ids"]
            rows_out.append({"turns": json.dumps(turns), "prompt_ids": ids, "_source": row["_source"],
                             "_row": row["_row"]})
    if not rows_out:
        raise ValueError("online: the data config's sources hold no prompts")
    counts = DataCounts()
    counts["train/prompts"] = len(rows_out)
    return datasets.Dataset.from_list(rows_out), None, counts


class OnlineSource:
    """Each step's pair batches, sampled from the current policy and labelled by the reward model (module doc)."""

    def __init__(self, cfg, tokenizer, collator: Collator, accelerator, output_dir: str):
        online = cfg.online
        if zero_stage(accelerator) == 3 or accelerator.distributed_type == DistributedType.FSDP:
            # each rank samples its own prompts, for as many tokens as they need, so the ranks' forwards would not
            # line up for the collective gathers of a sharded model
            raise ValueError("online.enabled=true samples with the whole model on each rank; it runs with one "
                             "process, DDP or ZeRO-1/2, not with ZeRO-3 or FSDP")
        self.cfg, self.tokenizer, self.collator, self.accelerator = cfg, tokenizer, collator, accelerator
        self.seed = cfg.seed
        self.sampling = dict(num_samples=online.samples_per_prompt, temperature=online.temperature,
                             top_p=online.top_p, max_new_tokens=online.max_new_tokens)
        self.batch_size = online.batch_size
        if not online.reward_model:
            raise ValueError("online.enabled=true needs online.reward_model (a sequence-classification model "
                             "directory, e.g. the export/ of a recipe=reward run) to label the sampled responses")
        judge, judge_tokenizer = load_reward_model(online.reward_model, online.reward_dtype)
        self.scorer = RewardScorer(judge.to(accelerator.device), judge_tokenizer, online.reward_model,
                                   batch_size=online.batch_size)
        self.template = build_template(cfg.data.template, tokenizer, **formatting_options(cfg.data))
        self.folder = os.path.join(output_dir, "online")
        self.metrics: dict[str, Metric] = {}  # the last step's, added to the step's metrics by the Trainer
        self.backend = online.backend
        self.engine = None  # online.backend=vllm: built at the first step, which hands the source the policy

    def pairs(self, step: int, prompts: list[tuple[int, list[dict]]], model) -> tuple[list[dict], dict]:
        """(pair rows, summary) for ``prompts`` = [(dataset index, turns)] of ``step``, sampled from ``model``."""
        settings = SamplingSettings(**self.sampling, seed=step_seed(self.seed, step))
        synced = {}
        if self.backend == "vllm":
            if self.engine is None:
                online = self.cfg.online
                self.engine = ColocatedEngine(model, self.tokenizer, self.accelerator, online.vllm_dtype,
                                              online.vllm_gpu_memory_utilization)
            synced["sync_s"] = self.engine.push(model)  # the weights as they are now, before this step samples
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        try:
            with torch.no_grad():
                sampler = self.engine or TransformersBackend(model, self.tokenizer, self.batch_size)
                generated = sampler.generate(prompts, settings)
        finally:
            model.train(was_training)
        generated_at = time.perf_counter()
        flat = [(turns, text) for (_, turns), row in zip(prompts, generated) for text in row["responses"]]
        scores = self.scorer.score([t for t, _ in flat], [r for _, r in flat])
        scored_at = time.perf_counter()
        rows, dropped, start = [], Counter(), 0
        for (index, turns), row in zip(prompts, generated):
            responses = row["responses"]
            mine = scores[start:start + len(responses)]
            start += len(responses)
            picked = best_and_worst(responses, mine)
            if isinstance(picked, str):
                dropped[picked] += 1
                continue
            best, worst = picked
            rows.append({**pair_row(turns, responses[best], responses[worst], mine[best], mine[worst]),
                         REWARD_COLUMNS[0]: mine[best], REWARD_COLUMNS[1]: mine[worst], "step": step + 1,
                         "index": index})
        summary = {"step": step + 1, "rank": self.accelerator.process_index, "prompts": len(prompts),
                   "pairs": len(rows), "dropped": dict(dropped), "samples": len(scores),
                   "reward_sum": float(sum(scores)), "generate_s": generated_at - started,
                   "score_s": scored_at - generated_at, **synced}
        return rows, summary

    def examples(self, rows: list[dict], dropped: Counter) -> tuple[list[dict], list[dict]]:
        """(the rows kept, their tokenized pair examples): each row tokenized as train.py tokenizes a
        pairwise_messages row, with the reward columns; a pair that cannot be tokenized (a prompt beyond
        data.max_prompt_length) is dropped and counted."""
        data = self.cfg.data
        kept, out = [], []
        for row in rows:
            try:
                example = pair_example(row, "pairwise_messages", self.template, self.tokenizer, data.max_length,
                                       data.max_prompt_length, data.truncation)
            except RowError as err:
                dropped[f"untokenizable: {err.kind}"] += 1
                continue
            if example["status"] == "too_long":
                dropped["too long (data.truncation=drop)"] += 1
                continue
            kept.append(row)
            out.append({**example, **{name: row[name] for name in REWARD_COLUMNS}})
        return kept, out

    def _write(self, step: int, rows: list[dict], summary: dict) -> None:
        acc = self.accelerator
        os.makedirs(self.folder, exist_ok=True)
        path = shard_path(os.path.join(self.folder, f"step_{step + 1}.jsonl"), acc.process_index, acc.num_processes)
        with open(path + ".tmp", "w") as handle:  # a resumed run rewrites the step with the same pairs
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(path + ".tmp", path)
        summaries = os.path.join(self.folder, "steps.jsonl" if acc.num_processes == 1 else
                                 f"steps.rank{acc.process_index}-of-{acc.num_processes}.jsonl")
        with open(summaries, "a") as handle:
            handle.write(json.dumps(summary) + "\n")

    def __call__(self, step: int, micro: list[list[int]], dataset, policy) -> list[Batch]:
        """The batches of optimizer step ``step`` (0-based) for this rank's micro-batches of prompt indices."""
        model = self.accelerator.unwrap_model(policy).model
        prompts = [(i, json.loads(dataset[i]["turns"])) for group in micro for i in group]
        rows, summary = self.pairs(step, prompts, model)
        dropped = Counter(summary["dropped"])
        rows, examples = self.examples(rows, dropped)
        summary["dropped"], summary["pairs"] = dict(dropped), len(examples)
        self._write(step, rows, summary)
        self.metrics = {
            "online/reward_mean": Metric(summary["reward_sum"], summary["samples"]),
            "online/tie_rate": Metric(float(dropped[ALL_TIED]), len(prompts)),
            "online/pair_rate": Metric(float(len(examples)), len(prompts)),
            "online/generate_s": Metric(summary["generate_s"]),
            "online/score_s": Metric(summary["score_s"]),
        }
        if "sync_s" in summary:
            self.metrics["online/sync_s"] = Metric(summary["sync_s"])
        if len(examples) < len(micro):
            raise RuntimeError(
                f"online step {step + 1}, rank {self.accelerator.process_index}: {len(examples)} pairs from "
                f"{len(prompts)} prompts for {len(micro)} micro-batches (dropped: {dict(dropped)}); every "
                "micro-batch needs a pair. Raise online.temperature or online.max_new_tokens (fewer tied samples), "
                "or train.micro_batch_size (fewer micro-batches)")
        share, extra = divmod(len(examples), len(micro))
        bounds = [0]
        for k in range(len(micro)):
            bounds.append(bounds[-1] + share + (1 if k < extra else 0))
        return [self.collator(examples[bounds[k]:bounds[k + 1]]) for k in range(len(micro))]

