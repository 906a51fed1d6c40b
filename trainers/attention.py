"""``tiled_sdpa``: exact attention for packed rows that computes only the key blocks a row's documents can see,
with the mask built tile by tile from per-position ids, never as a whole.

A packed row (data/collate.py) holds several documents, or prompt | chosen | rejected, described per position by
``doc_ids`` and ``branch_ids`` (data/contract.Batch). SDPA given the dense [rows, 1, L, L] mask computes all
L x L scores and masks afterwards (on CPU its kernel cannot skip masked blocks), and the mask alone takes L^2
bytes a row (1 GiB at L = 32768). Here the queries are cut into tiles of ``tile`` positions; each tile attends
only to keys from the first one any of its queries can see (the start of its earliest document) up to its own
last position (causal), under that block's slice of the mask, built from the ids when the tile runs
(data/collate.attention_mask): the same SDPA over the same mask values, so the result
equals dense SDPA up to float summation order, with O(tile x L) mask memory. The tiles are computed once per
forward from the ids (``query_tiles``, O(L)) and passed down to every layer with the ids (``layout_ids``) as
keywords, which transformers forwards to the attention function. When every row is one document, followed by
padding at most (``causal_rows``: a long document alone in its row, or unpacked rows), the mask is plain causal
for every real position and SDPA's own causal kernel runs on the whole row instead, which needs no mask either.
Measured in docs/benchmarks.md.

Registered with transformers as ``attn_implementation="tiled_sdpa"``; its mask builder is SDPA's, and any call
without the layout (generation with a cache, a plain forward) runs plain SDPA on the mask it is given.

``layout_inputs`` is where every implementation gets the layout in the form it takes: tiled_sdpa the ids and tiles,
``flex`` a block mask built from the ids (trainers/flex.py), ``flash_attention_2`` the documents' varlen boundaries
(trainers/flash_varlen.py), ``sdpa`` and ``eager`` the dense mask (``layout_mask``; eager adds it to the scores).
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunelab.data import collate
from tunelab.trainers.config_schema import TrainConfig
from tunelab.trainers.flash_varlen import FLASH, varlen_inputs
from tunelab.trainers.flex import FLEX, layout_block_mask

TILED_SDPA = "tiled_sdpa"
# The implementations that can take the packed layout: from its ids (tiled_sdpa, flex, flash), or a dense mask.
LAYOUT_ATTENTION = (TILED_SDPA, FLEX, FLASH, "sdpa", "eager")
DEFAULT_TILE = TrainConfig.attention_tile


def query_tiles(doc_ids: torch.Tensor, tile: int = DEFAULT_TILE) -> list[tuple[int, int, int]]:
    """(first query, end query, first key) per tile of the rows' positions; keys end at the tile's end (causal).
    The first key is the smallest any query of the tile sees in any row: its earliest document's start."""
    rows, length = doc_ids.shape
    starts = collate.document_starts(doc_ids)
    padded = torch.nn.functional.pad(starts, (0, -length % tile), value=length)
    first_keys = padded.view(rows, -1, tile).amin(dim=(0, 2)).tolist()  # one device sync for all tiles
    return [(q0, min(q0 + tile, length), k0) for q0, k0 in zip(range(0, length, tile), first_keys)]


def causal_rows(doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> bool:
    """Whether every row is one document from its first position, without branches, followed by padding only: then
    the layout's mask is plain causal attention for every real position. (Causal attention lets the trailing
    padding see the document, where the layout lets it see only itself; nothing reads a padding position's
    output, and no real position sees padding either way.)"""
    real = doc_ids >= 0
    one_document = (doc_ids == doc_ids[:, :1]) | ~real
    padding_last = real[:, :-1] >= real[:, 1:]
    return bool(real[:, 0].all() and one_document.all() and padding_last.all() and (branch_ids == 0).all())


def layout_mask(mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The layout's boolean mask as ``implementation`` takes it: SDPA (tiled or not) takes booleans; eager adds
    the mask to the scores, so it gets 0 where attention is allowed and the dtype's minimum elsewhere."""
    if implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def attention_problem(implementation: str) -> str | None:
    """Why ``model.attn_implementation=implementation`` cannot train on this machine, or None."""
    if implementation == FLEX and not torch.cuda.is_available():
        return (f"model.attn_implementation=flex trains only on CUDA: torch {torch.__version__} has no flex "
                "attention backward on CPU; use tiled_sdpa here (trainers/flex.py)")
    if implementation == FLASH and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        return (f"model.attn_implementation={FLASH} needs a CUDA GPU and the flash-attn package (pip install "
                "flash-attn); tiled_sdpa or flex take the same layouts without it")
    return None


def layout_inputs(doc_ids: torch.Tensor, branch_ids: torch.Tensor, implementation: str, tile: int,
                  dtype: torch.dtype) -> dict:
    """Keywords of the model body's forward that carry the packed layout to ``implementation``'s attention."""
    if implementation == TILED_SDPA:
        # the ids travel to the attention as keywords; the 4D placeholder stops transformers from building an
        # L x L mask of its own (it passes a 4D mask through untouched, and tiled_sdpa does not read it)
        placeholder = doc_ids.new_ones((1, 1, 1, 1), dtype=torch.bool)
        if causal_rows(doc_ids, branch_ids):
            # one document a row: SDPA's causal kernel, fused forward and backward, without tiles or masks
            # (docs/benchmarks.md: tiles with masks took about twice its time on one long document)
            return {"attention_mask": placeholder, "causal_layout": True}
        return {"attention_mask": placeholder, "layout_ids": (doc_ids, branch_ids),
                "attention_tiles": query_tiles(doc_ids, tile)}
    if implementation == FLEX:  # a BlockMask is 4D too, so transformers passes it through as well
        return {"attention_mask": layout_block_mask(doc_ids, branch_ids)}
    if implementation == FLASH:
        return varlen_inputs(doc_ids, branch_ids)
    return {"attention_mask": layout_mask(collate.attention_mask(doc_ids, branch_ids), implementation, dtype)}


class _TilesWithLocalGradients(torch.autograd.Function):
    """The tiles' outputs, with a backward that writes each tile's gradients into its own slices of q, k and v.

    Slicing q, k and v per tile under plain autograd costs, in the backward, a zero-filled gradient of the whole
    [B, H, L, D] tensor per slice, added into the next: O(tiles x L) memory traffic per layer, which at L = 32768
    (256 tiles) took more than half of a step's time (docs/benchmarks.md, "Long packed rows"). Here the forward
    keeps only q, k and v (through ``save_for_backward``, so gradient checkpointing's hooks see them); the backward
    recomputes each tile's attention with its graph, takes that tile's gradients and adds them into one buffer per
    input: the attention forward runs twice, as in FlashAttention's backward, and no tile's activations are kept
    from the forward. Attention dropout would need its random mask replayed, so it takes the plain path."""

    @staticmethod
    def forward(ctx, query, key, value, run_tile, tiles):
        ctx.run_tile, ctx.tiles = run_tile, tiles
        device = query.device.type  # the backward recomputes under the forward's autocast, as checkpointing does
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(query, key, value)
        return torch.cat([run_tile(query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1], q0, q1, k0)
                          for q0, q1, k0 in tiles], dim=1)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (query, key, value)]
        device, autocast, dtype = ctx.autocast
        for q0, q1, k0 in ctx.tiles:
            spans = ((q0, q1), (k0, q1), (k0, q1))
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
                leaves = [t.detach()[:, :, a:b].requires_grad_() for t, (a, b) in zip((query, key, value), spans)]
                out = ctx.run_tile(*leaves, q0, q1, k0)
            for grad, part, (a, b) in zip(grads, torch.autograd.grad(out, leaves, grad_output[:, q0:q1]), spans):
                grad[:, :, a:b] += part
        return (*grads, None, None)


def tiled_sdpa_attention(module, query, key, value, attention_mask, attention_tiles=None, layout_ids=None,
                         causal_layout=False, **kwargs):
    """transformers attention function: query [B, H, L, D], key/value [B, H_kv, L, D] -> ([B, L, H, D], None).
    With ``layout_ids`` (doc_ids, branch_ids) and ``attention_tiles``, tile by tile; with ``causal_layout`` (one
    document a row), SDPA's causal kernel; otherwise plain SDPA on the mask it is given."""
    length = query.shape[2]
    if causal_layout and key.shape[2] == length:
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    if attention_tiles is None or layout_ids is None or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    doc_ids, branch_ids = layout_ids

    def run_tile(q, k, v, q0, q1, k0):
        mask = collate.attention_mask(doc_ids, branch_ids, slice(q0, q1), slice(k0, q1))
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]

    grad_needed = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if grad_needed and not kwargs.get("dropout"):
        return _TilesWithLocalGradients.apply(query, key, value, run_tile, attention_tiles), None
    tiles = [run_tile(query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1], q0, q1, k0)
             for q0, q1, k0 in attention_tiles]
    return torch.cat(tiles, dim=1), None


AttentionInterface.register(TILED_SDPA, tiled_sdpa_attention)
AttentionMaskInterface.register(TILED_SDPA, sdpa_mask)
