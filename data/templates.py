"""Conversations -> token ids with a target mask.

A template renders a conversation as text segments, each either a target (assistant content up to and
including the end-of-turn token, which is the EOS) or context. Each segment is tokenized on its own, so the
prompt's tokens are exactly what the model sees when it is asked to generate from that prompt (BPE merges
never cross a prompt/response boundary; METHODS.md §1).

Templates: ``chat`` (the tokenizer's own chat template) and ``alpaca`` (Taori et al. 2023, for base models).
"""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def _user_text(turn: dict) -> str:
    extra = turn.get("input") or ""
    return f"{turn['content']}\n\n{extra}" if extra else turn["content"]


def _for_chat_template(turns: list[dict]) -> list[dict]:
    return [{"role": t["role"], "content": _user_text(t) if t["role"] == "user" else t["content"]} for t in turns]


class ChatTemplate:
    def __init__(self, tokenizer):
        if not tokenizer.chat_template:
            raise ValueError("data.template=chat but the tokenizer has no chat template; use data.template=alpaca")
        self.tokenizer = tokenizer

    def _render(self, turns, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            _for_chat_template(turns), tokenize=False, add_generation_prompt=generation_prompt
        )

    def segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        eos = self.tokenizer.eos_token
        out, done = [], ""
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prefix = self._render(turns[:k], generation_prompt=True)
            full = self._render(turns[: k + 1], generation_prompt=False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise ValueError("the chat template does not render conversations incrementally")
            out.append((prefix[len(done):], False))
            reply = full[len(prefix):]
            cut = reply.find(eos)
            if cut < 0:  # template does not end the turn with EOS: the response must still end in one
                out.append((reply + eos, True))
            else:
                out.append((reply[: cut + len(eos)], True))
                out.append((reply[cut + len(eos):], False))
            done = full
        return [(text, target) for text, target in out if text]

    def prompt(self, turns: list[dict]) -> str:
        return self._render(turns, generation_prompt=True)


class AlpacaTemplate:
    """Single-turn alpaca prompt; the response is the assistant content followed by EOS."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def prompt(self, turns: list[dict]) -> str:
        users = [t for t in turns if t["role"] == "user"]
        if len(users) != 1 or any(t["role"] == "assistant" for t in turns):
            raise ValueError("the alpaca template takes exactly one user turn")
        user = users[0]
        if user.get("input"):
            return ALPACA_WITH_INPUT.format(instruction=user["content"], input=user["input"])
        return ALPACA_NO_INPUT.format(instruction=user["content"])

    def segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise ValueError("the alpaca template needs one user turn followed by one assistant turn")
        return [(self.prompt(turns[:-1]), False), (turns[-1]["content"] + self.tokenizer.eos_token, True)]


TEMPLATES = {"chat": ChatTemplate, "alpaca": AlpacaTemplate}


def build_template(name: str, tokenizer):
    if name not in TEMPLATES:
        raise KeyError(f"unknown data.template {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 target mask (1 = the token is a response token the loss predicts)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, target in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(target)] * len(piece)
    bos = tokenizer.bos_token_id
    if bos is not None and ids and ids[0] != bos and _adds_bos(tokenizer):
        ids.insert(0, bos)
        mask.insert(0, 0)
    return ids, mask


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text (Llama-style); templates may already have it."""
    return tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
