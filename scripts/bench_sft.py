"""SFT benchmark on CPU: tunelab's Trainer vs TRL's SFTTrainer (completion-only loss), in one invocation.

    python scripts/bench_sft.py                    # all runs, ~10 measured steps each
    python scripts/bench_sft.py --quick            # smoke run (few steps)
    python scripts/bench_sft.py --runs ours-sft,trl-sft --steps 5

Workload (docs/benchmarks.md): the preference benchmark's model (random-init Llama, hidden 256, 4 layers,
4 heads, intermediate 688, tied embeddings, SmolLM2 tokenizer with vocabulary 49152, fp32) on prompt/completion
rows of the same lengths (prompts 20-120 words, completions 10-100 words), 16 rows per step, loss on the
completion tokens only; AdamW at a constant learning rate, gradient clipping at 1.0. Runs (each in its own
subprocess, so peak RSS is per framework):

- ``ours-sft``: tunelab's Trainer, recipe=sft (packed rows with per-document attention, chunked fused LM head).
- ``ours-sft-padded``: the same with ``data.packing=false`` (one right-padded row per example).
- ``ours-sft-dense-attn``: ``ours-sft`` with model.attn_implementation=sdpa (dense masked attention, not tiled).
- ``trl-sft``: TRL's SFTTrainer, padded batches.
- ``trl-sft-packing``: TRL's SFTTrainer with ``packing=True`` (its padding-free BFD packing).

Before the timed runs, ``--check-steps`` steps of our Trainer are replayed by a naive implementation (full
[B, T, V] logits and cross-entropy over a right-padded batch, the same initial weights, data and AdamW), and the
per-step losses must agree within 1e-4.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time

import bench_common as bc

RUNS = ("ours-sft", "ours-sft-padded", "ours-sft-dense-attn", "trl-sft", "trl-sft-packing")
ROWS_PER_STEP = 16
LR = 1e-4


def our_overrides(args, data_path: str, tmp: str, steps: int, packing: bool = True,
                  extra: tuple[str, ...] = ()) -> list[str]:
    chunk = [f"train.logits_chunk_size={args.chunk_size}"] if args.chunk_size else []
    return [
        "recipe=sft", *bc.model_overrides(args.small), *chunk,
        f"data.sources=[{{path:'{data_path}',format:prompt_completion}}]", f"data.packing={str(packing).lower()}",
        "data.eval_fraction=0", f"data.max_length={args.row_length}", "data.max_prompt_length=2048",
        f"train.global_batch_size={ROWS_PER_STEP}", f"train.micro_batch_size={ROWS_PER_STEP}",
        f"train.max_steps={steps}", "train.optimizer=adamw", f"train.lr={LR}", "train.scheduler=constant",
        "train.warmup_steps=0", "train.weight_decay=0.0", "train.max_grad_norm=1.0", "train.progress_bar=false",
        "train.plot=false", "train.eval_every=0", "train.log_every=100000", "train.save_every=100000",
        f"output_dir={tmp}/out", "export.enabled=false", *extra,
    ]


def make_data(args, tmp: str) -> str:
    rows = bc.sft_rows((args.warmup + args.steps) * ROWS_PER_STEP, args.seed)
    return bc.write_jsonl(rows, os.path.join(tmp, "sft.jsonl"))


# ---- children ---------------------------------------------------------------------------------------------------
def child_ours(args, packing: bool, extra: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_sft_")
    trainer, recorder = bc.recorded_trainer(our_overrides(args, make_data(args, tmp), tmp, args.warmup + args.steps,
                                                          packing, extra))
    return bc.measure_steps(trainer, recorder, args.warmup, args.steps, time.perf_counter() - start)


def _trl_lengths(inputs) -> list[list[int]]:
    """[prompt, completion] token counts per example of one TRL SFT batch (padded or padding-free)."""
    labels = inputs["labels"]
    if "position_ids" in inputs and "attention_mask" not in inputs:  # padding-free: sequences restart at 0
        positions, keep = inputs["position_ids"].flatten().tolist(), (labels.flatten() != -100).tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        out = []
        for a, b in zip(starts, starts[1:]):
            completion = sum(keep[a:b])
            out.append([b - a - completion, completion])
        return out
    total = inputs["attention_mask"].sum(1)
    completion = (labels != -100).sum(1)
    return [[int(t - c), int(c)] for t, c in zip(total, completion)]


def child_trl(args, packing: bool) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from tunelab.trainers.models import build_model

    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_trl_sft_")
    tokenizer = bc.load_tokenizer(args.small)
    model = build_model(bc.compose_cfg(bc.model_overrides(args.small)).model, tokenizer, args.seed)
    rows = bc.sft_rows((args.warmup + args.steps) * ROWS_PER_STEP, args.seed)
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                      "completion": [{"role": "assistant", "content": r["completion"]}]}
                                     for r in rows])
    lengths: list = []

    class Recorded(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            lengths.append(_trl_lengths(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    config = SFTConfig(
        output_dir=tmp, per_device_train_batch_size=ROWS_PER_STEP, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        max_length=args.row_length, packing=packing, completion_only_loss=True, seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0, bf16=False, fp16=False,
    )
    trainer = Recorded(model=model, args=config, train_dataset=ds, processing_class=tokenizer)
    return bc.train_trl(trainer, lengths, args.warmup, start)


# ---- exactness check --------------------------------------------------------------------------------------------
def naive_step_loss(model, examples: list[dict], pad_id: int):
    """Token-mean cross-entropy over the step's labelled tokens from full logits of a right-padded batch."""
    import torch
    import torch.nn.functional as F

    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(ex["input_ids"], ex["target_mask"])])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="mean")


def check_losses(args) -> dict:
    """Our Trainer's per-step losses vs the naive full-logits implementation of the same objective."""
    import torch

    tmp = tempfile.mkdtemp(prefix="bench_sft_check_")
    cfg = bc.compose_cfg(our_overrides(args, make_data(args, tmp), tmp, args.check_steps))
    trainer = bc.build_our_trainer(cfg)
    naive = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.policy).model).train()
    optimizer = torch.optim.AdamW(naive.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    recorder = bc.record_batches(trainer)
    ours, theirs = [], []
    for _ in range(args.check_steps):
        seen = len(recorder.seen)
        ours.append(trainer.train_step().loss)
        examples = [ex for mb in recorder.seen[seen:] for ex in mb]
        loss = naive_step_loss(naive, examples, trainer.tokenizer.pad_token_id)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(naive.parameters(), 1.0)
        optimizer.step()
        theirs.append(float(loss))
    diff = max(abs(a - b) for a, b in zip(ours, theirs))
    return {"loss": "ntp", "ours": ours, "naive": theirs, "max_abs_diff": diff, "ok": diff <= 1e-4}


# ---- parent -----------------------------------------------------------------------------------------------------
def child_main(args) -> None:
    if args.check:
        bc.child_report(args.json, name="check-ntp", **check_losses(args))
        return
    report = {"ours-sft": lambda: child_ours(args, True), "ours-sft-padded": lambda: child_ours(args, False),
              "ours-sft-dense-attn": lambda: child_ours(args, True, ("model.attn_implementation=sdpa",)),
              "trl-sft": lambda: child_trl(args, False), "trl-sft-packing": lambda: child_trl(args, True)}[args.child]()
    bc.child_report(args.json, name=args.child, **report)


def main(argv=None) -> int:
    args = bc.parse_args(__doc__, RUNS, argv)
    if args.child or args.check:
        child_main(args)
        return 0
    script = os.path.abspath(__file__)
    machine = bc.MachinePeak()
    runs = [r for r in args.runs.split(",") if r]
    checks = [bc.run_child([script, "--check", "ntp", *bc.forward_args(args)])] if args.check_steps else []
    reports = [bc.run_child([script, "--child", run, *bc.forward_args(args)]) for run in runs]
    dims, peak = bc.dims_of(reports, args.small), machine.remeasure()
    rows = {r["name"]: bc.summarize(r, dims, peak) for r in reports}
    order = ("trl-sft", "trl-sft-packing", "ours-sft-dense-attn", "ours-sft-padded", "ours-sft")
    present = [rows[m] for m in order if m in rows]
    lines = [f"SFT benchmark: {machine.line()}; {args.warmup} warm-up + {args.steps} measured steps, {ROWS_PER_STEP} "
             f"rows/step; {bc.dims_line(dims)}", "", bc.markdown_table(present, baseline="trl-sft"), ""]
    lines += bc.check_lines(checks) + bc.run_lines(reports, rows)
    return bc.finish(lines, args, checks)


if __name__ == "__main__":
    sys.exit(main())
