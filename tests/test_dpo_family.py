"""The DPO family's loss types, f-divergences and MPO-style mixing against hand-computed values (plain ``math``),
with gradients checked numerically. Parity with TRL on a real model is in tests/test_trl_parity.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_preference_losses import REF, SEQS, logsig, make_out, pairs, per_pair

from tunelab.data.contract import UNIT_PAIRS, UNIT_TARGET_TOKENS
from tunelab.losses import build_loss
from tunelab.losses.dpo import DPOLoss


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ratios():
    """Per pair: (c, r, |y_w|, |y_l|, policy margin, reference margin) from the shared two-pair fixture."""
    return [(cw - rw, cl - rl, nw, nl, cw - cl, rw - rl) for cw, cl, nw, nl, rw, rl in pairs()]


def pair_value(loss_type: str, c: float, r: float, nw: int, nl: int, beta: float, eps: float, tau: float) -> float:
    z = beta * (c - r)
    if loss_type == "sigmoid_norm":
        return -logsig(beta * (c / nw - r / nl))
    if loss_type == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if loss_type == "nca_pair":
        return -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
    if loss_type == "bco_pair":
        return -logsig(beta * c) - logsig(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sig(beta * c)) + sig(beta * r)
    if loss_type == "apo_down":
        return sig(beta * c) + 1 - sig(beta * (c - r))
    assert loss_type == "discopop"
    return (1 - sig(z / tau)) * -logsig(z) + sig(z / tau) * math.exp(-z)


def expected(loss_type: str, beta: float, eps: float = 0.0, tau: float = 0.05) -> list[float]:
    rows = ratios()
    if loss_type in ("aot", "aot_unpaired"):
        first = sorted(p[4] if loss_type == "aot" else p[0] for p in rows)
        second = sorted(p[5] if loss_type == "aot" else p[1] for p in rows)
        return [-(1 - eps) * logsig(beta * (a - b)) - eps * logsig(-beta * (a - b)) for a, b in zip(first, second)]
    return [pair_value(loss_type, c, r, nw, nl, beta, eps, tau) for c, r, nw, nl, _, _ in rows]


@pytest.mark.parametrize("loss_type, beta, eps", [
    ("sigmoid_norm", 0.5, 0.0), ("exo_pair", 0.5, 1e-3), ("exo_pair", 0.1, 0.2), ("nca_pair", 0.5, 0.0),
    ("bco_pair", 0.5, 0.0), ("sppo_hard", 0.5, 0.0), ("sppo_hard", 2.0, 0.0), ("aot", 0.5, 0.0),
    ("aot", 0.5, 0.1), ("aot_unpaired", 0.5, 0.1), ("apo_zero", 0.5, 0.0), ("apo_down", 0.5, 0.0),
    ("discopop", 0.5, 0.0), ("discopop", 0.05, 0.0),
])
def test_loss_types_match_hand_computation(loss_type, beta, eps):
    loss = DPOLoss(beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert per_pair(loss) == pytest.approx(expected(loss_type, beta, eps), rel=1e-12, abs=1e-12)


def test_bco_shift_is_a_running_mean_of_step_rewards_subtracted_from_both_rewards():
    loss = DPOLoss(beta=0.5, loss_type="bco_pair")
    assert loss.stateful and per_pair(loss) == pytest.approx(expected("bco_pair", 0.5), rel=1e-12)  # delta 0 at first
    loss.after_step({"reward_mean": 0.3})
    loss.after_step({"reward_mean": -0.1})
    delta = (0.3 - 0.1) / 2
    assert loss.state_dict() == {"reward_shift": pytest.approx(delta), "shift_steps": 2}
    want = [-logsig(0.5 * c - delta) - logsig(-(0.5 * r - delta)) for c, r, *_ in ratios()]
    assert per_pair(loss) == pytest.approx(want, rel=1e-12)
    fresh = DPOLoss(beta=0.5, loss_type="bco_pair")
    fresh.load_state_dict(loss.state_dict())
    assert per_pair(fresh) == pytest.approx(want, rel=1e-12)
    assert not DPOLoss(beta=0.5, loss_type="bco_pair", bco_running_shift=False).stateful
    flat = torch.tensor([v for s in SEQS for v in s], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss.pair_losses(make_out(token_logps=x))[0].sum(), (flat,))
    assert not DPOLoss(beta=0.5).stateful


def test_aot_sorts_where_the_pairs_disagree():
    """The fixture's two pairs rank differently by policy and by reference margin, so AOT differs from DPO."""
    rows = ratios()
    assert sorted(range(2), key=lambda i: rows[i][4]) != sorted(range(2), key=lambda i: rows[i][5])
    assert per_pair(DPOLoss(beta=0.5, loss_type="aot")) != pytest.approx(per_pair(DPOLoss(beta=0.5)))


@pytest.mark.parametrize("divergence, f", [
    ("forward_kl", lambda u, a: 1 - math.exp(-u)),
    ("js_divergence", lambda u, a: math.log(2) + logsig(u)),
    ("alpha_divergence", lambda u, a: (math.exp((a - 1) * u) - 1) / (a - 1)),
])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_f_divergences_replace_the_log_ratios(divergence, f, loss_type):
    beta, alpha = 0.5, 0.3
    loss = DPOLoss(beta=beta, loss_type=loss_type, f_divergence=divergence, f_alpha=alpha)
    want = []
    for c, r, nw, nl, _, _ in ratios():
        sc, sr = f(c, alpha), f(r, alpha)
        want.append({"sigmoid": -logsig(beta * (sc - sr)), "hinge": max(0.0, 1 - beta * (sc - sr)),
                     "ipo": (sc / nw - sr / nl - 1 / (2 * beta)) ** 2}[loss_type])
    assert per_pair(loss) == pytest.approx(want, rel=1e-12)


def test_alpha_divergence_at_one_is_dpo():
    plain = per_pair(DPOLoss(beta=0.5))
    assert per_pair(DPOLoss(beta=0.5, f_divergence="alpha_divergence", f_alpha=1.0)) == pytest.approx(plain)


@pytest.mark.parametrize("options", [
    {"loss_type": t} for t in ("sigmoid_norm", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                               "apo_zero", "apo_down", "discopop")
] + [{"loss_type": "exo_pair", "label_smoothing": 0.01}, {"loss_type": "ipo", "f_divergence": "js_divergence"},
     {"loss_type": "sigmoid", "f_divergence": "alpha_divergence", "f_alpha": 0.3}])
def test_gradients_match_finite_differences(options):
    loss = DPOLoss(beta=0.7, **options)
    flat = torch.tensor([v for s in SEQS for v in s], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss.pair_losses(make_out(token_logps=x))[0].sum(), (flat,))


REF_PREFIX = [-1.0, -0.5, -2.0, -1.5]  # reference log-probs of each pair's common prefix (any values do)


def ld_out(token_logps=None):
    return dataclasses.replace(make_out(token_logps=token_logps),
                               ref_seq_prefix_logps=torch.tensor(REF_PREFIX, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_ld_dpo_reweights_the_tokens_past_the_shorter_response_by_hand(alpha):
    """Per sequence: the sum of its first min(|y_w|, |y_l|) tokens plus alpha times the rest, for policy and
    reference alike (the reference's full and prefix sums given), then the sigmoid loss."""
    loss = DPOLoss(beta=0.5, ld_alpha=alpha)
    assert loss.needs.reference_prefix and not DPOLoss(beta=0.5).needs.reference_prefix
    want = []
    for p in range(len(SEQS) // 2):
        w, l = SEQS[2 * p], SEQS[2 * p + 1]  # noqa: E741
        k = min(len(w), len(l))
        policy = [sum(s[:k]) + alpha * sum(s[k:]) for s in (w, l)]
        ref = [REF_PREFIX[2 * p + i] + alpha * (REF[2 * p + i] - REF_PREFIX[2 * p + i]) for i in range(2)]
        want.append(-logsig(0.5 * ((policy[0] - ref[0]) - (policy[1] - ref[1]))))
    got, _ = loss.pair_losses(ld_out())
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    assert len({len(s) for s in SEQS}) > 1  # the fixture has tails to reweight


def test_ld_dpo_gradients_match_finite_differences():
    loss = DPOLoss(beta=0.7, ld_alpha=0.3)
    flat = torch.tensor([v for s in SEQS for v in s], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss.pair_losses(ld_out(token_logps=x))[0].sum(), (flat,))


@pytest.mark.parametrize("options, message", [
    ({"loss_type": "exo_pair"}, r"exo_pair needs label_smoothing in \(0, 0.5\]"),
    ({"loss_type": "nca_pair", "label_smoothing": 0.1}, "no meaning for loss_type=nca_pair"),
    ({"loss_type": "aot", "label_smoothing": 0.6}, r"\[0, 0.5\] for loss_type=aot"),
    ({"loss_type": "bco_pair", "f_divergence": "forward_kl"}, "applies only to loss types built on"),
    ({"f_divergence": "kl"}, "unknown f_divergence 'kl'"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau must be > 0"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        DPOLoss(**options)


def test_sorting_losses_refuse_pair_weights():
    out = make_out().with_pair_weights(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="sorts the pairs"):
        DPOLoss(loss_type="aot").pair_losses(out)


def test_mpo_mixes_loss_types_of_one_loss_by_label():
    """MPO-style: 0.8 sigmoid + 0.2 bco_pair + 1.0 NLL, the second DPO term named by its ``type``."""
    loss_set = build_loss({"dpo": {"beta": 0.5, "weight": 0.8},
                           "bco": {"type": "dpo", "loss_type": "bco_pair", "beta": 0.5, "weight": 0.2},
                           "ntp": {"weight": 1.0}})
    sums, metrics = loss_set(make_out())
    sigmoid = [-logsig(0.5 * (c - r)) for c, r, *_ in ratios()]
    assert float(sums[UNIT_PAIRS].detach()) == pytest.approx(0.8 * sum(sigmoid) + 0.2 * sum(expected("bco_pair", 0.5)))
    assert float(sums[UNIT_TARGET_TOKENS].detach()) == pytest.approx(-sum(SEQS[0]) - sum(SEQS[2]))
    assert "bco/loss" in metrics and "dpo/loss" in metrics
