"""``flex``: the packed layout through torch's flex attention, with a block mask built from the per-position ids.

``layout_block_mask(doc_ids, branch_ids)`` describes the same mask as data/collate.attention_mask (causal, within
a document, a branch seeing branch 0 and itself, padding seeing itself only, so no row of the softmax is empty)
as a flex ``BlockMask``: per (query block, key block) of ``BLOCK`` positions, whether the block is empty (skipped),
full (computed without a mask) or partial (the ``mask_mod`` from the ids decides per score). The block table is
computed from per-block minima and maxima of the ids, O(rows x (L / BLOCK)^2) small integers, never an L x L mask.
A block is marked non-empty when any of its keys lies at or after the earliest document start of its queries (a
superset of the blocks with a visible key, so nothing is missed), and full only when its queries and keys all lie
in one document, its keys come before its queries, and every key is on branch 0 or on the queries' one branch.

What runs where, in torch 2.13 (checked on this CPU build): the forward runs on CPU both eagerly (an unfused path
that materialises each row's scores, fine for tests) and compiled; the backward does not run on CPU at all (torch
raises "FlexAttention does not support backward on CPU", eager or compiled), so flex trains only on CUDA, where the
attention function uses the compiled kernel (compiled once per process on first use; a new row length may
recompile). On CPU ``flex`` therefore serves no-gradient forwards (evaluation, reference log-probs) and a training
forward is refused with a pointer to ``tiled_sdpa``. CI checks the CPU forward against dense SDPA for every layout;
the gradients are tested only where CUDA is present (tests/test_attention.py) and in scripts/gpu_check.sh.

Registered with transformers as ``attn_implementation="flex"``; calls without a block mask (generation, a plain
forward) run SDPA on the mask transformers builds, as ``tiled_sdpa`` does.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunelab.data.collate import document_starts

FLEX = "flex"
BLOCK = 128  # flex attention's default sparse block size (torch.nn.attention.flex_attention)


def _block_extrema(ids: torch.Tensor, block: int, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, L] -> per block of ``block`` positions, the ids' minimum and maximum ([rows, blocks] each); positions
    past L take ``fill``."""
    padded = torch.nn.functional.pad(ids, (0, -ids.shape[1] % block), value=fill).view(ids.shape[0], -1, block)
    return padded.amin(-1), padded.amax(-1)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, nq, nk] booleans -> (count per query block [rows, 1, nq], key block indices with the marked ones first
    in ascending order [rows, 1, nq, nk]), int32: the compressed form BlockMask.from_kv_blocks takes."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


def block_tables(doc_ids: torch.Tensor, branch_ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, nq, nk] booleans per (query block, key block) of ``block`` positions: (partial, full). A block in
    neither is empty; a partial one may hold visible keys (the mask_mod decides), a full one holds only visible keys."""
    length = doc_ids.shape[1]
    n_blocks = -(-length // block)
    index = torch.arange(n_blocks, device=doc_ids.device)
    causal = index[None, :] <= index[:, None]  # [nq, nk]
    # the earliest key any query of a block may see; a key block ending before it is empty
    first_key = _block_extrema(document_starts(doc_ids), block, length)[0]  # [rows, nq]
    last_key_of_block = torch.clamp((index + 1) * block - 1, max=length - 1)
    nonempty = causal & (last_key_of_block[None, None, :] >= first_key[:, :, None])
    doc_lo, doc_hi = _block_extrema(doc_ids, block, -2)
    branch_lo, branch_hi = _block_extrema(branch_ids, block, -2)
    one_doc = (doc_lo == doc_hi) & (doc_lo >= 0)  # [rows, blocks]; a partial last block holds -2 and is never one
    same_doc = one_doc[:, :, None] & one_doc[:, None, :] & (doc_lo[:, :, None] == doc_lo[:, None, :])
    one_branch = branch_lo == branch_hi
    keys_shared = (branch_hi == 0)[:, None, :]
    same_branch = one_branch[:, :, None] & one_branch[:, None, :] & (branch_lo[:, :, None] == branch_lo[:, None, :])
    strictly_before = index[None, :] < index[:, None]
    full = nonempty & strictly_before & same_doc & (keys_shared | same_branch)
    return nonempty & ~full, full


def layout_block_mask(doc_ids: torch.Tensor, branch_ids: torch.Tensor, block: int | None = None) -> BlockMask:
    """The flex BlockMask of the packed layout given by ``doc_ids`` and ``branch_ids`` ([rows, L] each), in blocks
    of ``block`` positions (default ``BLOCK``)."""
    block = block or BLOCK
    length = doc_ids.shape[1]
    partial, full = block_tables(doc_ids, branch_ids, block)

    def mask_mod(b, h, q, k):
        doc_q, doc_k = doc_ids[b, q], doc_ids[b, k]
        branch_q, branch_k = branch_ids[b, q], branch_ids[b, k]
        visible = (q >= k) & (doc_q == doc_k) & (doc_q >= 0) & ((branch_k == 0) | (branch_q == branch_k))
        return visible | (q == k)

    kv_num, kv_index = _ordered(partial)
    full_num, full_index = _ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def flex_layout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, H, L, D], key/value [B, H_kv, L, D] -> ([B, L, H, D], None).
    With a BlockMask (the packed layout), flex attention; any other mask: plain SDPA."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"attention dropout {dropout} is set, which flex attention does not apply: set the model "
                         "config's attention_dropout to 0 or use model.attn_implementation=tiled_sdpa")
    on_cuda = query.device.type == "cuda"
    if not on_cuda and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        raise NotImplementedError(
            f"model.attn_implementation=flex trains only on CUDA: torch {torch.__version__} has no flex attention "
            "backward on CPU. Use model.attn_implementation=tiled_sdpa here (flex still serves forwards without "
            "gradient on CPU)")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads & (heads - 1):  # not a power of two: repeat the kv heads, as transformers' own flex path does
        key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    kernel = _compiled_flex() if on_cuda else flex_attention
    out = kernel(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != heads)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLEX, flex_layout_attention)
AttentionMaskInterface.register(FLEX, sdpa_mask)
