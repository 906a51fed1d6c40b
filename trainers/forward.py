"""The forward pass every loss shares: causal LM body once, then logits only at labelled positions, in chunks.

``CausalLMWithLogProbs`` wraps a Hugging Face causal LM (plain, PEFT-wrapped, or DeepSpeed-sharded) so that
DDP/DeepSpeed see one module whose forward returns ``ForwardOutputs``. The body runs over the packed rows;
hidden states are gathered at the predicting positions only; each chunk of ``chunk_size`` of them goes through
the LM head and a log-softmax reduction under activation checkpointing, so neither the [batch, seq, vocab]
logits nor a full log-softmax is ever held: peak extra memory is one [chunk_size, vocab] block, in the
forward and in the backward (which recomputes that block).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from losses.base import STAT_LOG_SUM_P2, STAT_LOGIT_MEAN, STAT_MAX_LOGP, ForwardOutputs, Needs


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, stats: tuple[str, ...]):
    logits = head(hidden).float()
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(1, targets[:, None]).squeeze(1) - lse
    extra = []
    with torch.no_grad():
        for name in stats:
            if name == STAT_LOGIT_MEAN:
                extra.append(logits.mean(-1))
            elif name == STAT_LOG_SUM_P2:  # log sum_v p_v^2 = logsumexp(2z) - 2 logsumexp(z)
                extra.append(torch.logsumexp(2 * logits, dim=-1) - 2 * lse)
            elif name == STAT_MAX_LOGP:
                extra.append(logits.max(-1).values - lse)
    return (logps, *extra)


def target_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int, stats=()):
    """log p(target) for each row of ``hidden`` [N, d], plus the requested token statistics."""
    outputs = [[] for _ in range(1 + len(stats))]
    stats = tuple(stats)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts = checkpoint(_chunk_logps, head, h, y, stats, use_reentrant=False)
        else:
            parts = _chunk_logps(head, h, y, stats)
        for acc, part in zip(outputs, parts):
            acc.append(part)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    joined = [torch.cat(acc) if acc else empty for acc in outputs]
    return joined[0], dict(zip(stats, joined[1:]))


class CausalLMWithLogProbs(nn.Module):
    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: dict, needs: Needs) -> ForwardOutputs:
        body = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        hidden = body(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
        targets = batch["target_ids"]
        token_logps, stats = target_logps(head, hidden, targets, self.chunk_size, sorted(needs.token_stats))
        seq_role = batch["seq_role"]
        n_seq = seq_role.shape[0]
        token_seq = batch["target_seq"]
        seq_logps = token_logps.new_zeros(n_seq).index_add(0, token_seq, token_logps)
        seq_tokens = token_logps.new_zeros(n_seq).index_add_(0, token_seq, torch.ones_like(token_logps.detach()))
        out = ForwardOutputs(
            token_logps=token_logps,
            token_seq=token_seq,
            token_pos=batch["target_pos"],
            token_targets=targets,
            seq_logps=seq_logps,
            seq_tokens=seq_tokens,
            seq_role=seq_role,
            chosen=batch["chosen"],
            rejected=batch["rejected"],
            seq_group=batch["seq_group"],
            ref_seq_logps=batch.get("ref_seq_logps"),
            token_stats=stats,
        )
        if needs.hidden_states:
            out.hidden = hidden
            out.score_hidden = lambda h, y: target_logps(head, h, y, self.chunk_size)[0]
        return out
