"""Next-token prediction (SFT): token-mean negative log-likelihood over response tokens.

L = -(1/|T|) sum_{t in T} log p(y_t | x, y_<t), with T every labelled token of the step (prompt and padding
carry no label). The mean is over all labelled tokens of the optimizer step, across micro-batches and ranks
(docs/methods.md (NTP / SFT)), which the core arranges from the unit ``target_tokens``.

In a preference batch the same term trains on the chosen responses only, which gives "DPO + NLL" (Iterative
RPO, Pang et al. 2024, arXiv 2404.19733; TRL's ``rpo_alpha``) and ORPO's SFT term by composition.
"""

from tunelab.data.contract import UNIT_TARGET_TOKENS
from tunelab.losses.base import Loss, LossOutput, mean_metric
from tunelab.losses.registry import register_loss


@register_loss("ntp")
class NTPLoss(Loss):
    """Token-mean NLL over the step's labelled tokens (SFT; the chosen responses in a preference batch).

    Options: none (``weight`` scales the term in a composed loss).
    """
    def __call__(self, out):
        mask = out.nll_mask
        nll = -out.token_logps[mask]
        return LossOutput(nll.sum(), UNIT_TARGET_TOKENS, {"nll": mean_metric(nll)})
