"""The forward pass every loss shares: causal LM body once, then logits only at labelled positions, in chunks.

``CausalLMWithLogProbs`` wraps a Hugging Face causal LM (plain, PEFT-wrapped, or DeepSpeed-sharded) so that
DDP/DeepSpeed see one module whose forward returns ``ForwardOutputs``. The body runs over the packed rows;
hidden states are gathered at the predicting positions only, and the LM head scores them in chunks of
``chunk_size`` rows, so the [batch, seq, vocab] logits are never held.

The LM head has two exact implementations (``target_logps`` picks one):

- fused (a plain bias-free ``nn.Linear`` head, the usual case): one autograd function over all chunks. Forward:
  per chunk, logits into a reused buffer, target logit, then max / exp / sum in place for the log-sum-exp. The
  probabilities of the first chunks are kept for the backward while they fit in ``keep_bytes``; the other chunks
  are recomputed there. Backward: d log p(y) / d z = onehot(y) - softmax(z), with the upstream gradient g folded
  into the small [chunk, d] side: grad_hidden = g * (W[y] - P W) and grad_W = (g h)^T onehot - P^T (g h), so no
  [chunk, vocab] gradient tensor is ever formed. A frozen head (LoRA) skips grad_W; tied embeddings get grad_W
  through the shared weight like any other use of it.
- generic (any other head: a bias, hooks, a trainable ZeRO-3 partitioned or DTensor weight): each chunk through
  the head module and a log-softmax reduction under activation checkpointing (recomputed in the backward).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.data.contract import TOKEN_STATISTICS, Batch, ForwardOutputs, Needs
from tunelab.trainers.attention import DEFAULT_TILE, layout_inputs
from tunelab.trainers.config_schema import TrainConfig

# Probabilities kept from the forward for the backward (instead of recomputing those chunks' logits), per call.
DEFAULT_KEEP_BYTES = TrainConfig.logits_keep_mb * 2 ** 20


# ---- generic path ---------------------------------------------------------------------------------------------
def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, stats: tuple[str, ...]):
    logits = head(hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(1, targets[:, None]).squeeze(1) - lse
    with torch.no_grad():
        extra = [TOKEN_STATISTICS[name].of_logits(logits) for name in stats]
    return (logps, *extra)


def _generic_target_logps(head, hidden, targets, chunk_size, stats):
    outputs = [[] for _ in range(1 + len(stats))]
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts = checkpoint(_chunk_logps, head, h, y, stats, use_reentrant=False)
        else:
            parts = _chunk_logps(head, h, y, stats)
        for acc, part in zip(outputs, parts):
            acc.append(part)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    return [torch.cat(acc) if acc else empty for acc in outputs]


# ---- fused path -----------------------------------------------------------------------------------------------
def fused_head_supported(head: nn.Module) -> bool:
    """A bias-free plain ``nn.Linear`` whose full weight is a local tensor, with no hooks that a direct use of
    the weight would bypass. ZeRO-3 (partitioned, ``ds_id``, empty until gathered), DTensor (FSDP2) and
    quantized weights, heads with a bias and wrapped heads take the generic path."""
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and head.bias is None
        and type(weight) in (nn.Parameter, torch.Tensor)
        and not hasattr(weight, "ds_id")
        and weight.numel() > 0
        and weight.dtype.is_floating_point
        and not (head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"))
    )


class _BlockPool:
    """Reuses the large float32 blocks of the fused head across calls on CPU, where every fresh allocation of
    that size is a new mapping whose first touch page-faults (~30% on top of the logits matmul). A call uses at
    most two blocks (kept probabilities and a chunk buffer), so at most two are pooled; when none is large
    enough, the smaller free blocks are released before allocating, because an idle pooled block is resident
    memory that adds to every later step's peak (it cost 0.2 GB of DPO's peak when blocks were only ever added).
    Blocks handed out are views of a pooled base, so they share its version counter: a saved block overwritten by
    a later call makes a (retain_graph) second backward fail loudly instead of reading stale values. CUDA has its
    own caching allocator, so other devices allocate directly."""

    def __init__(self, max_blocks: int = 2):
        self.free: list[torch.Tensor] = []
        self.max_blocks = max_blocks

    def take(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        need = rows * cols
        if device.type != "cpu":
            return torch.empty(rows, cols, dtype=torch.float32, device=device)
        fits = [i for i, b in enumerate(self.free) if b.numel() >= need]
        if fits:
            return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))[:need].view(rows, cols)
        self.free.clear()  # all too small for this need; a larger block serves the smaller needs from now on
        return torch.empty(rows, cols, dtype=torch.float32, device=device)

    def give(self, block: torch.Tensor | None) -> None:
        if block is None or block.device.type != "cpu":
            return
        base = block._base if block._base is not None else block
        self.free.append(base.view(-1))
        if len(self.free) > self.max_blocks:
            self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))


_POOL = _BlockPool()


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``head(hidden)`` would compute in (autocast's when it is on, else the operands')."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """float32 logits h @ w^T, written into ``buffer`` (float32 [>= len(h), V]) when given."""
    if w.dtype == torch.float32 and buffer is not None:
        out = buffer[:h.shape[0]]
        return torch.mm(h, w.t(), out=out)
    logits = torch.mm(h, w.t())
    if logits.dtype == torch.float32:
        return logits
    if buffer is None:
        return logits.float()
    return buffer[:h.shape[0]].copy_(logits)


def _spans(n: int, keep_rows: int, chunk_size: int):
    """Chunks of at most chunk_size rows: over the kept rows [0, keep_rows), then over the rest."""
    for first, last in ((0, keep_rows), (keep_rows, n)):
        for start in range(first, last, chunk_size):
            yield start, min(last, start + chunk_size)


class _FusedTargetLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, stats, keep_bytes):
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedTargetLogps._forward(ctx, hidden, weight, targets, chunk_size, stats, keep_bytes, dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_size, stats, keep_bytes, dtype):
        w = weight.to(dtype)
        n, vocab = hidden.shape[0], w.shape[0]
        logps = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        extra = {name: hidden.new_empty(n, dtype=torch.float32) for name in stats}
        from_shifted_exp = [name for name in stats if TOKEN_STATISTICS[name].of_shifted_exp is not None]
        from_logits = [name for name in stats if name not in from_shifted_exp]
        # the first rows' probabilities are kept for the backward (whole chunks, within keep_bytes)
        keep_rows = 0 if ctx is None else min(n, keep_bytes // (4 * vocab))
        kept = _POOL.take(keep_rows, vocab, hidden.device) if keep_rows else None
        buffer = _POOL.take(min(chunk_size, n - keep_rows), vocab, hidden.device) if keep_rows < n else None
        for start, stop in _spans(n, keep_rows, chunk_size):
            block = kept[start:stop] if stop <= keep_rows else buffer
            z = _chunk_logits(hidden[start:stop].to(dtype), w, block)
            y = targets[start:stop]
            target = z.gather(1, y[:, None]).squeeze(1)
            for name in from_logits:
                extra[name][start:stop] = TOKEN_STATISTICS[name].of_logits(z)
            top = z.amax(-1)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            e = z.sub_(top[:, None]).exp_()  # z is dead from here on: exp(z - max) in place
            total = e.sum(-1)
            chunk_lse = top + total.log()
            lse[start:stop] = chunk_lse
            logps[start:stop] = target - chunk_lse
            for name in from_shifted_exp:
                extra[name][start:stop] = TOKEN_STATISTICS[name].of_shifted_exp(e, top, total)
            if stop <= keep_rows:
                e.div_(total[:, None])  # softmax, kept for the backward
        _POOL.give(buffer)
        if ctx is not None:
            ctx.chunk_size, ctx.dtype, ctx.keep_rows = chunk_size, dtype, keep_rows
            ctx.save_for_backward(hidden, weight, targets, lse, kept)
            ctx.mark_non_differentiable(*extra.values())
        return (logps, *extra.values())

    @staticmethod
    def backward(ctx, grad_logps, *unused):
        hidden, weight, targets, lse, kept = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, chunk_size, keep_rows = ctx.dtype, ctx.chunk_size, ctx.keep_rows
        w = weight.to(dtype)
        n, vocab = hidden.shape[0], w.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        g = grad_logps.float()
        buffer = _POOL.take(min(chunk_size, n - keep_rows), vocab, hidden.device) if keep_rows < n else None
        for start, stop in _spans(n, keep_rows, chunk_size):
            h = hidden[start:stop].to(dtype)
            y = targets[start:stop]
            if stop <= keep_rows:
                probs = kept[start:stop]
            else:
                probs = _chunk_logits(h, w, buffer).sub_(lse[start:stop, None]).exp_()
            probs = probs.to(dtype)
            gc = g[start:stop, None]
            if need_hidden:  # g * (W[y] - P W)
                grad = w.index_select(0, y).float() - torch.mm(probs, w).float()
                grad_hidden[start:stop] = (grad * gc).to(hidden.dtype)
            if need_weight:  # (g h)^T onehot(y) - P^T (g h)
                gh = h.float() * gc
                grad_weight.index_add_(0, y, gh)
                if dtype == torch.float32:
                    grad_weight.addmm_(probs.t(), gh, alpha=-1)
                else:
                    grad_weight.sub_(torch.mm(probs.t(), gh.to(dtype)).float())
        _POOL.give(buffer)
        _POOL.give(kept)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _gathered_frozen_weight(head: nn.Module) -> torch.Tensor | None:
    """A frozen (e.g. LoRA) bias-free linear head whose weight ZeRO-3 partitions, gathered into a plain local
    tensor, or None for any other head. The generic path cannot serve it: its activation checkpoint recomputes a
    chunk in the backward, where DeepSpeed re-gathers only weights that receive gradients. Gathering is a
    collective; every rank runs the forward in lockstep."""
    weight = getattr(head, "weight", None)
    if (type(head) is not nn.Linear or head.bias is not None or weight is None or not hasattr(weight, "ds_id")
            or weight.requires_grad):
        return None
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if weight.ds_status == ZeroParamStatus.AVAILABLE:  # persistent (small) or already gathered by a tied use
        return weight.detach()
    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().clone()


def target_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int, stats=(),
                 keep_bytes: int = DEFAULT_KEEP_BYTES, fused: bool | None = None):
    """log p(target) for each row of ``hidden`` [N, d], plus the requested token statistics (detached).

    ``fused=None`` uses the fused LM head where ``fused_head_supported(head)`` (or the head is a frozen ZeRO-3
    one, gathered first); False forces the generic path.
    """
    stats = tuple(stats)
    unknown = [name for name in stats if name not in TOKEN_STATISTICS]
    if unknown:
        raise ValueError(f"unknown token statistics {unknown}; registered: {sorted(TOKEN_STATISTICS)} "
                         "(tunelab.data.contract.register_token_statistic declares one)")
    weight = _gathered_frozen_weight(head) if fused is not False else None
    if weight is not None:
        fused = True
    else:
        weight = getattr(head, "weight", None)
        if fused is None:
            fused = fused_head_supported(head)
    if hidden.shape[0] == 0 or not fused:
        joined = _generic_target_logps(head, hidden, targets, chunk_size, stats)
    elif torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        joined = _FusedTargetLogps.apply(hidden, weight, targets, chunk_size, stats, keep_bytes)
    else:
        with torch.no_grad():
            joined = _FusedTargetLogps.forward(None, hidden, weight, targets, chunk_size, stats, 0)
    return joined[0], dict(zip(stats, joined[1:]))


class CausalLMWithLogProbs(nn.Module):
    def __init__(self, model: nn.Module, chunk_size: int = TrainConfig.logits_chunk_size,
                 keep_bytes: int = DEFAULT_KEEP_BYTES, attention_tile: int = DEFAULT_TILE, sequence_parallel=None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.keep_bytes = keep_bytes
        self.attention_tile = attention_tile
        # trainers/sequence_parallel.SequenceParallel or None: shards the positions of training forwards
        self.sequence_parallel = sequence_parallel

    def sequence_scores(self, flat_hidden: torch.Tensor, batch: Batch, n_seq: int) -> torch.Tensor:
        """[S] float32: the score head on the hidden state of each sequence's last token that is not the pad token,
        which sits one position after that token's predictor (in every layout: a branch's tokens are contiguous in
        its row). Skipping pad tokens is transformers' sequence-classification rule (the rightmost non-pad token),
        so the exported model scores a prompt + response exactly as training did, also where pad is EOS."""
        pad = self.model.config.pad_token_id
        keep = batch.target_ids != pad if pad is not None else torch.ones_like(batch.target_ids, dtype=torch.bool)
        last_predictor = batch.target_index.new_full((n_seq,), -1).scatter_reduce(
            0, batch.target_seq[keep], batch.target_index[keep], reduce="amax")
        if bool((last_predictor < 0).any()):
            raise ValueError("a response made only of pad tokens has no token to score")
        head = getattr(self.model, "score", None)
        if head is None:
            raise TypeError(f"{type(self.model).__name__} has no `score` head: a loss that needs sequence scores "
                            "trains a model built as a sequence classifier (trainers/models.py)")
        return head(flat_hidden.index_select(0, last_predictor + 1)).squeeze(-1).float()

    def forward(self, batch: Batch, needs: Needs) -> ForwardOutputs:
        body = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        implementation = getattr(self.model.config, "_attn_implementation", None)
        # train mode, exactly when DeepSpeed's Ulysses wrapper exchanges positions (it is bypassed in eval mode)
        sharded = self.sequence_parallel is not None and self.training
        part = self.sequence_parallel.shard(batch) if sharded else batch  # this rank's positions, or all of them
        layout = layout_inputs(part.doc_ids, part.branch_ids, implementation, self.attention_tile,
                               self.model.get_input_embeddings().weight.dtype)
        hidden = body(
            input_ids=part.input_ids,
            position_ids=part.position_ids,
            use_cache=False,
            **layout,
        ).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        hidden = flat.index_select(0, part.target_index)
        targets = batch.target_ids
        scored = targets.index_select(0, part.targets) if sharded else targets
        seq_role = batch.seq_role
        n_seq = seq_role.shape[0]
        token_seq = batch.target_seq
        if needs.token_logps:
            token_logps, stats = target_logps(head, hidden, scored, self.chunk_size, sorted(needs.token_stats),
                                              keep_bytes=self.keep_bytes)
            if sharded:  # every target's log-prob, in the batch's order, on every rank of the group
                token_logps, stats = part.gather(token_logps), {k: part.gather(v) for k, v in stats.items()}
        else:  # a loss on scores alone: no LM-head logits
            token_logps, stats = flat.new_zeros(targets.shape[0], dtype=torch.float32), {}
        seq_logps = token_logps.new_zeros(n_seq).index_add(0, token_seq, token_logps)
        seq_tokens = token_logps.new_zeros(n_seq).index_add_(0, token_seq, torch.ones_like(token_logps.detach()))
        out = ForwardOutputs(
            token_logps=token_logps,
            token_seq=token_seq,
            token_pos=batch.target_pos,
            token_targets=targets,
            seq_logps=seq_logps,
            seq_tokens=seq_tokens,
            seq_role=seq_role,
            chosen=batch.chosen,
            rejected=batch.rejected,
            ref_seq_logps=batch.ref_seq_logps,
            ref_seq_prefix_logps=batch.ref_seq_prefix_logps,
            token_stats=stats,
            seq_columns=batch.seq_columns,
        )
        if needs.sequence_scores:
            out.seq_scores = self.sequence_scores(flat, batch, n_seq)
        if needs.hidden_states:
            out.hidden = hidden
            out.score_hidden = lambda h, y: target_logps(head, h, y, self.chunk_size, keep_bytes=self.keep_bytes)[0]
        return out
