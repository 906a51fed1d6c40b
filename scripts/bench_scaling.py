"""Row-length scaling on CPU: tunelab vs TRL at packed rows of 2k-32k tokens, SFT and DPO, in one invocation.

    python scripts/bench_scaling.py                                  # every length, workload and framework
    python scripts/bench_scaling.py --lengths 2048,32768 --runs ours-sft,trl-sft --docs realistic
    python scripts/bench_scaling.py --small --lengths 256,512 --steps 1 --warmup 0    # smoke run (tests)

Workload: the benchmark model of scripts/bench_common.py (random-init Llama, hidden 256, 4 layers, SmolLM2
tokenizer with vocabulary 49152, fp32, rotary positions up to the row length), AdamW. Each optimizer step takes
about one row of L tokens:

- ``realistic`` documents: the benchmarks' rows (prompts of 20-120 words, responses of 10-100), as many per step as
  fill 95% of L on average. tunelab packs them into rows of L; TRL's SFTTrainer packs them too (``packing=True``,
  padding-free, one packed row of L per step); TRL's DPOTrainer has no packing, so it takes the same pairs as one
  padded batch.
- ``long``: one example per step whose response (each response of a pair) fills ~90% (~45%) of L.

Runs: ``ours-sft`` (recipe=sft, packed), ``trl-sft`` (SFTTrainer, completion-only loss, padding-free packing),
``ours-dpo`` (recipe=dpo, shared prompt, precomputed reference), ``trl-dpo`` (DPOTrainer, precomputed reference).
Each (run, docs, L) runs in its own subprocess; the parent reads its peak resident memory and kills it when it
passes ``--memory-cap-gb``, which the table reports as not fitting. Reported per configuration: real tokens per
step, seconds per 1000 real tokens, real tokens/s and its ratio to the same run at the smallest L (attention
whose cost follows the documents, not the row, keeps that ratio near 1), and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import bench_common as bc

RUNS = ("ours-sft", "trl-sft", "ours-dpo", "trl-dpo")
DOCS = ("realistic", "long")
LR = 1e-4
BETA = 0.1


# ---- data -------------------------------------------------------------------------------------------------------
def tokens_per_word(tokenizer) -> float:
    """Tokens per word of the benchmarks' synthetic text under this tokenizer (from a fixed sample)."""
    text = bc._text(random.Random(0), 2000)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / 2000


def example_tokens(tokenizer, prompt: str, responses: list[str]) -> int:
    """Tokens of an example as the chat template lays it out (prompt once, each response)."""
    messages = [{"role": "user", "content": prompt}]
    # tokenize=False: with tokenize=True, transformers 5 returns a BatchEncoding, whose len() is its key count
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    total = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return total + sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 2 for r in responses)


def workload_rows(kind: str, docs: str, length: int, steps: int, seed: int, tokenizer) -> tuple[list[dict], int]:
    """(rows for ``steps`` steps, rows per step). Realistic: as many benchmark rows per step as fill 95% of
    ``length`` on average; long: one row per step whose response(s) fill ~90% of it."""
    if docs == "long":
        rng = random.Random(seed)
        words = int((0.9 if kind == "sft" else 0.45) * length / tokens_per_word(tokenizer))
        rows = []
        for _ in range(steps):
            prompt = bc._text(rng, 30)
            if kind == "sft":
                rows.append({"prompt": prompt, "completion": bc._text(rng, words)})
            else:
                rows.append({"prompt": prompt, "chosen": bc._text(rng, words), "rejected": bc._text(rng, words)})
        return rows, 1
    make = bc.sft_rows if kind == "sft" else bc.pref_rows
    sample = make(64, seed + 1)
    keys = ("completion",) if kind == "sft" else ("chosen", "rejected")
    mean = sum(example_tokens(tokenizer, r["prompt"], [r[k] for k in keys]) for r in sample) / len(sample)
    per_step = max(1, int(0.95 * length / mean))
    return make(per_step * steps, seed), per_step


def model_overrides(small: bool, length: int) -> list[str]:
    keep = [o for o in bc.model_overrides(small) if not o.startswith("model.tiny.max_position_embeddings=")]
    return keep + [f"model.tiny.max_position_embeddings={max(length, 2048)}"]


# ---- children ---------------------------------------------------------------------------------------------------
def child_ours(args, kind: str) -> dict:
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_scaling_")
    steps = args.warmup + args.steps
    tokenizer = bc.load_tokenizer(args.small)
    rows, per_step = workload_rows(kind, args.docs, args.length, steps, args.seed, tokenizer)
    path = bc.write_jsonl(rows, os.path.join(tmp, "rows.jsonl"))
    fmt = "prompt_completion" if kind == "sft" else "pairwise_strings"
    method = ["recipe=sft"] if kind == "sft" else ["recipe=dpo", f"loss.dpo.beta={BETA}",
                                                    "reference.strategy=precomputed", f"reference.cache_dir={tmp}/ref"]
    overrides = [
        *method, *model_overrides(args.small, args.length),
        f"data.sources=[{{path:'{path}',format:{fmt}}}]", "data.eval_fraction=0", f"data.max_length={args.length}",
        f"data.max_prompt_length={min(2048, args.length - 1)}", f"train.global_batch_size={per_step}",
        f"train.micro_batch_size={per_step}", f"train.max_steps={steps}", f"train.lr={LR}",
        "train.scheduler=constant", "train.warmup_steps=0", "train.max_grad_norm=1.0", "train.progress_bar=false",
        "train.plot=false", "train.eval_every=0", "train.eval_at_start=false", "train.log_every=100000",
        "train.save_every=100000", f"output_dir={tmp}/out", "export.enabled=false",
    ]
    trainer, recorder = bc.recorded_trainer(overrides)
    return bc.measure_steps(trainer, recorder, args.warmup, args.steps, time.perf_counter() - start)


def child_trl(args, kind: str) -> dict:
    import datasets
    from bench_sft import _trl_lengths
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from tunelab.trainers.models import build_model

    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_scaling_trl_")
    steps = args.warmup + args.steps
    tokenizer = bc.load_tokenizer(args.small)
    model = build_model(bc.compose_cfg(model_overrides(args.small, args.length)).model, tokenizer, args.seed)
    rows, per_step = workload_rows(kind, args.docs, args.length, steps, args.seed, tokenizer)
    lengths: list = []
    common = dict(output_dir=tmp, gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", max_steps=steps,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=args.seed,
                  disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False)
    if kind == "sft":
        ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                          "completion": [{"role": "assistant", "content": r["completion"]}]}
                                         for r in rows])

        class Recorded(SFTTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                lengths.append(_trl_lengths(inputs))
                return super().training_step(model, inputs, num_items_in_batch)

        # one packed row of L tokens per step (realistic), or the one long example
        config = SFTConfig(per_device_train_batch_size=1, max_length=args.length, packing=args.docs == "realistic",
                           completion_only_loss=True, **common)
    else:
        ds = bc.trl_pairs_dataset(rows)

        class Recorded(DPOTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                lengths.append(bc.trl_dpo_lengths(inputs))
                return super().training_step(model, inputs, num_items_in_batch)

        config = DPOConfig(per_device_train_batch_size=per_step, max_length=args.length, beta=BETA,
                           loss_type=["sigmoid"], precompute_ref_log_probs=True, **common)
    trainer = Recorded(model=model, args=config, train_dataset=ds, processing_class=tokenizer)
    return bc.train_trl(trainer, lengths, args.warmup, start)


# ---- parent -----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192,16384,32768", help="row lengths L, comma-separated")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--docs", default=",".join(DOCS), help="realistic, long or both")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-cap-gb", type=float, default=12.0,
                        help="a child whose resident memory passes this is stopped and reported as not fitting")
    parser.add_argument("--small", action="store_true", help="tiny tokenizer and model (smoke tests)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--docs-one", dest="docs_one", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_args(args, run: str, docs: str, length: int) -> list[str]:
    out = ["--child", run, "--docs-one", docs, "--length", str(length), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seed", str(args.seed)]
    return out + (["--small"] if args.small else [])


def table(results: list[dict]) -> str:
    head = ("| workload | documents | L | run | real tokens / step | s per 1k real tokens | real tokens/s | "
            "tokens/s vs smallest L | peak RSS GB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base: dict = {}
    for r in results:
        key = (r["run"], r["docs"])
        if r.get("over_cap"):
            lines.append(f"| {r['run'].split('-')[1]} | {r['docs']} | {r['length']} | {r['run']} | | | | | "
                         f"did not fit: stopped above {r['cap_gb']:.0f} GB |")
            continue
        base.setdefault(key, r["tokens_per_s"])
        lines.append(f"| {r['run'].split('-')[1]} | {r['docs']} | {r['length']} | {r['run']} | "
                     f"{r['tokens_per_step']:.0f} | {1000 / r['tokens_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / base[key]:.2f}x | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        args.docs = args.docs_one
        kind = args.child.split("-")[1]
        report = (child_ours if args.child.startswith("ours") else child_trl)(args, kind)
        bc.child_report(args.json, name=args.child, **report)
        return 0
    script = os.path.abspath(__file__)
    machine = bc.MachinePeak()
    lengths = [int(x) for x in args.lengths.split(",") if x]
    runs = [r for r in args.runs.split(",") if r]
    results, dims = [], None
    for run in runs:
        for docs in [d for d in args.docs.split(",") if d]:
            over = False
            for length in lengths:
                write_report(args, machine, results)  # the rows so far: a run cut short keeps them
                entry = {"run": run, "docs": docs, "length": length, "cap_gb": args.memory_cap_gb}
                if over:  # a longer row of the same workload cannot fit either
                    results.append({**entry, "over_cap": True})
                    continue
                report = bc.run_child([script, *child_args(args, run, docs, length)],
                                      memory_cap_gb=args.memory_cap_gb)
                if report.get("over_cap"):
                    over = True
                    results.append({**entry, "over_cap": True})
                    continue
                dims = report.get("dims") or dims or bc.dims_of([], args.small)
                row = bc.summarize({**report, "name": run}, dims, machine.peak)
                results.append({**entry, "tokens_per_s": row["tokens_per_s"], "tokens_per_step": row["tokens_per_step"],
                                "peak_rss_gb": row["peak_rss_gb"], "step_times": report["step_times"]})
    machine.remeasure()
    print(write_report(args, machine, results))
    print(json.dumps(results), file=sys.stderr)
    return 0


def write_report(args, machine, results: list[dict]) -> str:
    """The report on the rows so far, written to --markdown (replacing the previous one) if given."""
    lines = [f"Row-length scaling: {machine.line()}; {args.warmup} warm-up + {args.steps} measured steps per "
             f"configuration; memory cap {args.memory_cap_gb:.0f} GB", "", table(results), ""]
    text = "\n".join(lines)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
