"""The train-time input perturbations a recipe enables: embedding noise (NEFTune's ``train.neftune_alpha`` or
SymNoise's ``train.symnoise_alpha``) and Masked Thought's response masking (``train.masked_thought``). All touch
only the policy's training forwards: evaluation, reference scoring and the exported model never see them."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from tunelab.data.contract import Batch
from tunelab.data.masked_thought import draw_generator, mask_rate, mask_responses
from tunelab.trainers.embedding_noise import NEFTune, SymNoise

MASKED_THOUGHT_DEFAULTS = {"max_rate": 0.4, "warmup_ratio": 0.66, "mask_token": None}  # authors' GSM8K scripts


def mask_token_id(tokenizer, token: str | None) -> int:
    if token is None:
        if tokenizer.pad_token_id is None:
            raise ValueError("train.masked_thought.mask_token: the tokenizer has no pad token; name a token")
        return tokenizer.pad_token_id
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"train.masked_thought.mask_token={token!r} is not in the tokenizer's vocabulary")
    return token_id


class InputNoise:
    def __init__(self, train_cfg, model, tokenizer, kind: str, total_steps: int, seed: int):
        neftune, symnoise = train_cfg.get("neftune_alpha"), train_cfg.get("symnoise_alpha")
        masking = train_cfg.get("masked_thought")
        for key, on in (("train.neftune_alpha", neftune is not None), ("train.symnoise_alpha", symnoise is not None),
                        ("train.masked_thought", bool(masking))):
            if on and kind != "sft":
                raise ValueError(f"{key} is defined for SFT data (the paper's setting), but this recipe's loss "
                                 "trains on pairs; unset it")
        if neftune is not None and symnoise is not None:
            raise ValueError("train.neftune_alpha and train.symnoise_alpha are two kinds of embedding noise; set one")
        self.embedding_noise = (NEFTune(model, neftune) if neftune is not None
                                else SymNoise(model, symnoise, train_cfg.get("symnoise_antithetic", True))
                                if symnoise is not None else None)
        self.masking = None
        if masking:
            options = {**MASKED_THOUGHT_DEFAULTS, **dict(masking)}
            unknown = set(options) - set(MASKED_THOUGHT_DEFAULTS)
            if unknown:
                raise ValueError(f"unknown train.masked_thought option(s) {sorted(unknown)}; valid: "
                                 f"{', '.join(MASKED_THOUGHT_DEFAULTS)}")
            if not 0.0 <= float(options["max_rate"]) <= 1.0 or float(options["warmup_ratio"]) < 0:
                raise ValueError("train.masked_thought needs max_rate in [0, 1] and warmup_ratio >= 0, got "
                                 f"{options['max_rate']} and {options['warmup_ratio']}")
            self.masking = (float(options["max_rate"]), float(options["warmup_ratio"]),
                            mask_token_id(tokenizer, options["mask_token"]))
        self.total_steps, self.seed = total_steps, seed

    def rate(self, step: int) -> float:
        max_rate, warmup_ratio, _ = self.masking
        return mask_rate(step, self.total_steps, max_rate, warmup_ratio)

    @contextmanager
    def applied(self, batch: Batch, step: int, rank: int, micro_batch: int):
        """The micro-batch the policy trains on, with the noise hook armed for its forward."""
        if self.masking is not None:
            generator = draw_generator(self.seed, step, rank, micro_batch)
            batch = mask_responses(batch, self.rate(step), self.masking[2], generator)
        with self.embedding_noise.applied(batch) if self.embedding_noise is not None else nullcontext():
            yield batch
