"""``tiled_sdpa``: exact attention for packed rows that skips the key blocks a row's document mask hides.

A packed row (data/collate.py) holds several documents, or prompt | chosen | rejected, under a boolean
[rows, 1, L, L] mask. SDPA given that mask computes all L x L scores and masks afterwards (on CPU its kernel
cannot skip masked blocks), about 10x the visible query/key pairs at L=1024. Here the queries are cut into
tiles of ``tile`` positions and each tile attends only to keys from the first one any of its queries can see
up to its own last position (causal): the same SDPA, over the same mask sliced, so the result equals dense
SDPA up to float summation order. Tiles are computed once per forward from the mask (``query_tiles``) and
passed down to every layer as the ``attention_tiles`` keyword, which transformers forwards to the attention
function. Measured in docs/benchmarks.md (CPU: attention 2.4-2.7x faster fwd+bwd at L~1024).

Registered with transformers as ``attn_implementation="tiled_sdpa"``; its mask builder is SDPA's, and any
call it cannot tile (no 4D mask, decoding with a cache, no tiles given) runs plain SDPA. ``layout_mask`` gives
the other implementations the layout's mask in the form each takes (eager adds it to the scores).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunelab.trainers.config_schema import TrainConfig

TILED_SDPA = "tiled_sdpa"
# The implementations that can take the packed layout's [rows, 1, L, L] document mask (in ``layout_mask``'s form).
LAYOUT_ATTENTION = (TILED_SDPA, "sdpa", "eager")
DEFAULT_TILE = TrainConfig.attention_tile


def query_tiles(mask: torch.Tensor, tile: int = DEFAULT_TILE) -> list[tuple[int, int, int]]:
    """(first query, end query, first key) per tile of a [rows, 1, L, L] boolean mask; keys end at the tile's
    end (causal). The first key is the smallest any query of the tile sees in any row."""
    length = mask.shape[-1]
    starts = list(range(0, length, tile))
    first_keys = torch.stack([
        mask[:, 0, q0:q0 + tile].any(1).int().argmax(-1).min() for q0 in starts
    ]).tolist()  # one device sync for all tiles
    return [(q0, min(q0 + tile, length), k0) for q0, k0 in zip(starts, first_keys)]


def layout_mask(mask: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The layout's boolean mask as ``implementation`` takes it: SDPA (tiled or not) takes booleans; eager adds
    the mask to the scores, so it gets 0 where attention is allowed and the dtype's minimum elsewhere."""
    if implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def tiled_sdpa_attention(module, query, key, value, attention_mask, attention_tiles=None, **kwargs):
    """transformers attention function: query [B, H, L, D], key/value [B, H_kv, L, D] -> ([B, L, H, D], None)."""
    length = query.shape[2]
    if (attention_tiles is None or attention_mask is None or attention_mask.dim() != 4
            or key.shape[2] != length or attention_mask.shape[-1] != length):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1],
                               attention_mask[:, :, q0:q1, k0:q1], **kwargs)[0]
        for q0, q1, k0 in attention_tiles
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(TILED_SDPA, tiled_sdpa_attention)
AttentionMaskInterface.register(TILED_SDPA, sdpa_mask)
