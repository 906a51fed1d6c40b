"""Evaluate a model against a baseline on a prompt set: generate, judge with a reward model, report win rates."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tunelab.trainers.win_rate import length_controlled_win_rate, preferences_from_rewards, win_rate

PROMPT_KEYS = ("prompt", "instruction")
RESPONSE_KEYS = ("responses", "response", "output")


def _read_rows(path: str) -> list[dict]:
    """Rows of a JSON list or a JSONL file; a row that is not an object is refused by file and line."""
    with open(path) as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from err
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {number} is a {type(row).__name__}, expected an object")
    return rows


def _field(path: str, number: int, row: dict, keys: Sequence[str]):
    for key in keys:
        if key in row:
            return row[key]
    raise KeyError(f"{path}: row {number} has none of the keys {', '.join(keys)} (it has {', '.join(row)})")


def read_prompts(path: str) -> list[str]:
    """Prompts from a JSON/JSONL file whose rows carry a string ``prompt`` (or AlpacaEval's ``instruction``)."""
    prompts = []
    for number, row in enumerate(_read_rows(path), start=1):
        prompt = _field(path, number, row, PROMPT_KEYS)
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: row {number}: the prompt is a {type(prompt).__name__}, expected a string")
        prompts.append(prompt)
    return prompts


def read_responses(path: str) -> dict[str, str]:
    """A baseline's answers by prompt: generation JSONL rows (``prompt`` and ``responses``, the first one used, or a
    single ``response``) or an AlpacaEval outputs file (``instruction`` and ``output``)."""
    answers = {}
    for number, row in enumerate(_read_rows(path), start=1):
        prompt = _field(path, number, row, PROMPT_KEYS)
        response = _field(path, number, row, RESPONSE_KEYS)
        if isinstance(response, list):
            if not response:
                raise ValueError(f"{path}: row {number} has an empty list of responses")
            response = response[0]
        if not isinstance(response, str):
            raise ValueError(f"{path}: row {number}: the response is a {type(response).__name__}, expected a string")
        answers[prompt] = response
    return answers


def write_alpaca_eval(path: str, prompts: Sequence[str], outputs: Sequence[str], generator: str) -> None:
    """The model's answers in AlpacaEval's model_outputs format: a JSON list of {instruction, output, generator}."""
    rows = [{"instruction": p, "output": o, "generator": generator} for p, o in zip(prompts, outputs, strict=True)]
    with open(path, "w") as handle:
        json.dump(rows, handle, indent=1, ensure_ascii=False)


def _chat(tokenizer, prompt: str, response: str | None = None) -> str:
    messages = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers (deterministic) to each prompt under the tokenizer's chat template, batched with left padding."""
    ids = [tokenizer(_chat(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    return greedy_answers(model, tokenizer, ids, max_new_tokens, batch_size)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
                   synced_gpus: bool = False) -> list[str]:
    """Greedy answers to prompts given as token ids (chat template already applied), batched with left padding and
    the KV cache. ``synced_gpus``: every rank runs the same generation, as ZeRO-3's gathered weights require."""
    pad = tokenizer.pad_token_id
    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(ids) for ids in prompt_ids[start:start + batch_size]]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=model.device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                             synced_gpus=synced_gpus)
        answers.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return answers


def compare(
    prompts: Sequence[str],
    model_outputs: Sequence[str],
    baseline_outputs: Sequence[str],
    score: Callable[[Sequence[str], Sequence[str]], np.ndarray],
    confidence: float = 0.95,
    bootstrap: int = 200,
    seed: int = 0,
) -> dict:
    """Judge each pair with ``score`` (higher is better) and report the win rate, its LC form, intervals and
    average lengths (characters, the unit AlpacaEval's length control uses)."""
    model_rewards = score(prompts, model_outputs)
    baseline_rewards = score(prompts, baseline_outputs)
    prefs = preferences_from_rewards(model_rewards, baseline_rewards)
    model_lengths = [len(o) for o in model_outputs]
    baseline_lengths = [len(o) for o in baseline_outputs]
    raw = win_rate(prefs, confidence=confidence)
    lc = length_controlled_win_rate(
        prefs, model_lengths, baseline_lengths, confidence=confidence, bootstrap=bootstrap, seed=seed
    )
    return {
        "n": raw.n,
        "win_rate": raw.value,
        "win_rate_ci": [raw.low, raw.high],
        "standard_error": raw.standard_error,
        "wins": int(np.sum(prefs == 1.0)),
        "ties": int(np.sum(prefs == 0.5)),
        "losses": int(np.sum(prefs == 0.0)),
        "lc_win_rate": lc.value,
        "lc_win_rate_ci": [lc.low, lc.high],
        "lc_weights": lc.weights,
        "avg_length_model": float(np.mean(model_lengths)),
        "avg_length_baseline": float(np.mean(baseline_lengths)),
        "confidence": confidence,
    }


def baseline_answers(prompts: Sequence[str], answers: dict[str, str], path: str) -> list[str]:
    """The baseline's answer to each prompt, refusing a prompt the baseline file does not answer."""
    missing = [p for p in prompts if p not in answers]
    if missing:
        raise KeyError(f"{path} has no answer for {len(missing)} of {len(prompts)} prompts, e.g. {missing[0]!r}")
    return [answers[p] for p in prompts]


def write_report(out_dir: str, report: dict) -> str:
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    return path
