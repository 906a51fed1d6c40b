"""Which examples form each optimizer step: a deterministic function of (seed, epoch, step), so a resumed
run sees exactly the batches an uninterrupted run would have seen.

A step's global batch is cut into contiguous slices, one per rank, and each rank's slice into contiguous
micro-batches, so an ordering that places related examples next to each other (e.g. SFTMix's confident /
unconfident pairs) keeps them in one micro-batch.
"""

from __future__ import annotations

import torch


def random_order(dataset, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(len(dataset), generator=generator).tolist()


ORDERINGS = {"random": random_order}


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(f"{num_examples} training examples is fewer than train.global_batch_size={global_batch_size}")
    return steps


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
