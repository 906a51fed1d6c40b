"""Noise on the input embeddings while training: NEFTune (uniform) and SymNoise (symmetric signs); docs/methods.md.

NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning", arXiv 2310.05914): each
input embedding of a training forward gets ``(alpha / sqrt(L * d)) * u`` added, u ~ U(-1, 1) per coordinate, with d
the embedding width and L the length of the example the token belongs to (the paper's Algorithm 1).

SymNoise (Yadav & Singh 2023, "SymNoise: Advancing Language Model Fine-tuning with Symmetric Noise", arXiv
2312.01523) keeps NEFTune's scale and replaces u by symmetric noise: signs s in {-1, +1} per coordinate, drawn with
probability 1/2 each, and, with ``antithetic`` (the default), the second half of every example's positions carries
the negated signs of its first half (position L - h + j gets -s_j, h = floor(L / 2); an odd example's middle position
keeps its own draw), so the noise of an example sums to zero. Only the paper's abstract could be read here: the
+-1 values follow an independent implementation, the antithetic halves the "symmetric" of the title; both are
options (docs/methods.md, SymNoise, says what is and is not checked).

In a packed row every document keeps its own L and its own halves: the row's length would shrink the noise by the
packing factor. Padding positions get no noise. Evaluation, reference scoring and generation see clean embeddings:
the noise is added only inside ``applied(batch)``, which the Trainer opens around the policy's training forward, and
only while the embedding module is in training mode. The noise is drawn from torch's global generator, whose state
every checkpoint saves, so a resumed run draws the same noise.

Both papers study SFT; with pairs the length of a shared-prompt document (prompt and both responses) would not be
the length of either example, so the Trainer refuses embedding noise with pairwise losses.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from tunelab.data import collate
from tunelab.data.contract import Batch


def per_token_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """[rows, L] document index per position (-1 = padding) -> the length of each position's document (0 for
    padding)."""
    real = doc_ids >= 0
    counts = torch.bincount(doc_ids[real], minlength=1)
    return torch.where(real, counts[doc_ids.clamp(min=0)], torch.zeros_like(doc_ids))


def mirror_positions(doc_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[rows, L] document ids and their lengths (``per_token_lengths``) -> the flat index (into rows * L) of the
    position whose signs each position negates, or -1 where it draws its own: position L - h + j of a document of
    length L mirrors its position j, h = floor(L / 2)."""
    rows, length = doc_ids.shape
    positions = torch.arange(length, device=doc_ids.device).expand_as(doc_ids)
    starts = collate.document_starts(doc_ids)
    second_half_from = lengths - lengths // 2
    offset = positions - starts
    mirrored = (lengths >= 2) & (offset >= second_half_from)  # padding has length 0
    row_base = torch.arange(rows, device=doc_ids.device)[:, None] * length
    return torch.where(mirrored, row_base + starts + offset - second_half_from, torch.full_like(doc_ids, -1))


class NEFTune:
    option = "train.neftune_alpha"

    def __init__(self, model: torch.nn.Module, alpha: float):
        alpha = float(alpha)
        if not alpha > 0:
            raise ValueError(f"{self.option} must be > 0 (NEFTune's paper uses 5, 10 or 15), got {alpha}")
        self.alpha = alpha
        self.doc_ids: torch.Tensor | None = None
        model.get_input_embeddings().register_forward_hook(self._add_noise)

    def scales(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """alpha / sqrt(L * d) per position, 0 on padding (L = 0)."""
        scale = self.alpha / torch.sqrt(lengths.clamp(min=1).double() * width)
        return torch.where(lengths > 0, scale, torch.zeros_like(scale))

    def unit_noise(self, embeddings: torch.Tensor, doc_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Noise before scaling, shaped like the embeddings."""
        return torch.empty_like(embeddings).uniform_(-1.0, 1.0)

    def _add_noise(self, module, inputs, embeddings):
        if self.doc_ids is None or not module.training:
            return None
        doc_ids = self.doc_ids.to(embeddings.device)
        lengths = per_token_lengths(doc_ids)
        scale = self.scales(lengths, embeddings.shape[-1]).to(embeddings.device, embeddings.dtype)
        return embeddings + self.unit_noise(embeddings, doc_ids, lengths) * scale[..., None]

    @contextmanager
    def applied(self, batch: Batch):
        self.doc_ids = batch.doc_ids
        try:
            yield
        finally:
            self.doc_ids = None


class SymNoise(NEFTune):
    option = "train.symnoise_alpha"

    def __init__(self, model: torch.nn.Module, alpha: float, antithetic: bool = True):
        super().__init__(model, alpha)
        self.antithetic = bool(antithetic)

    def unit_noise(self, embeddings: torch.Tensor, doc_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        signs = torch.empty_like(embeddings).bernoulli_(0.5) * 2 - 1
        if not self.antithetic:
            return signs
        partner = mirror_positions(doc_ids, lengths)
        flat = signs.reshape(-1, signs.shape[-1])
        negated = -flat[partner.clamp(min=0).reshape(-1)].reshape_as(signs)
        return torch.where((partner >= 0)[..., None], negated, signs)
