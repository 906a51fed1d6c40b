"""DPO and its family of pairwise losses on policy/reference log-ratios (docs/methods_preference.md, `dpo`).

With sum log-probs over response tokens and the frozen reference's log-probs (no gradient), the log-ratios
``c = log pi(y_w) - log ref(y_w)`` and ``r = log pi(y_l) - log ref(y_l)``, ``Delta = c - r``, and per pair (the
core averages over the pairs of the optimizer step):

- ``sigmoid`` (Rafailov et al. 2023, arXiv 2305.18290), with label smoothing eps giving conservative DPO
  (cDPO, Mitchell 2023):  -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta),  eps in [0, 0.5].
- ``robust`` (Chowdhury et al. 2024, arXiv 2403.00409), an unbiased loss under label noise of rate eps:
  [-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps),  eps in [0, 0.5).
- ``hinge`` (SLiC-style; Zhao et al. 2023, arXiv 2305.10425):  max(0, 1 - beta Delta).
- ``ipo`` (Azar et al. 2023, arXiv 2310.12036, Eq. 17 with tau = beta):  (h - 1/(2 beta))^2, where h is the
  *length-normalised* difference of log-ratios: h = c / |y_w| - r / |y_l|. TRL's DPOTrainer (1.16) normalises
  the same way; the paper's equation has sequence-level log-ratios, and the per-token form is the one the IPO
  authors confirmed to TRL.
- ``sigmoid_norm``: -log sigma(beta h), DPO on the same length-normalised h (TRL 1.16's name).
- ``exo_pair`` (EXO, Ji et al. 2024, arXiv 2402.00856, Eq. 16 with K = 2): the reverse KL between
  q = softmax(beta [c, r]) and the smoothed label p = [1 - eps, eps]:
  q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),  q_w = sigma(beta Delta); needs eps in (0, 0.5]
  (the paper uses 1e-3).
- ``nca_pair`` (NCA, Chen et al. 2024, arXiv 2402.05369):
  -log sigma(beta c) - 1/2 log sigma(-beta c) - 1/2 log sigma(-beta r).
- ``bco_pair`` (BCO, Jung et al. 2024, arXiv 2404.04656):  -log sigma(beta c - delta) - log sigma(-(beta r - delta)),
  delta the running mean of the rewards beta c and beta r (the paper's reward shift; TRL's RunningMoments until it
  dropped the shift). Here delta for optimizer step t is the mean over the applied steps before t of each step's
  mean reward over all its pairs (both responses), reduced over micro-batches and ranks: 0 at the first step, and
  independent of how a step is split. TRL updated it with each micro-batch's mean before using it, so its delta
  included the current micro-batch. delta is part of every checkpoint (``stateful``); ``bco_running_shift: false``
  gives delta = 0, TRL 1.16's bco_pair.
- ``sppo_hard`` (SPPO, Wu et al. 2024, arXiv 2405.00675, with hard win probabilities 1 / 0):
  (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2.
- ``aot`` / ``aot_unpaired`` (AOT, Melnyk et al. 2024, arXiv 2406.05882): the sigmoid (with eps) loss on the
  *sorted* quantities of the micro-batch: ``aot`` sorts the policy's log-prob margins log pi(y_w) - log pi(y_l)
  and the reference's separately and pairs them by rank; ``aot_unpaired`` sorts c and r separately. The sort
  runs over one micro-batch's pairs (as TRL sorts per device batch), so it depends on the micro-batch size.
- ``apo_zero`` / ``apo_down`` (APO, D'Oosterlinck et al. 2024, arXiv 2408.06266, Eqs. 7 and 8):
  zero: [1 - sigma(beta c)] + sigma(beta r);  down: sigma(beta c) + [1 - sigma(beta (c - r))].
- ``discopop`` (DiscoPOP, Chris Lu et al. 2024, arXiv 2406.08414, Eq. 5): with z = beta Delta and
  m = sigma(z / tau):  (1 - m) (-log sigma(z)) + m exp(-z),  tau = ``discopop_tau`` (paper: 0.05).

f-divergence DPO (Wang et al. 2024, arXiv 2309.16240, ``f_divergence``): the log-ratios entering Delta (and h)
are replaced by f'(pi/ref): ``reverse_kl`` (default, DPO), ``forward_kl`` 1 - exp(-c), ``js_divergence``
log 2 + log sigma(c), ``alpha_divergence`` (exp((alpha - 1) c) - 1) / (alpha - 1) with ``f_alpha``
(default 0.5; the exponent is clamped at 80 as TRL does). Only the losses built on Delta accept it (the others
keep an unmatched log-partition term): sigmoid, sigmoid_norm, robust, hinge, ipo, exo_pair, discopop.

Label smoothing applies to sigmoid, robust, exo_pair, aot and aot_unpaired; asking for it with another loss type
is an error rather than silently ignored. Implicit rewards (logged, detached) are beta * (log pi - log ref) with
sum log-probs, for every loss type (as TRL logs them). ``logps/*`` are sum log-probs. Several loss types mix
with weights (MPO) by composing terms: see losses/compose.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.data.contract import STAT_LOGIT_MEAN, ForwardOutputs, Needs
from tunelab.losses.base import Metric, PairwiseLoss, mean_metric, preference_metrics
from tunelab.losses.registry import register_loss


@dataclass
class PairTerms:
    """What the loss types are written in, per pair (gradient through the policy's log-probs only)."""

    chosen_ratio: torch.Tensor  # c = log pi(y_w) - log ref(y_w)
    rejected_ratio: torch.Tensor  # r
    chosen_score: torch.Tensor  # f'(pi/ref) of the chosen response (= c for reverse KL)
    rejected_score: torch.Tensor
    chosen_len: torch.Tensor  # response tokens (float, >= 1)
    rejected_len: torch.Tensor
    policy_margin: torch.Tensor  # log pi(y_w) - log pi(y_l)
    reference_margin: torch.Tensor  # log ref(y_w) - log ref(y_l)


def smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _delta(t: PairTerms) -> torch.Tensor:
    return t.chosen_score - t.rejected_score


def _normalised_delta(t: PairTerms) -> torch.Tensor:
    return t.chosen_score / t.chosen_len - t.rejected_score / t.rejected_len


def _exo(t: PairTerms, beta: float, eps: float) -> torch.Tensor:
    z = beta * _delta(t)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _discopop(t: PairTerms, beta: float, tau: float) -> torch.Tensor:
    z = beta * _delta(t)
    modulation = torch.sigmoid(z / tau)
    return (1.0 - modulation) * -F.logsigmoid(z) + modulation * torch.exp(-z)


def _robust(z: torch.Tensor, eps: float) -> torch.Tensor:
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def _sorted_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sort(a).values - torch.sort(b).values


# loss_type -> per-pair loss of (terms, the DPOLoss with its options)
LOSS_TYPES = {
    "sigmoid": lambda t, o: smoothed_sigmoid(o.beta * _delta(t), o.label_smoothing),
    "ipo": lambda t, o: (_normalised_delta(t) - 1.0 / (2.0 * o.beta)) ** 2,
    "robust": lambda t, o: _robust(o.beta * _delta(t), o.label_smoothing),
    "hinge": lambda t, o: torch.relu(1.0 - o.beta * _delta(t)),
    "sigmoid_norm": lambda t, o: -F.logsigmoid(o.beta * _normalised_delta(t)),
    "exo_pair": lambda t, o: _exo(t, o.beta, o.label_smoothing),
    "nca_pair": lambda t, o: (-F.logsigmoid(o.beta * t.chosen_ratio) - 0.5 * F.logsigmoid(-o.beta * t.chosen_ratio)
                              - 0.5 * F.logsigmoid(-o.beta * t.rejected_ratio)),
    "bco_pair": lambda t, o: (-F.logsigmoid(o.beta * t.chosen_ratio - o.reward_shift)
                              - F.logsigmoid(-(o.beta * t.rejected_ratio - o.reward_shift))),
    "sppo_hard": lambda t, o: (t.chosen_ratio - 0.5 / o.beta) ** 2 + (t.rejected_ratio + 0.5 / o.beta) ** 2,
    "aot": lambda t, o: smoothed_sigmoid(
        o.beta * _sorted_difference(t.policy_margin, t.reference_margin), o.label_smoothing),
    "aot_unpaired": lambda t, o: smoothed_sigmoid(
        o.beta * _sorted_difference(t.chosen_ratio, t.rejected_ratio), o.label_smoothing),
    "apo_zero": lambda t, o: (1.0 - torch.sigmoid(o.beta * t.chosen_ratio)) + torch.sigmoid(o.beta * t.rejected_ratio),
    "apo_down": lambda t, o: (torch.sigmoid(o.beta * t.chosen_ratio)
                              + 1.0 - torch.sigmoid(o.beta * (t.chosen_ratio - t.rejected_ratio))),
    "discopop": lambda t, o: _discopop(t, o.beta, o.discopop_tau),
}
SMOOTHED = {"sigmoid": (0.0, 0.5, True), "robust": (0.0, 0.5, False), "exo_pair": (0.0, 0.5, True),
            "aot": (0.0, 0.5, True), "aot_unpaired": (0.0, 0.5, True)}  # (low, high, high included)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "robust", "hinge", "ipo", "exo_pair", "discopop")
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")  # per-pair weights would be misaligned by the sort


def check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"{name} must be > 0, got {beta}")
    return beta


def check_label_smoothing(eps: float, loss_type: str) -> float:
    eps = float(eps)
    if loss_type not in SMOOTHED:
        if eps != 0.0:
            raise ValueError(f"label_smoothing has no meaning for loss_type={loss_type}; it applies to "
                             f"{', '.join(SMOOTHED)}")
        return eps
    low, high, high_included = SMOOTHED[loss_type]
    if loss_type == "exo_pair" and not 0.0 < eps <= 0.5:
        raise ValueError(f"loss_type=exo_pair needs label_smoothing in (0, 0.5] (the EXO paper uses 1e-3), got {eps}")
    if not (low <= eps <= high if high_included else low <= eps < high):
        interval = f"[{low:g}, {high:g}]" if high_included else f"[{low:g}, {high:g})"
        raise ValueError(f"label_smoothing must lie in {interval} for loss_type={loss_type}, got {eps}")
    return eps


def f_divergence_scores(ratios: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """f'(pi/ref) as a function of the log-ratio, for the f-divergence regularisers of f-DPO."""
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return ratios
    if divergence == "forward_kl":
        return 1.0 - torch.exp(-ratios)
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(ratios)
    wide = torch.promote_types(ratios.dtype, torch.float32)  # exp of a half-precision log-ratio overflows
    exponent = ((alpha - 1.0) * ratios.to(wide)).clamp(max=80.0)
    return ((torch.exp(exponent) - 1.0) / (alpha - 1.0)).to(ratios.dtype)


def reference_logps(out: ForwardOutputs) -> torch.Tensor:
    if out.ref_seq_logps is None:
        raise RuntimeError("this loss needs reference log-probs but the batch has none (reference.strategy?)")
    return out.ref_seq_logps.to(out.seq_logps.dtype)


@register_loss("dpo")
class DPOLoss(PairwiseLoss):
    """DPO and its pairwise family on policy/reference log-ratios (docs/methods_preference.md, `dpo`).

    Options:
    - ``beta``: strength of the implicit KL constraint; 0.1 is the DPO paper's and TRL's default.
    - ``loss_type``: sigmoid (DPO) | robust | hinge | ipo | sigmoid_norm | exo_pair | nca_pair | bco_pair |
      sppo_hard | aot | aot_unpaired | apo_zero | apo_down | discopop (formulas in this module's docstring).
    - ``label_smoothing``: eps, the assumed rate of flipped labels (cDPO, robust DPO, EXO, AOT); 0 = none.
    - ``f_divergence``: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence (Wang et al. 2024).
    - ``f_alpha``: alpha of alpha_divergence; 0.5 is TRL's default.
    - ``discopop_tau``: DiscoPOP's temperature; the paper's 0.05.
    - ``bco_running_shift``: bco_pair only: subtract the running mean reward delta (the BCO paper); false = TRL 1.16.
    - ``ld_alpha``: LD-DPO's weight of the tokens past the shorter response of a pair, in [0, 1]: every log-prob
      (policy and reference) becomes prefix + ld_alpha * rest; null = off (plain sums), 1 = the same, 0 = prefix only.
    """
    needs = Needs(pairs=True, reference=True, token_stats=frozenset({STAT_LOGIT_MEAN}))

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 f_divergence: str = "reverse_kl", f_alpha: float = 0.5, discopop_tau: float = 0.05,
                 bco_running_shift: bool = True, ld_alpha: float | None = None):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if f_divergence not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence {f_divergence!r}; valid: {', '.join(F_DIVERGENCES)}")
        if f_divergence != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(f"f_divergence={f_divergence} applies only to loss types built on the reward "
                             f"difference ({', '.join(F_DIVERGENCE_LOSS_TYPES)}), not {loss_type}")
        self.beta = check_beta(beta)
        self.loss_type = loss_type
        self.label_smoothing = check_label_smoothing(label_smoothing, loss_type)
        self.f_divergence, self.f_alpha = f_divergence, float(f_alpha)
        self.discopop_tau = check_beta(discopop_tau, "discopop_tau")
        self.stateful = loss_type == "bco_pair" and bool(bco_running_shift)
        if ld_alpha is not None and not 0.0 <= float(ld_alpha) <= 1.0:
            raise ValueError(f"dpo ld_alpha must lie in [0, 1] (or be null), got {ld_alpha}")
        self.ld_alpha = None if ld_alpha is None else float(ld_alpha)
        if self.ld_alpha is not None:  # the reference's common-prefix log-probs as well
            self.needs = self.needs | Needs(reference_prefix=True)
        self.reward_shift, self.shift_steps = 0.0, 0  # BCO's delta and the applied steps averaged into it

    def sequence_logps(self, out: ForwardOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """[S] policy and reference log-probs: sums, or with ``ld_alpha`` LD-DPO's prefix + alpha * rest, which is
        alpha * sum + (1 - alpha) * prefix."""
        ref = reference_logps(out)
        if self.ld_alpha is None:
            return out.seq_logps, ref
        if out.ref_seq_prefix_logps is None:
            raise RuntimeError("ld_alpha needs the reference's common-prefix log-probs but the batch has none")
        a = self.ld_alpha
        return (a * out.seq_logps + (1.0 - a) * out.seq_prefix_logps,
                a * ref + (1.0 - a) * out.ref_seq_prefix_logps.to(ref.dtype))

    def pair_terms(self, out: ForwardOutputs) -> PairTerms:
        logps, ref = self.sequence_logps(out)
        ratios = logps - ref  # [S] log pi - log ref, with gradient through log pi only
        scores = f_divergence_scores(ratios, self.f_divergence, self.f_alpha)
        lengths = out.seq_tokens.clamp(min=1)
        w, l = out.chosen, out.rejected  # noqa: E741
        return PairTerms(ratios[w], ratios[l], scores[w], scores[l], lengths[w], lengths[l],
                         logps[w] - logps[l], ref[w] - ref[l])

    def preference_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        """The DPO-family loss of each pair and the rewards/logps/logits metrics."""
        if self.loss_type in SORTING_LOSS_TYPES and out.pair_weights is not None:
            raise ValueError(f"loss_type={self.loss_type} sorts the pairs of a batch, so per-pair weights "
                             "(pair_weighting) cannot be applied to it")
        terms = self.pair_terms(out)
        losses = LOSS_TYPES[self.loss_type](terms, self)
        chosen_rewards = self.beta * terms.chosen_ratio.detach()
        rejected_rewards = self.beta * terms.rejected_ratio.detach()
        metrics = preference_metrics(out, chosen_rewards, rejected_rewards, average_logps=False,
                                     logps=self.sequence_logps(out)[0].detach() if self.ld_alpha is not None else None)
        if self.stateful:
            metrics["reward_mean"] = mean_metric(torch.cat([chosen_rewards, rejected_rewards]))
            metrics["reward_shift"] = Metric(self.reward_shift)
        return losses, metrics

    def after_step(self, step_metrics: dict[str, float]) -> None:
        """BCO: fold the applied step's mean reward into the running mean delta."""
        self.shift_steps += 1
        self.reward_shift += (step_metrics["reward_mean"] - self.reward_shift) / self.shift_steps

    def state_dict(self) -> dict:
        return {"reward_shift": self.reward_shift, "shift_steps": self.shift_steps}

    def load_state_dict(self, state: dict) -> None:
        self.reward_shift, self.shift_steps = float(state["reward_shift"]), int(state["shift_steps"])

    def pair_losses(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        return self.preference_losses(out)
