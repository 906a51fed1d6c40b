"""SFTMix's Mixup regularizer (Xiao et al. 2024, arXiv 2410.05248; docs/methods_sftmix.md).

Each training micro-batch holds (confident, unconfident) pairs of SFT examples, placed next to each other by
the ``sftmix_pairs`` ordering and marked in the ``group`` column (1 = confident D_c, 0 = unconfident D_u) by the
``sftmix_split`` data stage; the loss declares the column in ``Needs.columns`` and reads ``out.seq_columns``.
For each pair, with lambda ~ Beta(alpha, alpha), the final hidden states that
predict the response tokens are mixed position-wise (k-th response token with k-th response token)::

    Z~_k = lambda Z_c,k + (1 - lambda) Z_u,k
    l_k  = lambda CE(head(Z~_k), y_c,k) + (1 - lambda) CE(head(Z~_k), y_u,k)

and ``head`` is the model's own LM head, applied in chunks through ``out.score_hidden``. The paper's
objective L = L_NTP + mu L_mix is composed in the recipe: ``loss: {ntp: {}, sftmix: {weight: mu, ...}}``.
Both terms are counted in labelled tokens, so the core divides both sums by the step's labelled-token count.

Options:
- ``alpha``: Beta(alpha, alpha) of the mixing weight.
- ``alignment``: responses of different lengths. ``overlap`` (default) mixes the first min(|y_c|, |y_u|)
  positions only; the longer response's remaining tokens are trained by L_NTP alone. ``pad`` mixes over
  max(|y_c|, |y_u|) positions with the shorter response's missing hidden states taken as zero and its
  missing targets dropped (a right-padded batch whose pad labels are ignored), so every labelled token of the
  pair enters L_mix once.
- ``lambda_per``: ``pair`` (default; one lambda per pair, so the update's distribution does not depend on how a
  step is cut into micro-batches) or ``batch`` (one lambda per micro-batch, as classic batch Mixup).
- ``normalize``: ``tokens`` (default) returns 2 x sum_k l_k in the unit ``target_tokens``: each mixed position
  consumes one labelled token of each side, so with equal lengths this is the mean over mixed positions (the
  token-mean a per-batch CE would give); with ``overlap`` and unequal lengths it is scaled by the mixed
  fraction of tokens (logged as ``sftmix/mixed_fraction``). ``pairs`` averages each pair's mean l_k over pairs
  (returned as 2 x sum in the unit ``sequences``; exact because training micro-batches hold whole pairs).

lambda is drawn from torch's CPU generator, whose state Accelerate checkpoints, so a resumed run draws the same
values. In training (gradients on) a micro-batch that is not made of whole (confident, unconfident) pairs is an
error that names the fix; without gradients (evaluation, whose data carries no groups) unpaired sequences are
simply not mixed, and L_mix is 0.
"""

from __future__ import annotations

import torch

from tunelab.data.contract import ROLE_SFT, UNIT_SEQUENCES, UNIT_TARGET_TOKENS, ForwardOutputs, Needs
from tunelab.losses.base import Loss, LossOutput, Metric, mean_metric
from tunelab.losses.registry import register_loss

ALIGNMENTS = ("overlap", "pad")
LAMBDA_PER = ("pair", "batch")
NORMALIZE = ("tokens", "pairs")
CONFIDENT = 1


def pair_sequences(out: ForwardOutputs, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(confident, unconfident) sequence indices of the micro-batch's pairs (2j, 2j+1).

    ``strict``: every sequence must belong to a pair of one confident and one unconfident SFT example.
    """
    role, group = out.seq_role, out.seq_columns["group"].to(out.seq_role.device)
    n = role.numel()
    empty = torch.zeros(0, dtype=torch.long, device=role.device)
    hint = ("set data.ordering=sftmix_pairs, list the sftmix_split data stage, and use an even "
            "train.micro_batch_size (recipe=sftmix does all three)")
    if (role != ROLE_SFT).any():
        if strict:
            raise ValueError("the sftmix loss mixes SFT examples; this batch holds preference pairs")
        return empty, empty
    if strict and n % 2:
        raise ValueError(f"sftmix: a training micro-batch of {n} sequences cannot hold whole pairs; {hint}")
    first = torch.arange(0, n - n % 2, 2, device=role.device)
    a, b = group[first], group[first + 1]
    valid = (a != b) & ((a == CONFIDENT) | (b == CONFIDENT)) & (a >= 0) & (b >= 0) & (a <= 1) & (b <= 1)
    if strict and not bool(valid.all()):
        raise ValueError(f"sftmix: micro-batch groups {group.tolist()} do not alternate confident (1) / "
                         f"unconfident (0); {hint}")
    first, a = first[valid], a[valid]
    confident = torch.where(a == CONFIDENT, first, first + 1)
    unconfident = torch.where(a == CONFIDENT, first + 1, first)
    return confident, unconfident


def mixed_token_nll(out: ForwardOutputs, confident: torch.Tensor, unconfident: torch.Tensor, lam: torch.Tensor,
                    alignment: str = "overlap"):
    """Per mixed position: pair index, -log p(y_c | Z~), -log p(y_u | Z~) (0 where a side has no token).

    ``lam`` [P] is each pair's mixing weight. Returns (pair [M], nll_c [M], nll_u [M], has_c [M], has_u [M]).
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"sftmix alignment={alignment!r}; valid: {', '.join(ALIGNMENTS)}")
    device = out.hidden.device
    lengths = out.seq_tokens.round().long().to(device)
    len_c, len_u = lengths[confident], lengths[unconfident]
    span = torch.minimum(len_c, len_u) if alignment == "overlap" else torch.maximum(len_c, len_u)
    pair = torch.repeat_interleave(torch.arange(len(confident), device=device), span)
    k = torch.arange(pair.numel(), device=device) - (torch.cumsum(span, 0) - span)[pair]
    # token index of (sequence, k-th response token); -1 where the sequence has no such token
    width = int(lengths.max()) if lengths.numel() else 0
    table = torch.full((lengths.numel(), width + 1), -1, dtype=torch.long, device=device)
    table[out.token_seq, out.token_pos] = torch.arange(out.token_seq.numel(), device=device)
    idx_c, idx_u = table[confident[pair], k], table[unconfident[pair], k]
    has_c, has_u = idx_c >= 0, idx_u >= 0
    hidden = torch.cat([out.hidden, out.hidden.new_zeros(1, out.hidden.shape[-1])])  # row -1: zero state
    weight = lam.to(device=device, dtype=hidden.dtype)[pair, None]
    mixed = weight * hidden[idx_c] + (1 - weight) * hidden[idx_u]
    targets = out.token_targets
    logps = out.score_hidden(torch.cat([mixed[has_c], mixed[has_u]]),
                             torch.cat([targets[idx_c[has_c]], targets[idx_u[has_u]]]))
    n_c = int(has_c.sum())
    nll_c = logps.new_zeros(pair.numel()).masked_scatter(has_c, -logps[:n_c])
    nll_u = logps.new_zeros(pair.numel()).masked_scatter(has_u, -logps[n_c:])
    return pair, nll_c, nll_u, has_c, has_u


@register_loss("sftmix")
class SFTMixLoss(Loss):
    """SFTMix's Mixup regulariser on (confident, unconfident) pairs (Xiao et al. 2024).

    Options (details in this module's docstring):
    - ``alpha``: Beta(alpha, alpha) of the mixing weight; 0.5 is our choice (docs/methods_sftmix.md).
    - ``alignment``: overlap (mix the common positions) | pad (missing hidden states taken as zero).
    - ``lambda_per``: pair (one lambda per pair) | batch (one per micro-batch, classic Mixup).
    - ``normalize``: tokens (a token-mean) | pairs (a mean of per-pair means).
    """
    needs = Needs(hidden_states=True, columns=frozenset({"group"}))

    def __init__(self, alpha: float = 0.5, alignment: str = "overlap", lambda_per: str = "pair",
                 normalize: str = "tokens"):
        if alpha <= 0:
            raise ValueError(f"sftmix alpha must be > 0, got {alpha}")
        for name, value, valid in (("alignment", alignment, ALIGNMENTS), ("lambda_per", lambda_per, LAMBDA_PER),
                                   ("normalize", normalize, NORMALIZE)):
            if value not in valid:
                raise ValueError(f"sftmix {name}={value!r}; valid: {', '.join(valid)}")
        self.alpha, self.alignment, self.lambda_per, self.normalize = float(alpha), alignment, lambda_per, normalize
        self.unit = UNIT_TARGET_TOKENS if normalize == "tokens" else UNIT_SEQUENCES

    def sample_lambda(self, n_pairs: int) -> torch.Tensor:
        """Beta(alpha, alpha) draws from torch's global CPU generator (checkpointed by Accelerate)."""
        concentration = torch.tensor(self.alpha, dtype=torch.float64)
        beta = torch.distributions.Beta(concentration, concentration)
        lam = beta.sample((n_pairs,) if self.lambda_per == "pair" else ()).float()
        return lam if self.lambda_per == "pair" else lam.expand(n_pairs)

    def __call__(self, out: ForwardOutputs, lam: torch.Tensor | None = None) -> LossOutput:
        if out.hidden is None or out.score_hidden is None:
            raise ValueError("the sftmix loss needs hidden states (Needs(hidden_states=True))")
        confident, unconfident = pair_sequences(out, strict=torch.is_grad_enabled())
        n_pairs = len(confident)
        if n_pairs == 0:
            return LossOutput(out.token_logps.sum() * 0.0, self.unit, {})
        if lam is None:
            lam = self.sample_lambda(n_pairs)
        lam = lam.to(out.hidden.device)
        pair, nll_c, nll_u, has_c, has_u = mixed_token_nll(out, confident, unconfident, lam, self.alignment)
        lam_k = lam[pair].to(nll_c.dtype)
        per_position = lam_k * nll_c + (1 - lam_k) * nll_u
        if self.normalize == "tokens":
            total = 2.0 * per_position.sum()
        else:
            positions = torch.bincount(pair, minlength=n_pairs).clamp(min=1).to(per_position.dtype)
            total = 2.0 * (per_position.new_zeros(n_pairs).index_add(0, pair, per_position) / positions).sum()
        metrics = {
            "lambda": mean_metric(lam),
            "mix_nll": Metric(per_position.detach().float().sum(), max(per_position.numel(), 1)),
            "mixed_fraction": Metric(float(has_c.sum() + has_u.sum()), max(out.token_seq.numel(), 1)),
        }
        return LossOutput(total, self.unit, metrics)
