"""Masked Thought: response tokens in the input replaced by a mask token while training (Chen et al. 2024,
"Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning Learning of Language
Models", arXiv 2403.02178; ChangyuChen347/MaskedThought; docs/methods.md, Masked Thought).

Each response token of an SFT micro-batch is replaced *in the input* by ``mask_id`` with probability ``rate``;
the labels are untouched (every response token is still predicted, now from a partly masked context) and the
prompt is never masked. The authors ramp the rate linearly from 0 (their trainer_436.py): at optimizer step t of
T, ``rate = min(max_rate, max_rate * t / (T * warmup_ratio + 1))``, with max_rate 0.4 and warmup_ratio 0.66 in
their GSM8K scripts; ``warmup_ratio: 0`` keeps the rate constant. The mask token is the tokenizer's pad token by
default (one of the two choices the authors' README gives; the other, a newly added ``[mask]`` token, would
need a resized embedding).

The draw is redone every time an example is seen (as the authors mask in the trainer, not in the data), so it
is a train-time transform of the collated batch rather than a pipeline stage; its generator is seeded by
(seed, step, rank, micro-batch), so a resumed run masks exactly as the uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

from tunelab.data.contract import Batch


def mask_rate(step: int, total_steps: int, max_rate: float, warmup_ratio: float) -> float:
    """The rate for the optimizer step after ``step`` completed ones."""
    if warmup_ratio <= 0:
        return max_rate
    return min(max_rate, max_rate * step / (total_steps * warmup_ratio + 1))


def draw_generator(seed: int, step: int, rank: int, micro_batch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, rank, micro_batch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def mask_responses(batch: Batch, rate: float, mask_id: int, generator: torch.Generator) -> Batch:
    """A copy of an SFT batch whose response tokens in ``input_ids`` are each replaced with probability ``rate``.

    A target predicted from flat position p is the token at p + 1 (SFT documents are one contiguous sequence),
    so the response tokens' own positions are ``target_index + 1``."""
    positions = batch.target_index + 1
    chosen = positions[torch.rand(positions.shape[0], generator=generator) < rate]
    ids = batch.input_ids.clone()
    ids.view(-1)[chosen.to(ids.device)] = mask_id
    return batch.with_input_ids(ids)
