"""Sample N responses per prompt, optionally score them with a reward model and build on-policy preference pairs.

    python scripts/generate.py --model <hub id | dir | run | checkpoint | .gguf> --prompts <file or hub id> \\
        --out gens.jsonl [--num-samples 5 --temperature 0.8 --top-p 0.95 --max-new-tokens 512 --seed 0] \\
        [--reward-model <seq-cls RM> --pairs-out pairs.jsonl --min-margin 0.0] [--config recipes/generate/x.yaml]

A ``--config`` YAML file sets the defaults of any option (its keys are the option names with underscores); options
given on the command line win. Every stage resumes: finished prompts are skipped, scores come from the cache.
Data parallel: ``accelerate launch --num_processes 8 scripts/generate.py ...``. docs/generation.md has the details.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import yaml

from tunelab.data.onpolicy import build_pairs, read_jsonl
from tunelab.trainers.distributed import end_process_group, init_state
from tunelab.trainers.generation import BACKENDS, SamplingSettings, read_prompts, run_generation, unique

log = logging.getLogger("tunelab.generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of option defaults (e.g. recipes/generate/simpo_v02_llama3.yaml)")
    parser.add_argument("--model", help="hub id, directory, run directory, checkpoint, adapter dir or .gguf file")
    parser.add_argument("--adapter", help="a LoRA adapter directory to apply over --model")
    parser.add_argument("--prompts", help="JSON/JSONL/parquet file or hub dataset id of prompts (any row format)")
    parser.add_argument("--split", default=None, help="split of a hub dataset (default train)")
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--unique-prompts", action="store_true", help="drop repeated prompts (first one kept)")
    parser.add_argument("--out", help="generations JSONL (one line per prompt)")
    parser.add_argument("--backend", choices=BACKENDS, default="transformers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (transformers backend)")
    parser.add_argument("--prompts-per-write", type=int, default=8, help="prompts generated between fsyncs")
    parser.add_argument("--reward-model", help="sequence-classification reward model: scores every sample")
    parser.add_argument("--reward-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reward-batch-size", type=int, default=8)
    parser.add_argument("--reward-max-length", type=int, default=None, help="truncate scored conversations")
    parser.add_argument("--score-cache", default=os.path.join(
        os.environ.get("TUNELAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tunelab")), "rewards"))
    parser.add_argument("--scored-out", help="scored generations JSONL (default: <out without .jsonl>.scored.jsonl)")
    parser.add_argument("--pairs-out", help="write best/worst pairs (pairwise_messages) here; needs --reward-model")
    parser.add_argument("--min-margin", type=float, default=0.0, help="drop pairs whose score gap is below this")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        with open(first.config) as handle:
            defaults = yaml.safe_load(handle) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise SystemExit(f"{first.config}: unknown option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(known))}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    missing = [name for name in ("model", "prompts", "out") if not getattr(args, name)]
    if missing:
        parser.error(f"--{', --'.join(missing)} required (on the command line or in --config)")
    if args.pairs_out and not args.reward_model:
        parser.error("--pairs-out needs --reward-model (pairs are built from scores)")
    return args


def _backend(args):
    if args.backend == "vllm":
        from tunelab.trainers.generation import VllmBackend

        if args.adapter:
            raise SystemExit("--adapter with --backend vllm: merge the adapter first (a run's export/ is merged)")
        return VllmBackend(args.model, dtype=args.dtype if args.dtype != "float32" else "auto")
    from tunelab.trainers.generation import TransformersBackend, load_model

    model, tokenizer = load_model(args.model, args.adapter, args.dtype)
    return TransformersBackend(model.to(init_state().device), tokenizer, args.batch_size)


def _write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    state = init_state()
    prompts = read_prompts(args.prompts, args.max_prompts, args.split)
    if args.unique_prompts:
        prompts = unique(prompts)
    settings = SamplingSettings(args.num_samples, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    meta = {"model": args.model, "adapter": args.adapter, "backend": args.backend, "dtype": args.dtype}
    run_generation(_backend(args), prompts, args.out, settings, meta, state, args.prompts_per_write,
                   progress=not args.no_progress)
    summary = {"generations": args.out, "prompts": len(prompts)}
    if args.reward_model:
        from tunelab.trainers.reward_scoring import RewardScorer, load_reward_model, score_generations

        rows, _ = read_jsonl(args.out)
        model, tokenizer = load_reward_model(args.reward_model, args.reward_dtype)
        scorer = RewardScorer(model.to(state.device), tokenizer, args.reward_model, args.reward_batch_size,
                              args.score_cache, args.reward_max_length)
        scored = score_generations(rows, scorer, state)
        summary["scored"] = args.scored_out or f"{args.out.removesuffix('.jsonl')}.scored.jsonl"
        summary["reward_forwards"] = scorer.forwards
        if state.is_main_process:
            _write_jsonl_atomic(summary["scored"], scored)
        if args.pairs_out:
            pairs, stats = build_pairs(scored, args.min_margin)
            summary.update(pairs=args.pairs_out, pair_count=stats.pairs, dropped=dict(stats.dropped))
            if state.is_main_process:
                _write_jsonl_atomic(args.pairs_out, pairs)
                log.info("%s -> %s (train: python train.py recipe=simpo data.path=%s data.format=pairwise_messages)",
                         stats.summary(), args.pairs_out, args.pairs_out)
    if state.is_main_process:
        print(json.dumps(summary, indent=1))
    if state.num_processes > 1:
        end_process_group()
    return summary


if __name__ == "__main__":
    main()
