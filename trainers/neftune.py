"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, "NEFTune: Noisy Embeddings
Improve Instruction Finetuning", arXiv 2310.05914; docs/methods.md, NEFTune).

Each input embedding of a training forward gets ``(alpha / sqrt(L * d)) * u`` added, u ~ U(-1, 1) per
coordinate, with d the embedding width and L the length of the example the token belongs to (the paper's
Algorithm 1). In a packed row every document keeps its own L: scaling by the row's length would shrink the
noise of every example by the packing factor. Padding positions get no noise. Evaluation, reference scoring and
generation see clean embeddings: the noise is added only inside ``applied(batch)``, which the Trainer opens
around the policy's training forward, and only while the embedding module is in training mode. The noise is
drawn from torch's global generator, whose state every checkpoint saves, so a resumed run draws the same noise.

The paper's analysis is for SFT; with pairs the length of a shared-prompt document (prompt and both responses)
would not be the length of either example, so the Trainer refuses NEFTune with pairwise losses.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunelab.data.contract import Batch


def per_token_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """[rows, L] document index per position (-1 = padding) -> the length of each position's document (0 for
    padding)."""
    real = doc_ids >= 0
    counts = torch.bincount(doc_ids[real], minlength=1)
    return torch.where(real, counts[doc_ids.clamp(min=0)], torch.zeros_like(doc_ids))


class NEFTune:
    def __init__(self, model: torch.nn.Module, alpha: float):
        alpha = float(alpha)
        if not alpha > 0:
            raise ValueError(f"train.neftune_alpha must be > 0 (the paper uses 5, 10 or 15), got {alpha}")
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None
        model.get_input_embeddings().register_forward_hook(self._add_noise)

    def scales(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """alpha / sqrt(L * d) per position, 0 on padding (L = 0)."""
        scale = self.alpha / torch.sqrt(lengths.clamp(min=1).double() * width)
        return torch.where(lengths > 0, scale, torch.zeros_like(scale))

    def _add_noise(self, module, inputs, embeddings):
        if self.lengths is None or not module.training:
            return None
        scale = self.scales(self.lengths, embeddings.shape[-1]).to(embeddings.device, embeddings.dtype)
        return embeddings + torch.empty_like(embeddings).uniform_(-1.0, 1.0) * scale[..., None]

    @contextmanager
    def applied(self, batch: Batch):
        self.lengths = per_token_lengths(batch.doc_ids)
        try:
            yield
        finally:
            self.lengths = None
