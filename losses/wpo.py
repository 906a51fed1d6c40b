"""WPO: Weighted Preference Optimization (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
Optimization", arXiv 2406.11827; wzhouad/WPO). docs/methods_preference.md (WPO).

A *pair weighting*, not a loss: it reweights each pair of any pairwise loss (DPO in the paper) by how likely
the pair is under the current policy, so off-policy data looks more on-policy. Per sequence s and response
position t, with the policy's next-token distribution pi(.|x, y_<t):

    sampled alignment:  a_{s,t} = log pi(y_t) - log sum_v pi(v)^2
    greedy alignment:   a_{s,t} = log pi(y_t) - max_v log pi(v)
    l_s = mean_t a_{s,t}                     (mean over the response tokens of s)
    w_i = min(1, exp(l_chosen + l_rejected))  (detached)

and the weighted loss is loss_i = w_i * loss_i, averaged over pairs (not divided by the sum of weights). The
weights come from the *current policy*, in the same forward pass that the loss uses (the authors compute them
in ``get_batch_logps`` of the policy's forward and discard those of the reference forward); in evaluation they
come from the evaluated policy. The authors multiply both label-smoothing terms of cDPO by the weight; here
the whole per-pair loss is multiplied (``PairwiseLoss``), which is the same thing.

Clamp at 1: the authors' code clamps the weight at 1 (``torch.clamp(..., max=1)``); TRL's ``use_weighting``
(1.16) does not, so a TRL weight can exceed 1 when the responses are more likely than the policy's own
"expected" token probability (sum_v p^2 <= max_v p, so a_{s,t} > 0 is possible under sampled alignment). We
follow the authors (docs/methods_preference.md (WPO)). Under greedy alignment a_{s,t} <= 0, so the clamp never binds.

log sum_v p^2 = logsumexp(2z) - 2 logsumexp(z) is computed by the forward pass chunk by chunk (no softmax
materialised). Logged (the authors' code does not): ``wpo/weight_mean``, ``wpo/weight_min``, ``wpo/weight_max``.
"""

from __future__ import annotations

import torch

from tunelab.data.contract import STAT_LOG_SUM_P2, STAT_MAX_LOGP, ForwardOutputs, Needs
from tunelab.losses.base import Metric
from tunelab.losses.registry import register_pair_weighting

ALIGNMENTS = {"sampled": STAT_LOG_SUM_P2, "greedy": STAT_MAX_LOGP}


@register_pair_weighting("wpo")
class WPOWeighting:
    """WPO's per-pair weight min(1, exp(l_chosen + l_rejected)) from the current policy (Zhou et al. 2024).

    Options:
    - ``alignment``: sampled (the paper's default, log p(y_t) - log sum_v p(v)^2) | greedy (minus max_v log p).
    """
    def __init__(self, alignment: str = "sampled"):
        if alignment not in ALIGNMENTS:
            raise ValueError(f"unknown wpo alignment {alignment!r}; valid: {', '.join(ALIGNMENTS)}")
        self.alignment = alignment
        self.stat = ALIGNMENTS[alignment]
        self.needs = Needs(pairs=True, token_stats=frozenset({self.stat}))

    def sequence_alignment(self, out: ForwardOutputs) -> torch.Tensor:
        """[S] l_s: mean over each sequence's response tokens of log pi(y_t) minus the alignment statistic."""
        dtype = torch.promote_types(out.token_logps.dtype, torch.float32)
        aligned = out.token_logps.detach().to(dtype) - out.token_stats[self.stat].to(dtype)
        sums = torch.zeros(out.seq_tokens.shape[0], dtype=dtype, device=aligned.device)
        sums.index_add_(0, out.token_seq, aligned)
        return sums / out.seq_tokens.detach().to(dtype).clamp(min=1)

    def __call__(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        with torch.no_grad():
            aligned = self.sequence_alignment(out)
            log_w = (aligned[out.chosen] + aligned[out.rejected]).clamp(max=0.0)  # min(1, exp(.)) in log space
            weights = torch.exp(log_w).to(out.seq_logps.dtype)
        metrics = {
            "wpo/weight_mean": Metric(weights.float().sum(), weights.numel()),
            "wpo/weight_min": Metric(weights.float().min() if weights.numel() else 1.0, reduce="min"),
            "wpo/weight_max": Metric(weights.float().max() if weights.numel() else 0.0, reduce="max"),
        }
        return weights, metrics
