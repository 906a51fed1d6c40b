"""Reward-model scores of (prompt turns, response) conversations, batched, split over ranks and cached on disk.

Any ``AutoModelForSequenceClassification`` with one label scores (the Skywork-Reward convention): the conversation
rendered by the reward model's own chat template, the score the logit at its last token. Batches are left-padded with
explicit position ids, and the model's pooling is pointed at the last position: transformers' classification heads
otherwise pool at the last token that is not the pad id, which is wrong when the pad id is also the conversation's
final token (a tokenizer whose pad is its end-of-turn token).

A reward model trained by tunelab (``config.tunelab_scores == "training_layout"``, trainers/models.py) learned its
score on prompt + response tokenized as training tokenizes them (data/tokenize.response_ids: the response ends at its
end-of-turn token), read at the last token that is not pad; the full chat-template rendering may add tokens after the
reply (ChatML's newline), which would move the read position. Such a model is fed those tokens and keeps its own
pooling, so it scores exactly as it did in training.

The cache holds one JSON file per (model identity: its name and a fingerprint of its weights, chat template) under
``cache_dir``, mapping the SHA-256 of each rendered conversation to its score, like the reference log-probs
(trainers/reference.py, written atomically with trainers/files.py): a text scored once is never scored again by the
same model and template, and any change to the weights or the template starts a new file.

ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1, SimPO v0.2's judge) has a custom head that only its hub repository's remote
code defines (``trust_remote_code=True``); its output carries the preference score in ``.score`` rather than
``.logits``, and its pooling looks for the end-of-turn token itself. That code cannot be fetched offline, so it is not
wired in here: plugging it in means loading with ``trust_remote_code=True``, reading ``out.score[:, 0]`` in
``RewardScorer._forward`` and checking its pooling under left padding (or scoring with batch size 1).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import broadcast_object_list

from tunelab.data.templates import build_template
from tunelab.data.tokenize import response_ids
from tunelab.trainers.files import write_json_atomic
from tunelab.trainers.models import TRAINING_LAYOUT
from tunelab.trainers.reference import weights_fingerprint
from tunelab.trainers.scoring import gather_in_order, rank_batches


def load_reward_model(spec: str, dtype: str = "float32"):
    """(model in eval mode, tokenizer) of a sequence-classification reward model: a hub id or local directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.trainers.models import DTYPES

    tokenizer = AutoTokenizer.from_pretrained(spec)
    model = AutoModelForSequenceClassification.from_pretrained(spec, dtype=DTYPES[dtype], attn_implementation="sdpa")
    if model.config.num_labels != 1:
        raise ValueError(f"{spec}: a reward model has one output label, this one has {model.config.num_labels}")
    if tokenizer.pad_token is None:  # padded positions are masked, so any id works
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@contextmanager
def _pool_at_last_position(model):
    """While inside, the model's classification head reads the last position (no token id equals -1)."""
    config = model.config.get_text_config()
    saved = config.pad_token_id
    config.pad_token_id = -1
    try:
        yield
    finally:
        config.pad_token_id = saved


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class RewardScorer:
    """Scores conversations with ``model``; ``identity`` names the model in the cache key (its hub id or path)."""

    def __init__(self, model, tokenizer, identity: str, batch_size: int = 8, cache_dir: str | None = None,
                 max_length: int | None = None):
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.device = next(model.parameters()).device
        self.forwards = 0  # model calls made, for the logs (and the cache test)
        template = tokenizer.chat_template or ""
        parts = {"model": identity, "weights": weights_fingerprint(model), "template": template,
                 "max_length": max_length, "dtype": str(next(model.parameters()).dtype)}
        self.key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
        self.cache_path = os.path.join(cache_dir, f"{self.key}.json") if cache_dir else None
        trained_here = getattr(model.config, "tunelab_scores", None) == TRAINING_LAYOUT
        self.template = build_template("chat", tokenizer) if trained_here else None

    def render(self, turns: list[dict], response: str) -> str:
        """The conversation as text: the cache key, and for other reward models what they read."""
        if self.template is not None:
            return json.dumps(self.encode(turns, response))
        conversation = [*turns, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False)

    def encode(self, turns: list[dict], response: str) -> list[int]:
        """The token ids the model scores."""
        if self.template is not None:
            reply = {"role": "assistant", "content": response}
            prompt, response_tokens = response_ids(self.template, self.tokenizer, turns, reply)
            ids = prompt + response_tokens
            return ids[:self.max_length] if self.max_length else ids
        return self._ids(self.render(turns, response))

    def _ids(self, text: str) -> list[int]:
        """The token ids of a rendered conversation (``render``'s text), tokenized once, only when it is scored."""
        if self.template is not None:
            return json.loads(text)  # render already holds encode's ids
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[:self.max_length] if self.max_length else ids

    @torch.no_grad()
    def _forward(self, encoded: list[list[int]]) -> list[float]:
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.forwards += 1
        # a tunelab reward model keeps its own pooling (the last token that is not pad, as in training)
        with nullcontext() if self.template is not None else _pool_at_last_position(self.model):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, 0].float().tolist()

    def _read_cache(self) -> dict[str, float]:
        if self.cache_path is None or not os.path.exists(self.cache_path):
            return {}
        with open(self.cache_path) as handle:
            return json.load(handle)

    def score(self, prompts: list[list[dict]], responses: list[str], state=None) -> list[float]:
        """The score of each (prompt turns, response), in order. With ``state`` (accelerate's PartialState) every
        rank must call it with the same arguments: the texts the cache lacks are split over the ranks, scored once
        each, gathered, and the main process writes the cache."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = [self.render(turns, response) for turns, response in zip(prompts, responses)]
        keys = [text_key(text) for text in texts]
        main = state is None or state.is_main_process
        cached = self._read_cache() if main else {}
        if state is not None and state.num_processes > 1:
            cached = broadcast_object_list([cached], from_process=0)[0]
        todo = sorted({key: text for key, text in zip(keys, texts) if key not in cached}.items())
        rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
        mine: dict[int, float] = {}
        for batch in rank_batches(len(todo), self.batch_size, rank, world):
            if batch:
                mine.update(zip(batch, self._forward([self._ids(todo[p][1]) for p in batch])))
        scored = gather_in_order(state, mine, len(todo)) if state is not None else [mine[p] for p in range(len(todo))]
        new = {key: value for (key, _), value in zip(todo, scored)}
        if new and main and self.cache_path is not None:
            write_json_atomic(self.cache_path, {**cached, **new})
        found = {**cached, **new}
        return [found[key] for key in keys]


def score_generations(rows: list[dict], scorer: RewardScorer, state=None) -> list[dict]:
    """Generation rows (trainers/generation.py) with a ``scores`` list aligned with their ``responses``."""
    flat = [(row["messages"], response) for row in rows for response in row["responses"]]
    values = scorer.score([p for p, _ in flat], [r for _, r in flat], state)
    out, start = [], 0
    for row in rows:
        count = len(row["responses"])
        out.append({**row, "scores": values[start:start + count]})
        start += count
    return out
