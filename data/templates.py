"""Conversations -> token ids with a target mask, formatted the way a recipe's authors formatted them.

A template renders a conversation as text segments, each either a target (an assistant response) or context.
The segments are tokenized as one running text: each segment's ids are the ids the text up to its end adds to
the ids of the text before it. So the ids are exactly those of the whole templated conversation, and the prompt's
ids exactly those of the prompt rendered on its own (what the model sees when asked to generate), also for
SentencePiece tokenizers, which put a dummy-prefix "▁" in front of a separately tokenized segment. Where a token
merges across a boundary, it goes to the later segment (TRL's rule for a prompt/response merge).

Templates: ``chat`` (the tokenizer's chat template, or ``data.chat_template``) and ``alpaca`` (Taori et al. 2023,
for base models). Formatting conventions of the ``chat`` template (data config keys; docs/methods.md,
"Conventions", gives each one's source):

- ``system_turn``: ``as_given`` (default) or ``empty_if_supported``: an empty system turn is put in front of a
  conversation that has none when the template's text mentions "system" or "<|im_start|>" (alignment-handbook's
  ``maybe_insert_system_message``).
- ``response_start``: ``content`` (default): the response starts after the generation prompt (the assistant
  header); ``turn``: the prompt is the conversation rendered without a generation prompt and the response is the
  whole assistant turn, header included (the handbook's string-level prompt / chosen split).
- ``trailing_text``: ``context`` (default): what the template writes after the end-of-turn token (e.g. "\\n"
  after <|im_end|>) is not a target (and is dropped after a pair's response); ``label``: it is part of the
  response, as in TRL's and the handbook's split.
- ``final_eos``: ``rendered`` (default): the response ends as the template renders it (EOS added only when the
  template writes no end-of-turn token); ``ensure``: EOS is appended whenever the response does not end with it
  (TRL <= 0.11's ``add_eos_token_if_needed``, which the SimPO / handbook trainers run).

The end-of-turn token is the tokenizer's EOS if the assistant turn contains it, else the first special token after
the response content (Gemma's <end_of_turn>, Llama-3's <|eot_id|> when EOS is <|end_of_text|>).
"""

from __future__ import annotations

from jinja2 import TemplateError

from tunelab.data.formats import TEMPLATE_REFUSED, RowError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# data config key -> (default, valid values)
FORMATTING_OPTIONS = {
    "system_turn": ("as_given", ("as_given", "empty_if_supported")),
    "response_start": ("content", ("content", "turn")),
    "trailing_text": ("context", ("context", "label")),
    "final_eos": ("rendered", ("rendered", "ensure")),
}


def formatting_options(data_cfg) -> dict:
    """The template keys of a data config (``chat_template`` and FORMATTING_OPTIONS), defaults filled in."""
    options = {"chat_template": data_cfg.get("chat_template")}
    for key, (default, _) in FORMATTING_OPTIONS.items():
        options[key] = data_cfg.get(key) or default
    return options


def _user_text(turn: dict) -> str:
    extra = turn.get("input") or ""
    return f"{turn['content']}\n\n{extra}" if extra else turn["content"]


def _for_chat_template(turns: list[dict]) -> list[dict]:
    return [{"role": t["role"], "content": _user_text(t) if t["role"] == "user" else t["content"]} for t in turns]


class ChatTemplate:
    def __init__(self, tokenizer, chat_template: str | None = None, system_turn: str = "as_given",
                 response_start: str = "content", trailing_text: str = "context", final_eos: str = "rendered"):
        for key, value in (("system_turn", system_turn), ("response_start", response_start),
                           ("trailing_text", trailing_text), ("final_eos", final_eos)):
            valid = FORMATTING_OPTIONS[key][1]
            if value not in valid:
                raise ValueError(f"data.{key}={value!r}; valid: {', '.join(valid)}")
        if chat_template:
            # set on the tokenizer, so that the exported model carries the template it was trained with
            tokenizer.chat_template = chat_template
        if not tokenizer.chat_template:
            raise ValueError("data.template=chat but the tokenizer has no chat template; set data.chat_template "
                             "to a Jinja template or use data.template=alpaca")
        self.tokenizer = tokenizer
        self.system_turn = system_turn
        self.response_start = response_start
        self.trailing_text = trailing_text
        self.final_eos = final_eos
        self._special = [t for t in tokenizer.all_special_tokens if t]

    def _render(self, turns, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                _for_chat_template(turns), tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as err:  # the template's own check of a conversation, e.g. roles must alternate
            raise RowError(f"the tokenizer's chat template refused this conversation: {err}",
                           TEMPLATE_REFUSED) from None

    def _with_system_turn(self, turns: list[dict]) -> list[dict]:
        template = self.tokenizer.chat_template
        if (self.system_turn == "empty_if_supported" and turns and turns[0]["role"] != "system"
                and ("system" in template or "<|im_start|>" in template)):
            return [{"role": "system", "content": ""}] + list(turns)
        return list(turns)

    def _end_of_turn(self, reply: str, content: str) -> int:
        """Index in ``reply`` just after the end-of-turn token, or -1 if the template writes none."""
        eos = self.tokenizer.eos_token
        cut = reply.find(eos)
        if cut >= 0:
            return cut + len(eos)
        after = reply.find(content.strip()) + len(content.strip()) if content.strip() in reply else 0
        found = [(reply.find(t, after), t) for t in self._special if reply.find(t, after) >= 0]
        if not found:
            return -1
        cut, token = min(found)
        return cut + len(token)

    def segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        turns = self._with_system_turn(turns)
        eos = self.tokenizer.eos_token
        out, done = [], ""
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            generation_prompt = self._render(turns[:k], generation_prompt=True)
            full = self._render(turns[: k + 1], generation_prompt=False)
            start = generation_prompt if self.response_start == "content" else self._render(turns[:k], False)
            if not (start.startswith(done) and generation_prompt.startswith(start)
                    and full.startswith(generation_prompt)):
                raise ValueError("the chat template does not render conversations incrementally")
            out.append((start[len(done):], False))
            header, reply = generation_prompt[len(start):], full[len(generation_prompt):]
            end = self._end_of_turn(reply, turn["content"])
            if end < 0:
                response, trailing = reply + eos, ""
            elif self.trailing_text == "label":
                response, trailing = reply, ""
            else:
                response, trailing = reply[:end], reply[end:]
            if self.final_eos == "ensure" and not response.endswith(eos):
                response += eos
            out.append((header + response, True))
            out.append((trailing, False))
            done = full
        return [(text, target) for text, target in out if text]

    def prompt(self, turns: list[dict]) -> str:
        return self._render(self._with_system_turn(turns), generation_prompt=True)


class AlpacaTemplate:
    """Single-turn alpaca prompt; the response is the assistant content followed by EOS."""

    def __init__(self, tokenizer, **formatting):
        chosen = {k: v for k, v in formatting.items() if v and v != FORMATTING_OPTIONS.get(k, (None,))[0]}
        if chosen:
            raise ValueError(f"data.template=alpaca takes no chat formatting options, got "
                             f"{', '.join(f'data.{k}' for k in chosen)}")
        self.tokenizer = tokenizer

    def prompt(self, turns: list[dict]) -> str:
        users = [t for t in turns if t["role"] == "user"]
        if len(users) != 1 or any(t["role"] == "assistant" for t in turns):
            raise RowError("the alpaca template takes exactly one user turn", TEMPLATE_REFUSED)
        user = users[0]
        if user.get("input"):
            return ALPACA_WITH_INPUT.format(instruction=user["content"], input=user["input"])
        return ALPACA_NO_INPUT.format(instruction=user["content"])

    def segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise RowError("the alpaca template needs one user turn followed by one assistant turn", TEMPLATE_REFUSED)
        return [(self.prompt(turns[:-1]), False), (turns[-1]["content"] + self.tokenizer.eos_token, True)]


TEMPLATES = {"chat": ChatTemplate, "alpaca": AlpacaTemplate}


def build_template(name: str, tokenizer, **formatting):
    """``formatting``: ``chat_template`` and the FORMATTING_OPTIONS keys (see ``formatting_options``)."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown data.template {name!r}; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer, **formatting)


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 target mask (1 = the token is a response token the loss predicts)."""
    ids: list[int] = []
    mask: list[int] = []
    text = ""
    for piece, target in segments:
        text += piece
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = 0
        while kept < min(len(ids), len(whole)) and ids[kept] == whole[kept]:
            kept += 1
        ids, mask = whole, mask[:kept] + [int(target)] * (len(whole) - kept)
    bos = tokenizer.bos_token_id
    if bos is not None and ids and ids[0] != bos and _adds_bos(tokenizer):
        ids.insert(0, bos)
        mask.insert(0, 0)
    return ids, mask


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text (Llama-style); templates may already have it."""
    return tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
