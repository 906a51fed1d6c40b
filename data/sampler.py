"""Which examples form each optimizer step: a deterministic function of (seed, epoch, step), so a resumed
run sees exactly the batches an uninterrupted run would have seen, and the examples a run will draw are known
before it starts (``drawn_examples``: what a pass before training needs to score).

An ordering maps (dataset, seed, epoch) to a permutation-like list of example indices; orderings register by
name with ``@register_ordering(name)`` in the module that defines them (``random`` here, ``sftmix_pairs`` in
data/sftmix.py) and recipes pick one with ``data.ordering``.

A step's global batch is cut into contiguous slices, one per rank, and each rank's slice into contiguous
micro-batches, so an ordering that places related examples next to each other (e.g. SFTMix's confident /
unconfident pairs) keeps them in one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ORDERINGS: dict[str, Callable] = {}
DEFAULT_ORDERING = "random"  # what `data.ordering` means when a data config does not set it


def register_ordering(name: str):
    def add(fn):
        ORDERINGS[name] = fn
        return fn

    return add


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The torch generator an ordering draws one epoch's order from: distinct per (seed, epoch), and the same
    on every rank and on resume."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@register_ordering(DEFAULT_ORDERING)
def random_order(dataset, seed: int, epoch: int) -> list[int]:
    generator = epoch_generator(seed, epoch)
    return torch.randperm(len(dataset), generator=generator).tolist()


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(f"{num_examples} training examples is fewer than train.global_batch_size={global_batch_size}")
    return steps


def drawn_examples(ordering: Callable, dataset, seed: int, global_batch_size: int, steps: range) -> list[int]:
    """The sorted indices of every example the optimizer steps ``steps`` (0-based) draw, over all ranks: step s of
    epoch e takes ``ordering(dataset, seed, e)[k * global_batch_size:(k + 1) * global_batch_size]``, k = s mod the
    steps per epoch (``micro_batches`` splits exactly that slice over the ranks)."""
    per_epoch = steps_per_epoch(len(dataset), global_batch_size)
    drawn: set[int] = set()
    for epoch in range(steps.start // per_epoch, -(-steps.stop // per_epoch)):
        first = max(steps.start - epoch * per_epoch, 0)
        last = min(steps.stop - epoch * per_epoch, per_epoch)
        drawn.update(ordering(dataset, seed, epoch)[first * global_batch_size:last * global_batch_size])
    return sorted(drawn)


def micro_batches(order: list[int], step_in_epoch: int, global_batch_size: int, rank: int, world_size: int,
                  micro_batch_size: int) -> list[list[int]]:
    per_rank = global_batch_size // world_size
    start = step_in_epoch * global_batch_size + rank * per_rank
    mine = order[start:start + per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def derive_accumulation(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Accumulation steps so that micro x ranks x accumulation == global, or a clear error."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is not a multiple of train.micro_batch_size="
            f"{micro_batch_size} x {world_size} processes = {per_step}; change one of them"
        )
    return global_batch_size // per_step
