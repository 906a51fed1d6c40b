"""Where one training step of tunelab's Trainer spends its time, on the benchmark workloads (docs/benchmarks.md).

    python scripts/bench_profile.py --workload dpo      # or simpo, sft; --small for a smoke run

Builds the same Trainer, data and model as scripts/bench_preference.py / scripts/bench_sft.py, runs warm-up
steps, then profiles one step with torch.profiler and groups the self time of every aten op into categories
(matrix multiplies, attention kernels, the LM-head reduction, optimizer, the rest). For the matrix multiplies it
also prints the GFLOP/s they reach, so the gap between a step's achieved FLOP/s and the matmul peak splits into
"matmuls below peak" and "time outside matmuls".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict

import bench_common as bc

CATEGORIES = (  # first match wins; names are aten op names
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention kernels", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("LM-head reduction (exp, logsumexp, gather)", ("aten::exp", "aten::logsumexp", "aten::gather",
                                                     "aten::scatter", "aten::sub", "aten::max")),
    ("optimizer (AdamW) and clipping", ("aten::_foreach", "aten::_fused_adam", "clip_grad", "aten::norm",
                                        "aten::linalg_vector_norm")),
    ("memory (copies, fills, allocation)", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::empty",
                                           "aten::zeros", "aten::clone", "aten::cat", "aten::contiguous")),
)


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other ops (norms, activations, rotary, indexing)"


def build(workload: str, args):
    if workload == "sft":
        import bench_sft as mod

        overrides = lambda tmp: mod.our_overrides(args, mod.make_data(args, tmp), tmp, args.warmup + 2)  # noqa: E731
    else:
        import bench_preference as mod

        overrides = lambda tmp: mod.our_overrides(  # noqa: E731
            args, workload, mod.make_data(args, tmp), tmp, args.warmup + 2)
    return bc.recorded_trainer(overrides(tempfile.mkdtemp(prefix="bench_profile_")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("dpo", "simpo", "sft"), default="dpo")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="tiny tokenizer and model (smoke runs)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--row-length", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=0)
    parser.add_argument("--top", type=int, default=12, help="also list the N ops with the most self time")
    args = parser.parse_args(argv)
    args.steps = 1  # the benchmark data builders size their data by warmup + steps

    import torch
    from torch.profiler import ProfilerActivity, profile

    machine = bc.MachinePeak()
    trainer, recorder = build(args.workload, args)
    for _ in range(args.warmup):
        trainer.train_step()
    seen = len(recorder.seen)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        start = time.perf_counter()
        trainer.train_step()
        wall = time.perf_counter() - start
    lengths = [bc.example_lengths(ex) for mb in recorder.seen[seen:] for ex in mb]
    dims = bc.model_dims(trainer.accelerator.unwrap_model(trainer.policy).model)
    work = bc.required_flops(lengths, dims)

    totals: dict[str, float] = defaultdict(float)
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::") or "scaled_dot_product" in e.key]
    for e in ops:
        totals[category(e.key)] += e.self_cpu_time_total / 1e6
    in_ops = sum(totals.values())
    totals["Python, autograd and framework overhead (wall - ops)"] = max(wall - in_ops, 0.0)
    peak = machine.remeasure()

    print(f"{args.workload}: one step {wall:.3f} s wall, torch threads {torch.get_num_threads()}, "
          f"matmul peak {peak:.1f} GFLOP/s")
    print(f"required work {work['total'] / 1e9:.1f} GFLOP ({work['tokens']} real tokens, {work['labelled']} "
          f"labelled): {work['total'] / 1e9 / wall:.1f} GFLOP/s = {100 * work['total'] / 1e9 / wall / peak:.0f}% "
          f"of peak; body {work['body'] / 1e9:.1f}, LM head {work['head'] / 1e9:.1f}, attention "
          f"{work['attention'] / 1e9:.1f} GFLOP")
    print()
    print("| where | seconds | share of step |")
    print("|---|---|---|")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds:.3f} | {100 * seconds / wall:.0f}% |")
    optimizer_s = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("Optimizer.step")) / 1e6
    print(f"\n(inclusive time of the optimizer step: {optimizer_s:.3f} s; on CPU its foreach ops run as per-tensor "
          "elementwise ops, counted above under their own names)")
    matmul_s = totals["matrix multiplies"]
    matmul_work = work["body"] + work["head"]
    if matmul_s:
        print(f"\nmatrix multiplies: {matmul_work / 1e9:.1f} GFLOP of body + head work in {matmul_s:.3f} s = "
              f"{matmul_work / 1e9 / matmul_s:.1f} GFLOP/s ({100 * matmul_work / 1e9 / matmul_s / peak:.0f}% of peak)")
    print(f"\ntop {args.top} ops by self time:")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key:<48} {e.self_cpu_time_total / 1e6:8.3f} s  x{e.count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
