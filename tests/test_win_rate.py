"""Win rate, its interval and the length-controlled win rate on hand-checkable and synthetic judges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tunelab.trainers.win_rate import (
    fit_preference_glm,
    length_controlled_win_rate,
    length_features,
    preferences_from_rewards,
    win_rate,
)


def test_preferences_from_rewards_hard_and_soft():
    hard = preferences_from_rewards([2.0, 0.0, 1.0], [1.0, 1.0, 1.0])
    assert hard.tolist() == [1.0, 0.0, 0.5]
    soft = preferences_from_rewards([2.0], [1.0], soft=True)
    assert soft[0] == pytest.approx(1.0 / (1.0 + math.exp(-1.0)), abs=1e-12)


def test_win_rate_interval_by_hand():
    result = win_rate([1.0, 1.0, 1.0, 0.0])
    # mean 0.75, sample std 0.5, standard error 0.25; upper end clipped at 1
    assert result.value == 0.75
    assert result.standard_error == pytest.approx(0.25)
    assert result.low == pytest.approx(0.75 - 1.959964 * 0.25, abs=1e-6)
    assert result.high == 1.0


def test_win_rate_interval_covers_true_rate_at_its_level():
    rng = np.random.default_rng(1)
    covered = [
        (r := win_rate(rng.binomial(1, 0.6, size=200).astype(float))).low <= 0.6 <= r.high for _ in range(400)
    ]
    # 95% nominal; 400 repetitions give a binomial standard error of ~1.1 points
    assert 0.92 <= np.mean(covered) <= 0.98


def test_length_features_scaled_not_centred():
    feature = length_features([3.0, 5.0, 10.0], [1.0, 1.0, 1.0])
    delta = np.array([2.0, 4.0, 9.0])
    assert feature == pytest.approx(np.tanh(delta / delta.std(ddof=1)))
    assert length_features([5.0, 6.0], [1.0, 2.0]).tolist() == [0.0, 0.0]


def test_equal_lengths_give_the_raw_win_rate():
    # no length signal: the model term is logit(mean preference), so the LC win rate is the raw one, 3/4
    prefs = [1.0, 1.0, 1.0, 0.0]
    result = length_controlled_win_rate(prefs, [10] * 4, [10] * 4, l2=0.0, bootstrap=0)
    assert result.value == pytest.approx(0.75, abs=1e-10)
    assert result.weights["model"] == pytest.approx(math.log(3.0), abs=1e-10)


def test_baseline_against_itself_is_one_half():
    lengths = [5, 9, 14, 20]
    result = length_controlled_win_rate([0.5] * 4, lengths, lengths, l2=0.0, bootstrap=0)
    assert result.value == pytest.approx(0.5, abs=1e-12)


def _length_biased_judge(n, quality, seed):
    rng = np.random.default_rng(seed)
    baseline = rng.integers(100, 300, size=n).astype(float)
    model = baseline + rng.uniform(-100, 400, size=n)
    feature = length_features(model, baseline)
    return model, baseline, 1.0 / (1.0 + np.exp(-(3.0 * feature + quality)))


def test_length_biased_judge_has_lc_one_half():
    # the judge prefers the longer answer only; the model's answers are longer on most prompts
    model, baseline, prefs = _length_biased_judge(400, quality=0.0, seed=0)
    raw = win_rate(prefs).value
    result = length_controlled_win_rate(prefs, model, baseline, bootstrap=50)
    assert raw > 0.75
    # soft targets from the GLM's own family: the fit recovers the judge up to the small L2 shrinkage (1e-2 on a
    # summed loss over 400 prompts), which moves the model term by well under 0.01
    assert result.value == pytest.approx(0.5, abs=5e-3)
    assert result.weights["length"] == pytest.approx(3.0, abs=0.05)
    assert result.low <= 0.5 <= result.high


def test_length_biased_judge_with_sampled_verdicts():
    model, baseline, probs = _length_biased_judge(4000, quality=0.0, seed=2)
    verdicts = np.random.default_rng(3).binomial(1, probs).astype(float)
    result = length_controlled_win_rate(verdicts, model, baseline, bootstrap=0)
    assert win_rate(verdicts).value > 0.75
    # 4000 binary verdicts: the model term's standard error is ~0.05 in logit, ~0.013 in rate; 0.04 is three of them
    assert result.value == pytest.approx(0.5, abs=0.04)


def test_quality_survives_length_control():
    # a real quality edge of 1 logit plus the length bias: LC recovers sigmoid(1), the raw rate overstates it
    model, baseline, prefs = _length_biased_judge(400, quality=1.0, seed=4)
    result = length_controlled_win_rate(prefs, model, baseline, bootstrap=0)
    assert result.value == pytest.approx(1.0 / (1.0 + math.exp(-1.0)), abs=5e-3)
    assert win_rate(prefs).value > result.value + 0.1


def test_glm_matches_an_independent_lbfgs_fit():
    rng = np.random.default_rng(5)
    n = 60
    prefs = rng.uniform(0, 1, size=n)
    feature = np.tanh(rng.normal(size=n))
    difficulty = rng.normal(size=n)
    ours = fit_preference_glm(prefs, feature, difficulty, l2=0.3)

    x = torch.tensor(np.stack([feature, np.ones(n), difficulty], axis=1))
    y = torch.tensor(prefs)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="sum") + 0.15 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(closure)
    theirs = dict(zip(["length", "model", "instruction_difficulty"], w.detach().tolist(), strict=True))
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-6)


def test_bootstrap_is_seeded():
    model, baseline, prefs = _length_biased_judge(50, quality=0.5, seed=6)
    first = length_controlled_win_rate(prefs, model, baseline, bootstrap=20, seed=7)
    again = length_controlled_win_rate(prefs, model, baseline, bootstrap=20, seed=7)
    assert (first.low, first.high) == (again.low, again.high)
    assert first.low < first.value < first.high


def test_bad_preferences_name_the_prompt():
    with pytest.raises(ValueError, match="prompt 1 has 1.5"):
        win_rate([0.0, 1.5])
