"""CPO against hand-computed values, finite-difference gradients and TRL 1.16's ``CPOTrainer.cpo_loss``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_preference_losses import SEQS, logsig, make_out, pairs, per_pair

from tunelab.data.contract import UNIT_PAIRS, UNIT_TARGET_TOKENS
from tunelab.losses import build_loss
from tunelab.losses.cpo import CPOLoss


def expected(loss_type: str, beta: float, eps: float = 0.0) -> list[float]:
    out = []
    for w, l_, nw, nl, _, _ in pairs(ref=None):
        if loss_type == "ipo":
            out.append((w / nw - l_ / nl - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - beta * (w - l_)))
        else:
            out.append(-(1 - eps) * logsig(beta * (w - l_)) - eps * logsig(-beta * (w - l_)))
    return out


@pytest.mark.parametrize("loss_type, beta, eps", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.1), ("hinge", 0.5, 0.0), ("hinge", 2.0, 0.0), ("ipo", 0.5, 0.0),
])
def test_cpo_matches_hand_computation_without_a_reference(loss_type, beta, eps):
    loss = CPOLoss(beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert not loss.needs.reference
    assert per_pair(loss, make_out(ref=None)) == pytest.approx(expected(loss_type, beta, eps), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_cpo_gradients_match_finite_differences(loss_type):
    loss = CPOLoss(beta=0.3, loss_type=loss_type)
    flat = torch.tensor([v for s in SEQS for v in s], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss.pair_losses(make_out(ref=None, token_logps=x))[0].sum(), (flat,))


@pytest.mark.parametrize("loss_type, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("hinge", 0.5, 0.0),
                                                  ("ipo", 0.5, 0.0)])
def test_cpo_equals_trls_cpo_loss(loss_type, beta, eps):
    """TRL's formula on the same per-sequence log-probs (averages for ipo, as TRL's forward computes them)."""
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    out = make_out(ref=None)
    logps = out.seq_avg_logps if loss_type == "ipo" else out.seq_logps
    trl_self = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=eps, loss_type=loss_type, simpo_gamma=0.5,
                               accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected = cpo_trainer.CPOTrainer.cpo_loss(
        trl_self, logps[out.chosen].detach(), logps[out.rejected].detach())
    losses, metrics = CPOLoss(beta=beta, loss_type=loss_type, label_smoothing=eps).pair_losses(out)
    torch.testing.assert_close(losses.detach(), trl_losses, rtol=1e-12, atol=1e-12)
    assert float(metrics["rewards/chosen"].value) / 2 == pytest.approx(float(trl_chosen.mean()))
    assert float(metrics["rewards/rejected"].value) / 2 == pytest.approx(float(trl_rejected.mean()))


def test_cpo_with_its_behaviour_cloning_term():
    sums, _ = build_loss({"cpo": {"beta": 0.1}, "ntp": {"weight": 1.0}})(make_out(ref=None))
    assert float(sums[UNIT_PAIRS].detach()) == pytest.approx(sum(expected("sigmoid", 0.1)))
    assert float(sums[UNIT_TARGET_TOKENS].detach()) == pytest.approx(-sum(SEQS[0]) - sum(SEQS[2]))


def test_cpo_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown cpo loss_type 'robust'"):
        CPOLoss(loss_type="robust")
    with pytest.raises(ValueError, match="no meaning for loss_type=ipo"):
        CPOLoss(loss_type="ipo", label_smoothing=0.1)
