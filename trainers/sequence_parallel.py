"""Sequence parallelism (``train.sequence_parallel``): shard a training micro-batch's positions over the ranks of a
sequence-parallel group and reassemble the per-token log-probs the loss needs.

Every rank of a group holds the same micro-batch (the data-parallel world is processes / size). Its rows are laid
end to end as one row (documents never cross rows, so the layout is unchanged once each row's document ids are made
distinct), padded to a multiple of the group size, and each rank runs the model body over its contiguous slice of
positions. DeepSpeed's Ulysses attention wrapper (``UlyssesSPAttentionHF``) swaps positions for heads by all-to-all
around ``tiled_sdpa``, which receives the whole row's layout ids and so masks exactly as the unsharded forward. Each
rank scores the labelled positions of its slice; ``Shard.gather`` puts every rank's log-probs into the batch's
target order, so every rank computes the same ``ForwardOutputs`` and the same loss as the unsharded forward.

Gradients: ``gather`` sums disjoint contributions in the forward and hands each rank the gradient of its own
positions in the backward (no communication), so a rank's parameter gradients are its positions' share; DeepSpeed's
all-reduce over every process then sums the shares, which with the Trainer's usual scaling by the process count
gives the unsharded gradient. Only forwards in train mode are sharded, as the wrapper is registered with
``disable_in_eval``: evaluation, reference log-probs and generation (eval mode) run whole rows on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tunelab.data.contract import Batch, Needs
from tunelab.trainers.attention import TILED_SDPA


class _GatherTargets(torch.autograd.Function):
    """[n_local] values of this rank's targets -> [N] values of all targets (forward: scatter and sum over the
    group; backward: this rank's entries of the gradient, since every rank computes the same loss from them)."""

    @staticmethod
    def forward(ctx, local, order, total, group):
        full = local.new_zeros(total).index_copy_(0, order, local)
        dist.all_reduce(full, group=group)
        ctx.save_for_backward(order)
        return full

    @staticmethod
    def backward(ctx, grad_full):
        (order,) = ctx.saved_tensors
        return grad_full.index_select(0, order), None, None, None


@dataclass(frozen=True)
class Shard:
    """This rank's slice of a micro-batch laid out as one row of ``length`` positions (a multiple of the size)."""

    input_ids: torch.Tensor  # [1, length / size]
    position_ids: torch.Tensor  # [1, length / size]
    doc_ids: torch.Tensor  # [1, length]: the whole row's, since attention sees every position after the all-to-all
    branch_ids: torch.Tensor  # [1, length]
    target_index: torch.Tensor  # [n_local] positions in this slice that predict a target
    targets: torch.Tensor  # [n_local] which of the batch's targets those are (indices into target_ids)
    total_targets: int
    group: object

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's per-target values -> every target's, in the batch's target order (autograd-aware)."""
        return _GatherTargets.apply(local, self.targets, self.total_targets, self.group)


def one_row(doc_ids: torch.Tensor) -> torch.Tensor:
    """[rows, L] document ids -> [1, rows * L] with each row's documents renumbered apart (padding stays -1)."""
    rows = doc_ids.shape[0]
    span = int(doc_ids.max().clamp(min=0)) + 1
    offset = torch.arange(rows, device=doc_ids.device)[:, None] * span
    return torch.where(doc_ids >= 0, doc_ids + offset, doc_ids).reshape(1, -1)


def shard(batch: Batch, rank: int, size: int, group=None) -> Shard:
    """Rank ``rank``'s contiguous slice of ``batch``'s positions (all rows laid end to end, padded to a multiple of
    ``size``) and of the targets they predict."""
    flat = batch.input_ids.numel()
    pad = -flat % size
    length = flat + pad

    def row(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(t.reshape(1, -1), (0, pad), value=fill)

    width = length // size
    lo, hi = rank * width, (rank + 1) * width
    mine = (batch.target_index >= lo) & (batch.target_index < hi)
    targets = mine.nonzero().squeeze(1)
    return Shard(
        input_ids=row(batch.input_ids, 0)[:, lo:hi],
        position_ids=row(batch.position_ids, 0)[:, lo:hi],
        doc_ids=row(one_row(batch.doc_ids), -1),
        branch_ids=row(batch.branch_ids, 0),
        target_index=batch.target_index[targets] - lo,
        targets=targets,
        total_targets=int(batch.target_index.shape[0]),
        group=group,
    )


def unsupported_needs(needs: Needs) -> list[str]:
    """What a loss asks for that a sharded forward does not reassemble."""
    problems = []
    if needs.hidden_states:
        problems.append("hidden states at the labelled positions (hidden-state mixing)")
    if needs.sequence_scores:
        problems.append("sequence scores (a reward model's score head)")
    return problems


class SequenceParallel:
    """This rank's place in its sequence-parallel group, after DeepSpeed's Ulysses wrapper was put around the
    model's attention (``enable``)."""

    def __init__(self, size: int, rank: int, group):
        self.size, self.rank, self.group = size, rank, group

    def shard(self, batch: Batch) -> Shard:
        return shard(batch, self.rank, self.size, self.group)

    def data_parallel(self, process_index: int, num_processes: int) -> tuple[int, int]:
        """(this rank's data-parallel index, data-parallel world): DeepSpeed's groups are consecutive ranks."""
        return process_index // self.size, num_processes // self.size


def enable_sequence_parallel(model, size: int, num_processes: int, deepspeed: bool, needs: Needs) -> SequenceParallel:
    """Wrap the model's attention in DeepSpeed's Ulysses all-to-all for groups of ``size`` consecutive ranks, or
    raise naming what prevents it."""
    implementation = getattr(model.config, "_attn_implementation", None)
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    problems = []
    if not deepspeed:
        problems.append("it runs under DeepSpeed only (accelerate launch --config_file recipes/accelerate/zero2.yaml "
                        "or zero3.yaml): its all-to-all and the data-parallel batch geometry are DeepSpeed's")
    if num_processes % size:
        problems.append(f"the process count {num_processes} is not a multiple of it")
    if implementation != TILED_SDPA:
        problems.append(f"model.attn_implementation={implementation}: only tiled_sdpa receives the whole row's layout "
                        "through Ulysses (which drops dense masks)")
    if heads % size or kv_heads % size:
        problems.append(f"the model's {heads} attention heads and {kv_heads} key/value heads must both be multiples "
                        "of it (Ulysses gives each rank a share of the heads)")
    problems += [f"the loss needs {what}, which the sharded forward does not reassemble"
                 for what in unsupported_needs(needs)]
    if problems:
        raise ValueError(f"train.sequence_parallel={size}: " + "; ".join(problems))
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    # every micro-batch reaches the body as one row (``one_row``), and whole rows run unsharded in eval mode
    UlyssesSPAttentionHF.register_with_transformers(model, TILED_SDPA, sequence_parallel_size=size,
                                                    micro_batch_size=1, disable_in_eval=True)
    return SequenceParallel(size, mpu.get_sequence_parallel_rank(), mpu.get_sequence_parallel_group())
