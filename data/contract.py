"""The typed contract shared by data, losses and trainers: sequence roles, the units a loss is averaged over,
the token statistics a loss may ask for, a loss's ``Needs``, the ``Batch`` the collator builds and the
``ForwardOutputs`` a loss receives.

It imports nothing of tunelab's, so the data side (the collator counts units and marks roles), the losses and
the Trainer core all depend on it and not on each other (docs/architecture.md; the import contracts in
pyproject.toml keep it so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

# Role of each sequence in a batch.
ROLE_SFT, ROLE_CHOSEN, ROLE_REJECTED = 0, 1, 2
# The unpaired layout (Needs.unpaired): one completion per example, labelled desirable or undesirable, and a second
# branch on the same prompt holding another example's completion (a mismatched sequence, for a baseline estimate
# such as KTO's reference point; no loss trains on it as a response to its prompt).
ROLE_DESIRABLE, ROLE_UNDESIRABLE, ROLE_MISMATCHED = 3, 4, 5
NLL_ROLES = (ROLE_SFT, ROLE_CHOSEN, ROLE_DESIRABLE)  # sequences an NLL term may train on

# Units a loss or metric can be averaged over; the collator counts each of them per micro-batch.
UNIT_TARGET_TOKENS = "target_tokens"  # labelled tokens of NLL_ROLES sequences (what NLL averages over)
UNIT_SEQUENCES = "sequences"  # NLL_ROLES sequences
UNIT_PAIRS = "pairs"
UNIT_UNPAIRED = "unpaired"  # desirable and undesirable completions
UNITS = (UNIT_TARGET_TOKENS, UNIT_SEQUENCES, UNIT_PAIRS, UNIT_UNPAIRED)


@dataclass(frozen=True)
class TokenStatistic:
    """A per-token quantity a loss may ask the forward pass for, computed without gradient from the float32 logits
    of each chunk of labelled positions, on both LM-head paths of trainers/forward.py.

    ``of_logits(z [M, V]) -> [M]`` defines it. ``of_shifted_exp(e, top, total) -> [M]``, optional, is the same
    quantity from what the fused head has anyway (e = exp(z - top) with top = max z, total = e.sum(-1)), which
    spares that path a pass over the logits; without it the fused head calls ``of_logits`` before the exp.
    """

    name: str
    of_logits: Callable[[torch.Tensor], torch.Tensor]
    of_shifted_exp: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


# name -> TokenStatistic; a loss needing a new statistic registers it (in its own file) and names it in Needs.
TOKEN_STATISTICS: dict[str, TokenStatistic] = {}


def register_token_statistic(name: str, of_logits, of_shifted_exp=None) -> str:
    """Declare a token statistic once; returns its name (for ``Needs.token_stats``)."""
    if name in TOKEN_STATISTICS:
        raise ValueError(f"token statistic {name!r} is already registered")
    TOKEN_STATISTICS[name] = TokenStatistic(name, of_logits, of_shifted_exp)
    return name


# log sum_v p(v)^2 = logsumexp(2z) - 2 logsumexp(z); from the shifted exps: log sum e^2 - 2 log sum e.
STAT_LOGIT_MEAN = register_token_statistic("logit_mean", lambda z: z.mean(-1))  # the logits/* metrics
STAT_LOG_SUM_P2 = register_token_statistic(  # WPO, sampled alignment
    "log_sum_p2", lambda z: torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1),
    lambda e, top, total: torch.bmm(e[:, None, :], e[:, :, None]).view(-1).log() - 2 * total.log())
STAT_MAX_LOGP = register_token_statistic(  # max_v log p(v): WPO, greedy alignment
    "max_logp", lambda z: z.max(-1).values - torch.logsumexp(z, dim=-1),
    lambda e, top, total: top - (top + total.log()))


@dataclass(frozen=True)
class Needs:
    """What a loss requires from the data and the forward pass."""

    pairs: bool = False  # batches of (chosen, rejected) pairs instead of single sequences
    unpaired: bool = False  # labelled single completions, each with a mismatched completion of its prompt
    reference: bool = False  # per-sequence log-probs under a frozen reference model
    token_stats: frozenset[str] = frozenset()  # names in TOKEN_STATISTICS
    hidden_states: bool = False  # final hidden states at labelled positions, and the head to score them
    # Per-example numeric columns that a data stage adds (e.g. SFTMix's "group"): the collator gives each sequence
    # its example's value, so a loss reads them as ``ForwardOutputs.seq_columns[name]`` without any core change.
    columns: frozenset[str] = frozenset()
    # A scalar per sequence from the model's score head (a reward model's linear head) on the final hidden state
    # of the sequence's last token: the model is built as a sequence classifier and exported as one.
    sequence_scores: bool = False
    # Per-token log-probs through the LM head. A loss on scores alone (a reward model) declares False, and the
    # forward then computes no LM-head logits at all.
    token_logps: bool = True
    # The reference's log-probs of each pair's common-length prefix as well (``ForwardOutputs.ref_seq_prefix_logps``):
    # losses that weigh the tokens past the shorter response differently (LD-DPO) need them for both models.
    reference_prefix: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            pairs=self.pairs or other.pairs,
            unpaired=self.unpaired or other.unpaired,
            reference=self.reference or other.reference,
            token_stats=self.token_stats | other.token_stats,
            hidden_states=self.hidden_states or other.hidden_states,
            columns=self.columns | other.columns,
            sequence_scores=self.sequence_scores or other.sequence_scores,
            token_logps=self.token_logps or other.token_logps,
            reference_prefix=self.reference_prefix or other.reference_prefix,
        )

    @property
    def layout(self) -> str:
        """The data layout these needs ask for: 'pairs', 'unpaired' or 'sft' (the collator's and pipeline's kind)."""
        if self.pairs and self.unpaired:
            raise ValueError("the recipe's loss terms need both preference pairs and unpaired completions; a batch "
                             "holds one layout, so combine only losses of one kind")
        return "pairs" if self.pairs else "unpaired" if self.unpaired else "sft"


@dataclass(frozen=True)
class Batch:
    """One micro-batch in the padding-free layout of data/collate.py: R rows of width L, N targets, S sequences,
    P pairs. Frozen: what is added later (the reference log-probs, a noised copy of the tokens) comes back as a new
    Batch from a visible call (``with_reference``, ``with_input_ids``)."""

    input_ids: torch.Tensor  # [R, L] token ids, 0 on padding
    position_ids: torch.Tensor  # [R, L] restart at 0 in every document
    # Who may attend to whom is described per position, not by an [R, 1, L, L] mask: a query sees the keys at or
    # before it in its own document whose branch is 0 (a prompt, a whole SFT document) or its own branch (the
    # rejected response cannot see the chosen one). data/collate.attention_mask builds the dense mask from these
    # where an attention implementation needs one; tiled_sdpa builds each tile's slice on the fly.
    doc_ids: torch.Tensor  # [R, L] document of each position, -1 = padding (which sees only itself)
    branch_ids: torch.Tensor  # [R, L] 0 = shared by the document's branches, 1, 2, ... = one branch
    target_index: torch.Tensor  # [N] flat index (row * L + position) of the position that predicts each target
    target_ids: torch.Tensor  # [N] target token ids
    target_seq: torch.Tensor  # [N] sequence of each target
    target_pos: torch.Tensor  # [N] index of the target within its sequence's response
    seq_role: torch.Tensor  # [S] ROLE_*
    chosen: torch.Tensor  # [P] sequence index of each pair's chosen response
    rejected: torch.Tensor  # [P] sequence index of each pair's rejected response
    counts: dict[str, int]  # unit -> how many of it this micro-batch holds (UNITS)
    num_tokens: int  # non-padding positions
    seq_columns: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S] float32, Needs.columns
    ref_seq_logps: torch.Tensor | None = None  # [S] reference sum log-probs (precomputed or a live reference)
    ref_seq_prefix_logps: torch.Tensor | None = None  # [S] the same over each pair's common prefix (reference_prefix)

    def with_reference(self, ref_seq_logps: torch.Tensor, ref_seq_prefix_logps: torch.Tensor | None = None) -> Batch:
        return replace(self, ref_seq_logps=ref_seq_logps, ref_seq_prefix_logps=ref_seq_prefix_logps)

    def with_input_ids(self, input_ids: torch.Tensor) -> Batch:
        return replace(self, input_ids=input_ids)

    def to(self, device) -> Batch:
        """The batch with every tensor (also those in ``seq_columns``) on ``device``."""
        moved = {name: getattr(self, name) for name in self.__dataclass_fields__}
        moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in moved.items()}
        moved["seq_columns"] = {name: value.to(device) for name, value in self.seq_columns.items()}
        return Batch(**moved)


@dataclass
class ForwardOutputs:
    """Quantities of one micro-batch over its labelled tokens only.

    N labelled tokens, S sequences, P pairs. ``token_logps`` and ``seq_logps`` carry gradient; everything in
    ``token_stats`` and ``ref_seq_logps`` is detached.
    """

    token_logps: torch.Tensor  # [N] log p(target_t | context)
    token_seq: torch.Tensor  # [N] index of the sequence each token belongs to
    token_pos: torch.Tensor  # [N] index of the token within its sequence's response (0, 1, ...)
    token_targets: torch.Tensor  # [N] target token ids
    seq_logps: torch.Tensor  # [S] sum of token_logps per sequence
    seq_tokens: torch.Tensor  # [S] number of labelled tokens per sequence (float)
    seq_role: torch.Tensor  # [S] ROLE_*
    chosen: torch.Tensor  # [P] sequence index of each pair's chosen response
    rejected: torch.Tensor  # [P] sequence index of each pair's rejected response
    ref_seq_logps: torch.Tensor | None = None  # [S] reference sum log-probs
    ref_seq_prefix_logps: torch.Tensor | None = None  # [S] reference log-probs of the common prefix (see below)
    token_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    hidden: torch.Tensor | None = None  # [N, d] final hidden states that predict each target
    score_hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (h [M,d], y [M]) -> logp [M]
    pair_weights: torch.Tensor | None = None  # [P] detached per-pair weights (a pair weighting's, e.g. WPO)
    seq_columns: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S] float32, Needs.columns
    seq_scores: torch.Tensor | None = None  # [S] score head at each sequence's last token (Needs.sequence_scores)

    def with_pair_weights(self, pair_weights: torch.Tensor) -> ForwardOutputs:
        return replace(self, pair_weights=pair_weights)

    @property
    def seq_prefix_logps(self) -> torch.Tensor:
        """[S] sum of token_logps over each sequence's first k response tokens, k the shorter length of its pair's two
        responses (a sequence outside a pair: all its tokens). With gradient, like ``seq_logps``."""
        common = self.seq_tokens.clone()
        shorter = torch.minimum(self.seq_tokens[self.chosen], self.seq_tokens[self.rejected])
        common[self.chosen], common[self.rejected] = shorter, shorter
        inside = (self.token_pos < common[self.token_seq]).to(self.token_logps.dtype)
        return self.token_logps.new_zeros(self.seq_tokens.shape[0]).index_add(0, self.token_seq,
                                                                               self.token_logps * inside)

    @property
    def seq_avg_logps(self) -> torch.Tensor:
        return self.seq_logps / self.seq_tokens.clamp(min=1)

    def seq_mean_stat(self, name: str) -> torch.Tensor:
        """Per-sequence mean of a token statistic."""
        stat = self.token_stats[name]
        sums = torch.zeros_like(self.seq_tokens).index_add_(0, self.token_seq, stat.to(self.seq_tokens.dtype))
        return sums / self.seq_tokens.clamp(min=1)

    @property
    def nll_mask(self) -> torch.Tensor:
        """[N] tokens an NLL term trains on: SFT sequences, chosen and desirable responses (NLL_ROLES)."""
        return torch.isin(self.seq_role[self.token_seq], torch.tensor(NLL_ROLES, device=self.seq_role.device))
