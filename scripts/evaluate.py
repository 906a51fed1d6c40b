"""Evaluate a model against a baseline with a reward-model judge: win rate, LC win rate, lengths, AlpacaEval file."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.trainers.evaluation import (
    baseline_answers,
    compare,
    generate_greedy,
    read_prompts,
    read_responses,
    write_alpaca_eval,
    write_report,
)
from tunelab.trainers.reward_scoring import RewardScorer, load_reward_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="directory or hub id of the model to evaluate")
    baseline = parser.add_mutually_exclusive_group(required=True)
    baseline.add_argument("--baseline", help="directory or hub id of a baseline model to generate with")
    baseline.add_argument("--baseline-outputs", help="the baseline's answers: generation JSONL or AlpacaEval JSON")
    parser.add_argument("--judge", required=True, help="reward model (AutoModelForSequenceClassification, 1 label)")
    parser.add_argument("--prompts", required=True, help="JSON/JSONL rows with a 'prompt' or 'instruction' string")
    parser.add_argument("--out", required=True, help="output directory: model_outputs.json, report.json")
    parser.add_argument("--generator", default=None, help="name written in AlpacaEval's 'generator' field")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples for the LC win rate's interval")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _answers(name: str, prompts, args) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name).eval()
    return generate_greedy(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    prompts = read_prompts(args.prompts)
    outputs = _answers(args.model, prompts, args)
    if args.baseline:
        baseline = _answers(args.baseline, prompts, args)
    else:
        baseline = baseline_answers(prompts, read_responses(args.baseline_outputs), args.baseline_outputs)
    generator = args.generator or os.path.basename(os.path.normpath(args.model))
    write_alpaca_eval(os.path.join(args.out, "model_outputs.json"), prompts, outputs, generator)

    judge, judge_tokenizer = load_reward_model(args.judge)
    scorer = RewardScorer(judge, judge_tokenizer, args.judge, args.batch_size)
    report = compare(
        prompts, outputs, baseline,
        lambda p, r: np.asarray(scorer.score([[{"role": "user", "content": text}] for text in p], list(r))),
        confidence=args.confidence, bootstrap=args.bootstrap, seed=args.seed,
    )
    write_report(args.out, report)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
