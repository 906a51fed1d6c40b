"""On-policy preference data, the data side: prompts from any row format, generation files read safely, pairs built.

- ``prompt_turns``: the prompt conversation of a row in any format the generator takes: ``prompt`` (a string or
  turns), ``messages`` (a trailing assistant turn is dropped: it is the answer, not the prompt), AlpacaEval's and
  alpaca's ``instruction`` (+ ``input``), or a pair format train.py reads (data/formats.py; its shared prompt turns).
- ``read_jsonl``: the complete rows of a JSONL file that is written incrementally (trainers/generation.py). A run
  killed mid-write can leave a last line without its newline; that torn line is never returned (``torn`` says it
  was there), while a bad line anywhere else is an error naming the file and line.
- ``build_pairs``: from N scored samples per prompt, chosen = the best-scored sample and rejected = the worst, as the
  SimPO v0.2 / WPO on-policy datasets were made; prompts that give no pair are dropped and counted by reason.
  ``pair_row`` writes the ``pairwise_messages`` format (UltraFeedback-binarized schema, plus its ``score_chosen`` /
  ``score_rejected`` columns), which ``train.py data.path=<file> data.format=pairwise_messages`` reads.
- ``gold_response`` and ``gold_pairs`` (SPIN, Chen et al. 2024, arXiv 2401.01335): chosen = the data's own response to
  the prompt, rejected = the model's generation for it; a prompt whose generation is empty or equals the gold
  response gives no pair (counted).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from tunelab.data.formats import PAIR_FORMATS, RowError, _turns, detect_format

# Reasons a prompt gives no pair (the counts' keys, in the order they are checked).
FEWER_THAN_TWO = "fewer than 2 samples"
EMPTY = "fewer than 2 non-empty samples"
ALL_TIED = "all samples tied"
BELOW_MARGIN = "best - worst below min_margin"
NO_GENERATION = "generation empty"
SAME_AS_GOLD = "generation equals the gold response"
DROP_REASONS = (FEWER_THAN_TWO, EMPTY, ALL_TIED, BELOW_MARGIN, NO_GENERATION, SAME_AS_GOLD)


def _user_turn(content: str, extra: str = "") -> dict:
    # the alpaca ``input`` joins the instruction as the chat templates render it (data/templates.py)
    return {"role": "user", "content": f"{content}\n\n{extra}" if extra else content}


def prompt_turns(row: dict) -> list[dict]:
    """The prompt turns of ``row`` (ending with a user turn), or a RowError saying what is wrong."""
    if "prompt" in row and not {"chosen", "rejected"} <= set(row):
        value = row["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise RowError("field 'prompt' is empty", "empty text")
            return [_user_turn(value)]
        turns = _turns(value, "prompt")
    elif "messages" in row:
        turns = _turns(row["messages"], "messages")
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
    elif "instruction" in row:
        if not isinstance(row["instruction"], str) or not row["instruction"].strip():
            raise RowError("field 'instruction' must be a non-empty string", "wrong type")
        return [_user_turn(row["instruction"], row.get("input") or "")]
    else:
        kinds = {key: "turns" if isinstance(value, list) else "string" if isinstance(value, str) else None
                 for key, value in row.items()}
        name, _ = detect_format(kinds, row, "pairs")
        turns = PAIR_FORMATS[name](row)[0]
    if not turns or turns[-1]["role"] != "user":
        raise RowError("the prompt must end with a user turn (nothing to answer otherwise)", "conversation shape")
    return turns


def prompt_text(turns: list[dict]) -> str:
    """The last user turn's text: the ``prompt`` string that evaluation files and AlpacaEval key answers by."""
    return next(t["content"] for t in reversed(turns) if t["role"] == "user")


def read_jsonl(path: str) -> tuple[list[dict], bool]:
    """(complete rows, whether a torn last line was left out). A line counts only if it ends with a newline and
    holds a JSON object; the writer appends the newline last, so only the final line can be torn."""
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else the torn last line
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err}); only the last line may be torn") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows, bool(tail.strip())


@dataclass
class PairStats:
    """How many prompts gave a pair, and how many gave none, by reason (DROP_REASONS)."""

    prompts: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{self.dropped[r]} {r}" for r in DROP_REASONS if self.dropped[r]) or "none"
        return f"{self.pairs} pairs from {self.prompts} prompts; dropped: {reasons}"


def best_and_worst(responses: list[str], scores: list[float], min_margin: float = 0.0) -> tuple[int, int] | str:
    """(index of the best, index of the worst) among the non-empty responses, or the reason there is no pair. Ties
    for best or worst go to the first such sample (deterministic). A pair needs best - worst > 0 and >= min_margin."""
    if len(responses) != len(scores):
        raise ValueError(f"{len(responses)} responses but {len(scores)} scores")
    if len(responses) < 2:
        return FEWER_THAN_TWO
    kept = [i for i, text in enumerate(responses) if text.strip()]
    if len(kept) < 2:
        return EMPTY
    for i in kept:
        if not math.isfinite(scores[i]):
            raise ValueError(f"score {scores[i]!r} of sample {i} is not a finite number")
    best = max(kept, key=lambda i: (scores[i], -i))
    worst = min(kept, key=lambda i: (scores[i], i))
    margin = scores[best] - scores[worst]
    if margin <= 0:
        return ALL_TIED
    if margin < min_margin:
        return BELOW_MARGIN
    return best, worst


def pair_row(turns: list[dict], chosen: str, rejected: str, score_chosen: float | None,
             score_rejected: float | None) -> dict:
    """One ``pairwise_messages`` row: both conversations share the prompt turns and end with their response."""
    return {
        "prompt": prompt_text(turns),
        "chosen": [*turns, {"role": "assistant", "content": chosen}],
        "rejected": [*turns, {"role": "assistant", "content": rejected}],
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


def build_pairs(rows: list[dict], min_margin: float = 0.0) -> tuple[list[dict], PairStats]:
    """Pairs from scored generation rows (``messages``: the prompt turns, ``responses``, ``scores``), in row order."""
    stats, pairs = PairStats(), []
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("messages", "responses", "scores") if key not in row]
        if missing:
            raise KeyError(f"row {number} lacks {', '.join(missing)} (pairs need scored generations)")
        stats.prompts += 1
        picked = best_and_worst(row["responses"], row["scores"], min_margin)
        if isinstance(picked, str):
            stats.dropped[picked] += 1
            continue
        best, worst = picked
        pairs.append(pair_row(row["messages"], row["responses"][best], row["responses"][worst],
                              row["scores"][best], row["scores"][worst]))
        stats.pairs += 1
    return pairs, stats


def gold_response(row: dict) -> str:
    """The data's own answer in an SFT row: a trailing assistant turn of ``messages``, alpaca's ``output`` or
    ``completion``; a RowError when the row holds none."""
    if "messages" in row:
        turns = _turns(row["messages"], "messages")
        if turns[-1]["role"] == "assistant" and turns[-1]["content"].strip():
            return turns[-1]["content"]
        raise RowError("field 'messages' does not end with a non-empty assistant turn (the gold response)",
                       "conversation shape")
    for key in ("output", "completion"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    raise RowError("the row holds no gold response (a trailing assistant turn in 'messages', 'output' or "
                   "'completion')", "missing field")


def gold_pairs(rows: list[dict], golds: list[str]) -> tuple[list[dict], PairStats]:
    """SPIN pairs from generation rows (``messages``, ``responses``) and each row's gold response: chosen = gold,
    rejected = the first generated response. Rewards are not known, so the score columns are null."""
    if len(rows) != len(golds):
        raise ValueError(f"{len(rows)} generation rows but {len(golds)} gold responses")
    stats, pairs = PairStats(), []
    for row, gold in zip(rows, golds):
        stats.prompts += 1
        generated = row["responses"][0] if row["responses"] else ""
        if not generated.strip():
            stats.dropped[NO_GENERATION] += 1
            continue
        if generated.strip() == gold.strip():
            stats.dropped[SAME_AS_GOLD] += 1
            continue
        pairs.append(pair_row(row["messages"], gold, generated, None, None))
        stats.pairs += 1
    return pairs, stats
