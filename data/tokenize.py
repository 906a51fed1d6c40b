"""Canonical rows -> tokenized examples, with prompt masking, truncation and bad-row handling.

SFT example:  ``input_ids`` and ``target_mask`` (1 on assistant tokens, EOS included; 0 on system/user
turns). Pair example: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (responses end with the end-of-turn token,
or as ``data.trailing_text`` / ``data.final_eos`` say; data/templates.py).

Truncation policy (``data.truncation``), checked with the lengths by ``validate_data_config`` before any data is
read:
- ``fixed_budget`` (the paper recipes' policy: SimPO's ``simpo_trainer.py``, the alignment-handbook DPO / RPO /
  WPO trainers, i.e. TRL's DPOTrainer up to 0.11 with its default ``truncation_mode=keep_end``). When a pair's
  prompt plus its longer response exceeds ``max_length``, the prompt keeps its last ``max_prompt_length`` tokens;
  if the pair still does not fit, each response keeps its first ``max_length - max_prompt_length`` tokens,
  however short the prompt is.
- ``shared_budget`` (default for everything else): the prompt is cut the same way, then the responses get all
  the room it leaves, ``max_length - len(prompt)`` tokens, so a short prompt leaves long responses whole.
- ``drop``: an example that does not fit is dropped and counted.
SFT examples (either budget policy): the sequence is cut at ``max_length`` from the right (the response loses
its tail and EOS, as in HF/TRL); an SFT prompt that alone fills ``max_length`` leaves nothing to learn from: that
is a bad row. An example counts as ``truncated`` only when tokens were actually cut.
Bad rows (missing fields, empty responses, over-long prompts) raise an error naming the source and row, or
with ``data.on_error=skip`` are dropped and counted in the log.
"""

from __future__ import annotations

from tunelab.data.formats import (
    CONVERSATION_SHAPE,
    PAIR_FORMATS,
    PROMPT_TOO_LONG,
    SFT_FORMATS,
    RowError,
    unpaired_rows,
)
from tunelab.data.templates import encode_segments

TRUNCATION_POLICIES = ("fixed_budget", "shared_budget", "drop")


def validate_data_config(data_cfg, kind: str) -> None:
    """Reject truncation settings no example could satisfy, naming the keys, before anything is loaded."""
    if data_cfg.truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"data.truncation={data_cfg.truncation!r}; valid: {', '.join(TRUNCATION_POLICIES)}")
    max_length = data_cfg.max_length
    if not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"data.max_length must be a positive integer, got {max_length!r}")
    if kind not in ("pairs", "unpaired"):
        return
    max_prompt_length = data_cfg.max_prompt_length
    if not isinstance(max_prompt_length, int) or max_prompt_length <= 0:
        raise ValueError(f"data.max_prompt_length must be a positive integer, got {max_prompt_length!r}")
    if max_prompt_length >= max_length:
        raise ValueError(
            f"data.max_prompt_length={max_prompt_length} must be smaller than data.max_length={max_length}: "
            f"a truncated prompt would leave no room for the responses"
        )


def _formatter(table: dict, fmt: str, kind: str):
    if fmt not in table:
        raise KeyError(f"unknown data format {fmt!r} for {kind} data; valid: {', '.join(table)}")
    return table[fmt]


def sft_example(row: dict, fmt: str, template, tokenizer, max_length: int, truncation: str) -> dict:
    turns = _formatter(SFT_FORMATS, fmt, "sft")(row)
    ids, mask = encode_segments(tokenizer, template.segments(turns))
    first_target = mask.index(1)
    if first_target >= max_length - 1:
        raise RowError(f"prompt has {first_target} tokens, no room for a response within data.max_length={max_length}",
                       PROMPT_TOO_LONG)
    status = "ok"
    if len(ids) > max_length:
        if truncation == "drop":
            return {"input_ids": [], "target_mask": [], "status": "too_long"}
        ids, mask, status = ids[:max_length], mask[:max_length], "truncated"
    return {"input_ids": ids, "target_mask": mask, "status": status}


def response_ids(template, tokenizer, prompt_turns, reply) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of ``prompt_turns`` answered by the ``reply`` turn, as training tokenizes them."""
    ids, mask = encode_segments(tokenizer, template.segments(prompt_turns + [reply]))
    last = len(mask) - mask[::-1].index(1)  # drop context tokens after the final response
    start = last  # the response is the final assistant turn; earlier assistant turns are prompt context
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:last]


def pair_example(
    row: dict, fmt: str, template, tokenizer, max_length: int, max_prompt_length: int, truncation: str
) -> dict:
    prompt_turns, chosen, rejected = _formatter(PAIR_FORMATS, fmt, "pairwise")(row)
    prompt, chosen_ids = response_ids(template, tokenizer, prompt_turns, chosen)
    prompt_r, rejected_ids = response_ids(template, tokenizer, prompt_turns, rejected)
    if prompt != prompt_r:
        raise RowError("chosen and rejected render different prompts", CONVERSATION_SHAPE)
    status = "ok"
    if len(prompt) + max(len(chosen_ids), len(rejected_ids)) > max_length:
        if truncation == "drop":
            return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "status": "too_long"}
        status = "truncated"
        prompt = prompt[-max_prompt_length:]
        if truncation == "fixed_budget":
            room = max_length - max_prompt_length
        else:
            room = max_length - len(prompt)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return {"prompt_ids": prompt, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "status": status}


def unpaired_example(
    row: dict, fmt: str, template, tokenizer, max_length: int, max_prompt_length: int, truncation: str
) -> dict:
    """The row's unpaired examples on one prompt, truncated as a pair is (data/tokenize.py's policies, the longest
    completion deciding)."""
    if fmt in PAIR_FORMATS:  # the pair's own tokenization and truncation, then chosen -> desirable, rejected -> not
        pair = pair_example(row, fmt, template, tokenizer, max_length, max_prompt_length, truncation)
        return {"prompt_ids": pair["prompt_ids"], "completions": [pair["chosen_ids"], pair["rejected_ids"]],
                "labels": [True, False], "status": pair["status"]}
    [(prompt_turns, completion, label)] = unpaired_rows(row, fmt)
    prompt, completion_ids = response_ids(template, tokenizer, prompt_turns, completion)
    status = "ok"
    if len(prompt) + len(completion_ids) > max_length:
        if truncation == "drop":
            return {"prompt_ids": [], "completions": [], "labels": [], "status": "too_long"}
        status = "truncated"
        prompt = prompt[-max_prompt_length:]
        room = max_length - max_prompt_length if truncation == "fixed_budget" else max_length - len(prompt)
        completion_ids = completion_ids[:room]
    return {"prompt_ids": prompt, "completions": [completion_ids], "labels": [label], "status": status}


def tokenize_row(row: dict, *, kind: str, fmt: str, template, tokenizer, data_cfg) -> dict:
    """One row of any source; bad rows come back with status 'error', the reason and its kind (for datasets.map)."""
    try:
        if kind == "sft":
            out = sft_example(row, fmt, template, tokenizer, data_cfg.max_length, data_cfg.truncation)
        elif kind == "unpaired":
            out = unpaired_example(
                row, fmt, template, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation
            )
        else:
            out = pair_example(
                row, fmt, template, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation
            )
        out["error"], out["error_kind"] = "", ""
    except RowError as err:
        empty = {"sft": {"input_ids": [], "target_mask": []},
                 "unpaired": {"prompt_ids": [], "completions": [], "labels": []}}.get(kind, {
                     "prompt_ids": [], "chosen_ids": [], "rejected_ids": []})
        out = {**empty, "status": "error", "error": str(err), "error_kind": err.kind}
    return out
