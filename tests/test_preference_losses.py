"""Preference losses against hand-computed values (plain ``math``), gradients, and the DPO step-0 identity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_cfg

from tunelab.data.contract import (
    ROLE_CHOSEN,
    ROLE_REJECTED,
    STAT_LOG_SUM_P2,
    STAT_LOGIT_MEAN,
    STAT_MAX_LOGP,
    UNIT_PAIRS,
    ForwardOutputs,
)
from tunelab.losses import build_loss
from tunelab.losses.dpo import DPOLoss
from tunelab.losses.orpo import ORPOLoss
from tunelab.losses.rpo import RPOLoss
from tunelab.losses.simpo import SimPOLoss
from tunelab.losses.wpo import WPOWeighting

# Two pairs: sequences [chosen0, rejected0, chosen1, rejected1], each a list of per-token log-probs.
SEQS = [[-0.5, -1.0, -0.25], [-2.0, -0.75], [-1.5, -0.5], [-0.2, -0.3, -0.4, -0.1]]
REF = [-2.0, -2.5, -1.0, -1.5]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def make_out(seqs=SEQS, ref=REF, stats=None, token_logps=None) -> ForwardOutputs:
    flat = [v for s in seqs for v in s]
    if token_logps is None:
        token_logps = torch.tensor(flat, dtype=torch.float64, requires_grad=True)
    token_seq = torch.tensor([i for i, s in enumerate(seqs) for _ in s])
    n_seq = len(seqs)
    roles = torch.tensor([ROLE_CHOSEN if i % 2 == 0 else ROLE_REJECTED for i in range(n_seq)])
    out = ForwardOutputs(
        token_logps=token_logps,
        token_seq=token_seq,
        token_pos=torch.tensor([k for s in seqs for k in range(len(s))]),
        token_targets=torch.zeros(len(flat), dtype=torch.long),
        seq_logps=token_logps.new_zeros(n_seq).index_add(0, token_seq, token_logps),
        seq_tokens=torch.tensor([float(len(s)) for s in seqs], dtype=torch.float64),
        seq_role=roles,
        chosen=torch.nonzero(roles == ROLE_CHOSEN).flatten(),
        rejected=torch.nonzero(roles == ROLE_REJECTED).flatten(),
        ref_seq_logps=None if ref is None else torch.tensor(ref, dtype=torch.float64),
        token_stats={name: torch.tensor(values, dtype=torch.float64) for name, values in (stats or {}).items()},
    )
    return out


def pairs(seqs=SEQS, ref=REF):
    """Per pair: (sum chosen, sum rejected, len chosen, len rejected, ref chosen, ref rejected)."""
    return [(sum(seqs[2 * i]), sum(seqs[2 * i + 1]), len(seqs[2 * i]), len(seqs[2 * i + 1]),
             ref[2 * i] if ref else 0.0, ref[2 * i + 1] if ref else 0.0) for i in range(len(seqs) // 2)]


def per_pair(loss, out=None) -> list[float]:
    losses, _ = loss.pair_losses(out or make_out())
    return losses.tolist()


def value(t) -> float:
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def metric(metrics, name) -> float:
    m = metrics[name]
    return float(m.value) / m.count


# ---- DPO family -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid(beta):
    expected = [-logsig(beta * ((c - rc) - (r - rr))) for c, r, _, _, rc, rr in pairs()]
    assert per_pair(DPOLoss(beta=beta)) == pytest.approx(expected, abs=1e-12)
    sums, metrics = build_loss({"dpo": {"beta": beta}})(make_out())
    assert value(sums[UNIT_PAIRS]) == pytest.approx(sum(expected), abs=1e-12)
    chosen = [beta * (c - rc) for c, _, _, _, rc, _ in pairs()]
    rejected = [beta * (r - rr) for _, r, _, _, _, rr in pairs()]
    assert metric(metrics, "rewards/chosen") == pytest.approx(sum(chosen) / 2)
    assert metric(metrics, "rewards/rejected") == pytest.approx(sum(rejected) / 2)
    assert metric(metrics, "rewards/margins") == pytest.approx((sum(chosen) - sum(rejected)) / 2)
    assert metric(metrics, "rewards/accuracies") == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 2)
    assert metric(metrics, "logps/chosen") == pytest.approx((sum(SEQS[0]) + sum(SEQS[2])) / 2)
    assert metric(metrics, "logps/rejected") == pytest.approx((sum(SEQS[1]) + sum(SEQS[3])) / 2)
    assert "logits/chosen" not in metrics  # only when the forward computed the logit means
    assert metrics["dpo/loss"].unit == UNIT_PAIRS


def test_dpo_logits_metrics_average_completion_tokens():
    means = [0.1 * k for k in range(sum(map(len, SEQS)))]
    _, metrics = build_loss({"dpo": {}})(make_out(stats={STAT_LOGIT_MEAN: means}))
    chosen_tokens = means[0:3] + means[5:7]
    rejected_tokens = means[3:5] + means[7:11]
    assert metric(metrics, "logits/chosen") == pytest.approx(sum(chosen_tokens) / len(chosen_tokens))
    assert metric(metrics, "logits/rejected") == pytest.approx(sum(rejected_tokens) / len(rejected_tokens))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_label_smoothing(eps):
    beta = 0.2
    expected = []
    for c, r, _, _, rc, rr in pairs():
        z = beta * ((c - rc) - (r - rr))
        expected.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
    assert per_pair(DPOLoss(beta=beta, label_smoothing=eps)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.2, 0.45])
def test_robust_dpo(eps):
    beta = 0.3
    expected = []
    for c, r, _, _, rc, rr in pairs():
        z = beta * ((c - rc) - (r - rr))
        expected.append((-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps))
    assert per_pair(DPOLoss(beta=beta, loss_type="robust", label_smoothing=eps)) == pytest.approx(expected, abs=1e-12)


def test_hinge_is_zero_beyond_the_margin():
    beta = 2.0
    expected = [max(0.0, 1 - beta * ((c - rc) - (r - rr))) for c, r, _, _, rc, rr in pairs()]
    assert 0.0 in expected and any(v > 0 for v in expected)  # the data exercise both sides of the hinge
    assert per_pair(DPOLoss(beta=beta, loss_type="hinge")) == pytest.approx(expected, abs=1e-12)


def test_ipo_uses_length_normalised_log_ratios():
    beta = 0.1
    expected, unnormalised = [], []
    for c, r, lc, lr, rc, rr in pairs():
        h = (c - rc) / lc - (r - rr) / lr
        expected.append((h - 1 / (2 * beta)) ** 2)
        unnormalised.append(((c - rc) - (r - rr) - 1 / (2 * beta)) ** 2)
    got = per_pair(DPOLoss(beta=beta, loss_type="ipo"))
    assert got == pytest.approx(expected, abs=1e-12)
    assert got != pytest.approx(unnormalised, abs=1e-3)
    # rewards stay beta * (sum) log-ratio, as for every DPO loss type
    _, metrics = DPOLoss(beta=beta, loss_type="ipo").pair_losses(make_out())
    ratios = (sum(SEQS[0]) - REF[0]) + (sum(SEQS[2]) - REF[2])
    assert metric(metrics, "rewards/chosen") == pytest.approx(beta * ratios / 2)


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\) for loss_type=robust"),
    ({"loss_type": "sigmoid", "label_smoothing": 0.7}, r"\[0, 0.5\] for loss_type=sigmoid"),
    ({"loss_type": "sigmoid", "label_smoothing": -0.1}, r"\[0, 0.5\]"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "no meaning for loss_type=hinge"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "no meaning for loss_type=ipo"),
    ({"loss_type": "kto"}, "unknown loss_type 'kto'; valid: sigmoid, ipo, robust, hinge"),
    ({"beta": 0.0}, "beta must be > 0"),
])
def test_dpo_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        DPOLoss(**options)


def test_dpo_without_reference_logps_says_so():
    with pytest.raises(RuntimeError, match="reference log-probs"):
        DPOLoss().pair_losses(make_out(ref=None))


def test_unknown_option_names_the_loss():
    with pytest.raises(TypeError, match="bad options for loss 'dpo'"):
        build_loss({"dpo": {"betta": 0.1}})


# ---- SimPO ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta, ratio, eps", [(2.0, 0.5, 0.0), (2.5, 0.55, 0.0), (10.0, 0.3, 0.2)])
def test_simpo_sigmoid_with_gamma(beta, ratio, eps):
    gamma = beta * ratio
    expected = []
    for c, r, lc, lr, _, _ in pairs():
        z = beta * (c / lc - r / lr) - gamma
        expected.append(-(1 - eps) * logsig(z) - eps * logsig(-z))
    loss = SimPOLoss(beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    assert per_pair(loss, make_out(ref=None)) == pytest.approx(expected, abs=1e-12)
    _, metrics = loss.pair_losses(make_out(ref=None))
    avg_c = [c / lc for c, _, lc, _, _, _ in pairs()]
    avg_r = [r / lr for _, r, _, lr, _, _ in pairs()]
    assert metric(metrics, "rewards/chosen") == pytest.approx(beta * sum(avg_c) / 2)  # no gamma in the rewards
    assert metric(metrics, "rewards/rejected") == pytest.approx(beta * sum(avg_r) / 2)
    assert metric(metrics, "logps/chosen") == pytest.approx(sum(avg_c) / 2)  # per-token averages
    assert metric(metrics, "logps/rejected") == pytest.approx(sum(avg_r) / 2)


def test_simpo_hinge_and_gamma_shift():
    beta, ratio = 2.0, 0.8
    expected = [max(0.0, 1 - (beta * (c / lc - r / lr) - beta * ratio)) for c, r, lc, lr, _, _ in pairs()]
    got = per_pair(SimPOLoss(beta=beta, gamma_beta_ratio=ratio, loss_type="hinge"), make_out(ref=None))
    assert got == pytest.approx(expected, abs=1e-12)
    no_margin = per_pair(SimPOLoss(beta=beta, gamma_beta_ratio=0.0, loss_type="hinge"), make_out(ref=None))
    assert sum(no_margin) < sum(got)


def test_simpo_needs_no_reference_and_points_sft_weight_to_ntp():
    assert not SimPOLoss.needs.reference and SimPOLoss.needs.pairs
    with pytest.raises(ValueError, match=r"ntp: \{weight: 0.5\}"):
        SimPOLoss(sft_weight=0.5)
    with pytest.raises(ValueError, match="no meaning for loss_type=hinge"):
        SimPOLoss(loss_type="hinge", label_smoothing=0.1)


# ---- RPO --------------------------------------------------------------------------------------------------

def test_rpo_cumulative_subtracts_eta_beta_sum_logp_chosen():
    beta, eta = 0.1, 0.5
    expected = [-logsig(beta * ((c - rc) - (r - rr))) - eta * beta * c for c, r, _, _, rc, rr in pairs()]
    loss = RPOLoss(beta=beta, eta=eta, variant="cumulative")
    assert per_pair(loss) == pytest.approx(expected, abs=1e-12)
    _, metrics = loss.pair_losses(make_out())
    assert metric(metrics, "rpo/sft") == pytest.approx(-beta * (sum(SEQS[0]) + sum(SEQS[2])) / 2)


def test_rpo_cumulative_with_ipo_uses_the_average_logp_times_beta():
    # The authors' trainer divides every log-prob by its length for IPO before the loss, so the SFT term is
    # -eta * beta * avg logp(y_w). By hand, beta=0.1, eta=0.5:
    # pair 0: h = 0.25/3 + 0.25/2 = 5/24, IPO (5/24 - 5)^2 = 13225/576, SFT 0.1 * 1.75/3 = 7/120
    # pair 1: h = -1.0/2 - 0.5/4 = -0.625, IPO (-5.625)^2 = 31.640625, SFT 0.1 * 2.0/2 = 0.1
    loss = RPOLoss(beta=0.1, eta=0.5, variant="cumulative", loss_type="ipo")
    expected = [13225 / 576 + 0.5 * 7 / 120, 31.640625 + 0.5 * 0.1]
    assert per_pair(loss) == pytest.approx(expected, abs=1e-12)
    _, metrics = loss.pair_losses(make_out())
    assert metric(metrics, "rpo/sft") == pytest.approx((7 / 120 + 0.1) / 2)


def test_rpo_average_adds_eta_mean_nll_per_token_without_beta():
    beta, eta = 0.5, 0.2
    expected = [-logsig(beta * ((c - rc) - (r - rr))) + eta * (-c / lc) for c, r, lc, _, rc, rr in pairs()]
    assert per_pair(RPOLoss(beta=beta, eta=eta, variant="average")) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="unknown rpo variant"):
        RPOLoss(variant="iterative")


# ---- WPO ----------------------------------------------------------------------------------------------------

def wpo_stats():
    """log sum p^2 per token, chosen so pair 0's weight exceeds 1 before the clamp and pair 1's does not."""
    return [-3.0, -2.5, -2.0, -4.0, -3.0, -0.1, -0.2, -0.3, -0.1, -0.2, -0.1]


def test_wpo_weights_clamp_at_one_and_multiply_the_pair_loss():
    stats = wpo_stats()
    flat = [v for s in SEQS for v in s]
    starts = [0, 3, 5, 7]
    aligned = [sum(flat[k] - stats[k] for k in range(st, st + len(s))) / len(s) for st, s in zip(starts, SEQS)]
    raw = [math.exp(aligned[0] + aligned[1]), math.exp(aligned[2] + aligned[3])]
    assert raw[0] > 1 > raw[1]
    weights = [min(1.0, w) for w in raw]

    out = make_out(stats={STAT_LOG_SUM_P2: stats, STAT_LOGIT_MEAN: [0.0] * len(flat)})
    got, metrics = WPOWeighting("sampled")(out)
    assert got.tolist() == pytest.approx(weights, abs=1e-12)
    assert not got.requires_grad
    assert metric(metrics, "wpo/weight_mean") == pytest.approx(sum(weights) / 2)
    low, high = metrics["wpo/weight_min"], metrics["wpo/weight_max"]
    assert float(low.value) == pytest.approx(min(weights)) and low.reduce == "min"
    assert float(high.value) == pytest.approx(1.0) and high.reduce == "max"

    beta, eps = 0.1, 0.1
    dpo = []
    for c, r, _, _, rc, rr in pairs():
        z = beta * ((c - rc) - (r - rr))
        dpo.append(-(1 - eps) * logsig(z) - eps * logsig(-z))  # label smoothing is weighted too
    loss_set = build_loss({"dpo": {"beta": beta, "label_smoothing": eps}}, {"name": "wpo", "alignment": "sampled"})
    assert STAT_LOG_SUM_P2 in loss_set.needs.token_stats
    sums, metrics = loss_set(make_out(stats={STAT_LOG_SUM_P2: stats, STAT_LOGIT_MEAN: [0.0] * len(flat)}))
    assert value(sums[UNIT_PAIRS]) == pytest.approx(sum(w * d for w, d in zip(weights, dpo)), abs=1e-12)
    assert "wpo/weight_mean" in metrics


def test_wpo_greedy_alignment_uses_max_logp():
    flat = [v for s in SEQS for v in s]
    max_logp = [min(-0.05, v + 0.3) for v in flat]  # a max log-prob above each token's log-prob
    starts = [0, 3, 5, 7]
    aligned = [sum(flat[k] - max_logp[k] for k in range(st, st + len(s))) / len(s) for st, s in zip(starts, SEQS)]
    weights = [min(1.0, math.exp(aligned[0] + aligned[1])), min(1.0, math.exp(aligned[2] + aligned[3]))]
    weighting = WPOWeighting("greedy")
    assert weighting.needs.token_stats == frozenset({STAT_MAX_LOGP})
    got, _ = weighting(make_out(stats={STAT_MAX_LOGP: max_logp}))
    assert got.tolist() == pytest.approx(weights, abs=1e-12)
    with pytest.raises(ValueError, match="unknown wpo alignment"):
        WPOWeighting("beam")


def test_wpo_needs_a_pairwise_loss():
    with pytest.raises(ValueError, match="pair_weighting needs a pairwise loss"):
        build_loss({"ntp": {}}, {"name": "wpo"})


# ---- ORPO ---------------------------------------------------------------------------------------------------

def log1mexp(x: float) -> float:
    return math.log(-math.expm1(x))


def test_orpo_odds_ratio_term():
    lam = 0.1
    expected, ratios = [], []
    for c, r, lc, lr, _, _ in pairs():
        a, b = c / lc, r / lr
        ratio = (a - log1mexp(a)) - (b - log1mexp(b))
        ratios.append(ratio)
        expected.append(-lam * logsig(ratio))
    loss = ORPOLoss(**{"lambda": lam})
    assert per_pair(loss, make_out(ref=None)) == pytest.approx(expected, abs=1e-12)
    _, metrics = loss.pair_losses(make_out(ref=None))
    assert metric(metrics, "orpo/log_odds_ratio") == pytest.approx(sum(ratios) / 2)
    assert metric(metrics, "orpo/log_sigmoid_odds_ratio") == pytest.approx(sum(logsig(r) for r in ratios) / 2)
    assert metric(metrics, "rewards/chosen") == pytest.approx(lam * sum(c / lc for c, _, lc, _, _, _ in pairs()) / 2)
    with pytest.raises(TypeError, match="valid: lambda"):
        ORPOLoss(beta=0.1)


@pytest.mark.parametrize("avg_chosen", [-1e-3, -1e-6, -1e-9, -1e-300, 0.0])
def test_orpo_log1mexp_is_stable_near_zero(avg_chosen):
    seqs = [[avg_chosen, avg_chosen], [-2.0, -3.0]]
    out = make_out(seqs=seqs, ref=None)
    losses, metrics = ORPOLoss().pair_losses(out)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(out.token_logps.grad).all()
    b = -2.5
    a = min(avg_chosen, -1e-12)  # P(y_w) = 1 exactly is capped just below 1
    ratio = (avg_chosen - log1mexp(a)) - (b - log1mexp(b))
    assert value(losses[0]) == pytest.approx(-0.1 * logsig(ratio), rel=1e-9, abs=1e-15)
    # a naive log(1 - exp(x)) in float32 loses everything below ~6e-8
    if -1e-7 < avg_chosen < 0:
        naive = torch.log(1 - torch.exp(torch.tensor(avg_chosen, dtype=torch.float32)))
        assert not torch.isfinite(naive) or abs(float(naive) - log1mexp(avg_chosen)) > 1


def test_orpo_recipe_composition_is_nll_plus_lambda_or():
    loss_set = build_loss({"ntp": {}, "orpo": {"lambda": 0.1}})
    sums, _ = loss_set(make_out(ref=None))
    chosen_tokens = SEQS[0] + SEQS[2]
    assert value(sums["target_tokens"]) == pytest.approx(-sum(chosen_tokens))  # core divides by #chosen tokens
    assert value(sums[UNIT_PAIRS]) == pytest.approx(sum(per_pair(ORPOLoss(), make_out(ref=None))))


# ---- gradients ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", [
    DPOLoss(beta=0.3), DPOLoss(beta=0.3, label_smoothing=0.2),
    DPOLoss(beta=0.3, loss_type="robust", label_smoothing=0.2),
    DPOLoss(beta=0.3, loss_type="ipo"), SimPOLoss(beta=2.0, gamma_beta_ratio=0.5),
    SimPOLoss(beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.1), RPOLoss(beta=0.3, eta=0.5, variant="average"),
    ORPOLoss(),
], ids=lambda loss: type(loss).__name__)
def test_gradcheck(loss):
    flat = torch.tensor([v for s in SEQS for v in s], dtype=torch.float64, requires_grad=True)

    def total(token_logps):
        return loss(make_out(token_logps=token_logps)).total

    assert torch.autograd.gradcheck(total, (flat,), eps=1e-6, atol=1e-7)


# ---- DPO at step 0 on a real forward ----------------------------------------------------------------------------

def test_dpo_at_step_zero_with_reference_equal_to_policy_is_log2():
    from tunelab.data.collate import Collator
    from tunelab.data.pipeline import build_datasets
    from tunelab.trainers.forward import CausalLMWithLogProbs
    from tunelab.trainers.models import build_model, build_tokenizer

    cfg = make_cfg(["recipe=dpo", "data.sources.0.num_rows=40"])
    tokenizer = build_tokenizer(cfg.model)
    train, _, _ = build_datasets(cfg.data, tokenizer, "pairs", cfg.seed)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    policy = CausalLMWithLogProbs(model, chunk_size=64)
    reference = CausalLMWithLogProbs(copy.deepcopy(model).eval().requires_grad_(False), chunk_size=64)
    loss_set = build_loss(cfg.loss)
    batch = Collator("pairs", packing=True, shared_prompt=True, row_length=256)([train[i] for i in range(8)])
    with torch.no_grad():
        batch = batch.with_reference(reference(batch, loss_set.needs).seq_logps)
    out = policy(batch, loss_set.needs)
    sums, metrics = loss_set(out)
    assert value(sums[UNIT_PAIRS]) / batch.counts[UNIT_PAIRS] == pytest.approx(math.log(2), abs=1e-6)
    assert metric(metrics, "rewards/accuracies") == 0.0
    assert metric(metrics, "rewards/margins") == pytest.approx(0.0, abs=1e-6)
    assert "logits/chosen" in metrics
    sums[UNIT_PAIRS].backward()  # and the gradient is that of log sigmoid at 0: nonzero
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
