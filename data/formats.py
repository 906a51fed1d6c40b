"""Row schemas -> canonical conversations.

A conversation is a list of turns ``{"role": "system"|"user"|"assistant", "content": str}``; a user turn may
carry a separate ``input`` (the alpaca field) that chat templates append to the content and the alpaca
template renders in its own section. Every converter raises ``RowError`` with the reason; the caller adds
the file and row.

SFT formats:  alpaca (instruction/input/output), messages (list of role/content), prompt_completion.
Pair formats: pairwise_strings (prompt/chosen/rejected strings), pairwise_messages (the
HuggingFaceH4/ultrafeedback_binarized schema: ``chosen``/``rejected`` are full conversations sharing the
prompt turns; an optional ``prompt`` string is ignored in favour of the shared turns).
"""

from __future__ import annotations


class RowError(ValueError):
    pass


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise RowError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field {key!r} is empty")
    return value


def _turns(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field {key!r} must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RowError(f"{key}[{i}] must be a {{role, content}} mapping")
        if turn["role"] not in ("system", "user", "assistant"):
            raise RowError(f"{key}[{i}] has unknown role {turn['role']!r}")
        if not isinstance(turn["content"], str):
            raise RowError(f"{key}[{i}].content must be a string")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def alpaca(row: dict) -> list[dict]:
    user = {"role": "user", "content": _text(row, "instruction"), "input": _text(row, "input", allow_empty=True)}
    return [user, {"role": "assistant", "content": _text(row, "output")}]


def messages(row: dict) -> list[dict]:
    turns = _turns(row.get("messages"), "messages")
    assistant = [t for t in turns if t["role"] == "assistant"]
    if not assistant:
        raise RowError("conversation has no assistant turn to train on")
    if any(not t["content"].strip() for t in assistant):
        raise RowError("an assistant turn is empty")
    return turns


def prompt_completion(row: dict) -> list[dict]:
    return [
        {"role": "user", "content": _text(row, "prompt")},
        {"role": "assistant", "content": _text(row, "completion")},
    ]


def pairwise_strings(row: dict) -> tuple[list[dict], dict, dict]:
    prompt = [{"role": "user", "content": _text(row, "prompt")}]
    chosen = {"role": "assistant", "content": _text(row, "chosen")}
    rejected = {"role": "assistant", "content": _text(row, "rejected")}
    return prompt, chosen, rejected


def pairwise_messages(row: dict) -> tuple[list[dict], dict, dict]:
    chosen = _turns(row.get("chosen"), "chosen")
    rejected = _turns(row.get("rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("chosen and rejected do not share the same prompt turns")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RowError("chosen and rejected must end with an assistant turn")
    if not chosen[:-1]:
        raise RowError("chosen/rejected have no prompt turns")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns[-1]["content"].strip():
            raise RowError(f"{name} response is empty")
    return chosen[:-1], chosen[-1], rejected[-1]


SFT_FORMATS = {"alpaca": alpaca, "messages": messages, "prompt_completion": prompt_completion}
PAIR_FORMATS = {"pairwise_strings": pairwise_strings, "pairwise_messages": pairwise_messages}
