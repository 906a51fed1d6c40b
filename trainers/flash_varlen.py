"""``flash_attention_2`` for packed rows: each document one variable-length sequence of FlashAttention's varlen kernel,
its boundaries (``cu_seqlens``) derived from the per-position ids.

transformers' own FlashAttention path (transformers.modeling_flash_attention_utils._flash_attention_forward) already
runs the varlen kernel when it is handed ``cu_seq_lens_q/k`` and ``max_length_q/k`` with no attention mask: it
flattens the rows into one stream of rows x L tokens and calls ``flash_attn_varlen_func(causal=True)``. tunelab uses
that path as it is and supplies only the boundaries (``varlen_inputs``): a sequence starts at each row's start, at
every change of document, and at every padding position (padding then attends to itself only, as in the dense
mask). Position ids already restart at 0 in each document (data/collate.py), which is what the rotary embedding
needs. transformers' other route, inferring the boundaries from position-id restarts, serves one row only and
cannot tell two adjacent padding positions apart, hence the explicit boundaries.

Shared-prompt layouts (pairs or the unpaired layout with ``data.shared_prompt=true``) are refused: there a
response branch must see the prompt but not the other branch, which is not one contiguous causal sequence. An
exact varlen formulation exists (each branch's queries against a gathered copy of the prompt's keys followed by its
own, with bottom-right causal alignment) but it copies the prompt's keys and values per branch in every layer; flex
attention (``model.attn_implementation=flex``) expresses that layout with no copy, so the refusal points there or
to ``data.shared_prompt=false``.

What CPU tests validate: the boundaries against hand values, that the position ids restart at every boundary, and
the whole glue (transformers' varlen call receiving our boundaries, the model's log-probs equal to dense SDPA)
with a reference varlen function in place of the kernel. Only a GPU run with ``flash_attn`` installed validates
the kernel itself, its bf16 numerics and its backward (scripts/gpu_check.sh).
"""

from __future__ import annotations

import torch

FLASH = "flash_attention_2"


def varlen_boundaries(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[rows, L] document ids -> (cu_seqlens int32 [sequences + 1] over the rows flattened, longest sequence):
    a sequence per document of each row, and one per padding position."""
    length = doc_ids.shape[1]
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::length] = True
    starts |= flat < 0
    cu = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])]).to(torch.int32)
    return cu, int(cu.diff().max())


def varlen_inputs(doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> dict:
    """Keywords of the model's forward that route each layer's FlashAttention call to the varlen kernel over the
    documents; a layout with branches (a shared prompt) is refused."""
    if bool((branch_ids > 0).any()):
        raise ValueError(
            f"model.attn_implementation={FLASH} cannot express a shared-prompt layout (a response branch sees the "
            "prompt but not the other branch): use model.attn_implementation=flex, or data.shared_prompt=false "
            "(each response its own document)")
    cu, longest = varlen_boundaries(doc_ids)
    return {"attention_mask": None, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}
