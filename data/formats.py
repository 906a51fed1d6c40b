"""Row schemas -> canonical conversations, and which schema a source's columns are in.

A conversation is a list of turns ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``; a user turn
may carry a separate ``input`` (the alpaca field) that chat templates append to the content and the alpaca
template renders in its own section; ``tool`` turns (a tool's output) are context rendered by the tokenizer's
chat template. Every converter raises ``RowError`` with the reason; the caller adds the file and row.

SFT formats:  alpaca (instruction/input/output), messages (list of role/content), prompt_completion, sharegpt
(``conversations`` of from/value turns, LLaMA-Factory's role names).
Pair formats: pairwise_strings (prompt/chosen/rejected strings), pairwise_messages (the
HuggingFaceH4/ultrafeedback_binarized schema: ``chosen``/``rejected`` are full conversations sharing the
prompt turns; an optional ``prompt`` string is ignored in favour of the shared turns), hh_rlhf (Anthropic's
``chosen``/``rejected`` transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...").
Unpaired formats (TRL's unpaired preference schema, e.g. trl-lib/kto-mix-14k): a ``prompt``, one ``completion`` and
a boolean ``label`` (true = desirable): unpaired_strings (prompt and completion strings), unpaired_messages (prompt
a list of turns, completion a list holding the one assistant turn). A loss that trains on unpaired data also reads
the pair formats, each pair giving two rows (chosen -> label true, rejected -> label false; ``unpaired_rows``).
``detect_format`` picks the one format a source's columns fit (``format: auto``). docs/data_formats.md has an
example row of each.
"""

from __future__ import annotations

import re

ROLES = ("system", "user", "assistant", "tool")


# Kinds of bad rows: the log counts dropped rows per kind, with one example of each, so rows that fail the same
# way with different texts (which field, which turn) are counted together.
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
EMPTY_TEXT = "empty text"
MALFORMED_TURN = "malformed turn"
UNKNOWN_ROLE = "unknown role"
CONVERSATION_SHAPE = "conversation shape"
TOOL_DEFINITIONS = "tool definitions"
PROMPT_TOO_LONG = "prompt longer than budget"
TEMPLATE_REFUSED = "template cannot render"
NO_FORMAT = "columns fit no single format"


class RowError(ValueError):
    """What is wrong with one row (the message) and the kind of problem it is (one of the kinds above)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise RowError(f"missing field {key!r}", MISSING_FIELD)
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field {key!r} must be a string, got {type(value).__name__}", WRONG_TYPE)
    if not allow_empty and not value.strip():
        raise RowError(f"field {key!r} is empty", EMPTY_TEXT)
    return value


def _turns(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field {key!r} must be a non-empty list of {{role, content}} turns", WRONG_TYPE)
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RowError(f"{key}[{i}] must be a {{role, content}} mapping", MALFORMED_TURN)
        if turn["role"] not in ROLES:
            raise RowError(f"{key}[{i}] has unknown role {turn['role']!r}; valid: {', '.join(ROLES)}", UNKNOWN_ROLE)
        if not isinstance(turn["content"], str):
            raise RowError(f"{key}[{i}].content must be a string", MALFORMED_TURN)
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def alpaca(row: dict) -> list[dict]:
    user = {"role": "user", "content": _text(row, "instruction"), "input": _text(row, "input", allow_empty=True)}
    return [user, {"role": "assistant", "content": _text(row, "output")}]


def _trainable(turns: list[dict]) -> list[dict]:
    if not any(t["role"] == "assistant" for t in turns):
        raise RowError("conversation has no assistant turn to train on", CONVERSATION_SHAPE)
    if turns[-1]["role"] != "assistant":
        # templates render up to the last assistant reply, so a trailing turn would vanish without a trace
        raise RowError(f"conversation ends with a {turns[-1]['role']} turn; the last turn must be the assistant's "
                       "reply (remove the trailing turn or add its reply)", CONVERSATION_SHAPE)
    if any(t["role"] == "assistant" and not t["content"].strip() for t in turns):
        raise RowError("an assistant turn is empty", EMPTY_TEXT)
    return turns


def messages(row: dict) -> list[dict]:
    return _trainable(_turns(row.get("messages"), "messages"))


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
        raise RowError("chosen and rejected do not share the same prompt turns", CONVERSATION_SHAPE)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RowError("chosen and rejected must end with an assistant turn", CONVERSATION_SHAPE)
    if not chosen[:-1]:
        raise RowError("chosen/rejected have no prompt turns", CONVERSATION_SHAPE)
    if not any(t["role"] == "user" for t in chosen[:-1]):
        roles = ", ".join(t["role"] for t in chosen[:-1])
        raise RowError(f"the prompt turns ({roles}) have no user turn: nothing asks for the responses",
                       CONVERSATION_SHAPE)
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns[-1]["content"].strip():
            raise RowError(f"{name} response is empty", EMPTY_TEXT)
    return chosen[:-1], chosen[-1], rejected[-1]


# ShareGPT role names (``from``) as LLaMA-Factory's sharegpt loader defines them, plus the original ShareGPT dumps'
# "chatgpt"/"user"/"assistant": a function_call turn is the assistant asking for a tool (trained like any reply,
# as the text the data holds); observation/tool/function turns are the tool's answer (context).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function": "tool",
}


def sharegpt(row: dict) -> list[dict]:
    value = row.get("conversations")
    if not isinstance(value, list) or not value:
        raise RowError("field 'conversations' must be a non-empty list of {from, value} turns", WRONG_TYPE)
    if row.get("tools"):
        raise RowError("the row defines tools ('tools' column), which the templates cannot render; put the tool "
                       "definitions in the system prompt or drop the column", TOOL_DEFINITIONS)
    turns = []
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError(f"field 'system' must be a string, got {type(system).__name__}", WRONG_TYPE)
    if system and system.strip():
        turns.append({"role": "system", "content": system})
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"conversations[{i}] must be a {{from, value}} mapping", MALFORMED_TURN)
        if turn["from"] not in SHAREGPT_ROLES:
            raise RowError(f"conversations[{i}] has unknown speaker {turn['from']!r}; valid: "
                           f"{', '.join(SHAREGPT_ROLES)}", UNKNOWN_ROLE)
        if not isinstance(turn["value"], str):
            raise RowError(f"conversations[{i}].value must be a string", MALFORMED_TURN)
        turns.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return _trainable(turns)


_SPEAKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _transcript(row: dict, key: str) -> list[dict]:
    text = _text(row, key)
    parts = _SPEAKER.split(text)  # [before, speaker, content, speaker, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f"field {key!r} is not a transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns",
                       CONVERSATION_SHAPE)
    return [{"role": _HH_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def hh_rlhf(row: dict) -> tuple[list[dict], dict, dict]:
    chosen, rejected = _transcript(row, "chosen"), _transcript(row, "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowError(f"the {name} transcript ends with a Human turn, not the Assistant's response",
                           CONVERSATION_SHAPE)
        if not turns[-1]["content"]:
            raise RowError(f"{name} response is empty", EMPTY_TEXT)
    if chosen[:-1] != rejected[:-1]:
        raise RowError("the chosen and rejected transcripts differ before their final Assistant turn",
                       CONVERSATION_SHAPE)
    if not any(t["role"] == "user" for t in chosen[:-1]):
        raise RowError("the transcripts have no Human turn before the final response", CONVERSATION_SHAPE)
    return chosen[:-1], chosen[-1], rejected[-1]


def _label(row: dict) -> bool:
    if "label" not in row or row["label"] is None:
        raise RowError("missing field 'label' (true = desirable completion, false = undesirable)", MISSING_FIELD)
    if not isinstance(row["label"], bool):
        raise RowError(f"field 'label' must be a boolean (true = desirable), got {type(row['label']).__name__} "
                       f"{row['label']!r}", WRONG_TYPE)
    return row["label"]


def unpaired_strings(row: dict) -> tuple[list[dict], dict, bool]:
    prompt = [{"role": "user", "content": _text(row, "prompt")}]
    return prompt, {"role": "assistant", "content": _text(row, "completion")}, _label(row)


def unpaired_messages(row: dict) -> tuple[list[dict], dict, bool]:
    prompt = _turns(row.get("prompt"), "prompt")
    completion = _turns(row.get("completion"), "completion")
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise RowError("field 'completion' must hold exactly one assistant turn", CONVERSATION_SHAPE)
    if not any(t["role"] == "user" for t in prompt):
        raise RowError("the prompt turns have no user turn: nothing asks for the completion", CONVERSATION_SHAPE)
    if not completion[0]["content"].strip():
        raise RowError("the completion is empty", EMPTY_TEXT)
    return prompt, completion[0], _label(row)


def unpaired_rows(row: dict, fmt: str) -> list[tuple[list[dict], dict, bool]]:
    """``(prompt turns, completion turn, desirable)`` for each unpaired example a row of format ``fmt`` gives: one for
    an unpaired format, two for a pair format (its chosen response desirable, its rejected one not)."""
    if fmt in UNPAIRED_FORMATS:
        return [UNPAIRED_FORMATS[fmt](row)]
    if fmt in PAIR_FORMATS:
        prompt, chosen, rejected = PAIR_FORMATS[fmt](row)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    raise KeyError(f"unknown data format {fmt!r} for unpaired data; valid: "
                   f"{', '.join([*UNPAIRED_FORMATS, *PAIR_FORMATS])}")


SFT_FORMATS = {"alpaca": alpaca, "messages": messages, "prompt_completion": prompt_completion, "sharegpt": sharegpt}
PAIR_FORMATS = {"pairwise_strings": pairwise_strings, "pairwise_messages": pairwise_messages, "hh_rlhf": hh_rlhf}
UNPAIRED_FORMATS = {"unpaired_strings": unpaired_strings, "unpaired_messages": unpaired_messages}



# ---- format auto-detection ---------------------------------------------------------------------------------------
# The columns (and their kinds: a string, or a list of turn mappings) each format reads.
FORMAT_FIELDS = {
    "alpaca": {"instruction": "string", "input": "string", "output": "string"},
    "messages": {"messages": "turns"},
    "prompt_completion": {"prompt": "string", "completion": "string"},
    "sharegpt": {"conversations": "turns"},
    "pairwise_strings": {"prompt": "string", "chosen": "string", "rejected": "string"},
    "pairwise_messages": {"chosen": "turns", "rejected": "turns"},
    "hh_rlhf": {"chosen": "string", "rejected": "string"},
    "unpaired_strings": {"prompt": "string", "completion": "string", "label": "bool"},
    "unpaired_messages": {"prompt": "turns", "completion": "turns", "label": "bool"},
}
OPTIONAL_FIELDS = ("system", "tools")  # sharegpt's per-row system prompt and tool definitions


def _describe(name: str) -> str:
    return f"{name} ({', '.join(f'{c}: {k}' for c, k in FORMAT_FIELDS[name].items())})"


def detect_format(column_kinds: dict[str, str | None], first_row: dict, kind: str) -> tuple[str, str]:
    """(format, why) for a source whose columns have these kinds ("string", "turns", "bool" or None for anything else).

    Exactly one of the formats for ``kind`` ('sft', 'pairs' or 'unpaired', which also reads pairs) must fit, else a
    RowError lists the candidates:
    a guess between two readings of the same columns could train on the wrong fields. Transcript strings
    (hh_rlhf) and plain response strings share column kinds, so the first row's ``chosen`` tells them apart.
    """
    table = {"pairs": PAIR_FORMATS, "unpaired": {**UNPAIRED_FORMATS, **PAIR_FORMATS}}.get(kind, SFT_FORMATS)
    fits = [name for name in table
            if all(column_kinds.get(col) == want for col, want in FORMAT_FIELDS[name].items())]
    if "hh_rlhf" in fits and not _SPEAKER.match(str(first_row.get("chosen") or "")):
        fits.remove("hh_rlhf")
    if len(fits) == 1:
        return fits[0], "columns " + ", ".join(FORMAT_FIELDS[fits[0]])
    found = ", ".join(f"{c}: {k or 'other'}" for c, k in column_kinds.items()) or "none"
    if not fits:
        raise RowError(f"its columns ({found}) fit none of the {kind} formats: "
                       f"{'; '.join(_describe(name) for name in table)}. Set the source's format, or rename "
                       "columns with `columns: {<field>: <your column>}`", NO_FORMAT)
    raise RowError(f"its columns ({found}) fit several formats: {', '.join(fits)}; set the source's format to one",
                   NO_FORMAT)
