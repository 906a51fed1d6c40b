"""Win rate against a baseline with a confidence interval, and its length-controlled form (AlpacaEval 2 LC)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# AlpacaEval fits its GLM with sklearn at C=100 (inverse penalty on the summed log loss) when it does not
# cross-validate (alpaca_eval/metrics/glm_winrate.py, fit_LogisticRegressionCV); we keep that strength as an L2 term.
DEFAULT_L2 = 1.0 / 100.0


@dataclass(frozen=True)
class WinRate:
    """A mean preference for the model with a two-sided confidence interval (all in [0, 1])."""

    value: float
    low: float
    high: float
    standard_error: float
    n: int


@dataclass(frozen=True)
class LengthControlledWinRate:
    """The GLM's win rate with the length term set to zero, its bootstrap interval and the fitted weights."""

    value: float
    low: float
    high: float
    weights: dict[str, float]
    n: int


def preferences_from_rewards(model_rewards, baseline_rewards, soft: bool = False) -> np.ndarray:
    """Per-prompt preference for the model from a reward-model judge: 1 a win, 0 a loss, 0.5 a tie.

    With ``soft`` the Bradley-Terry probability sigmoid(r_model - r_baseline) instead of the hard outcome.
    """
    model = np.asarray(model_rewards, dtype=np.float64)
    baseline = np.asarray(baseline_rewards, dtype=np.float64)
    if model.shape != baseline.shape or model.ndim != 1:
        raise ValueError(f"rewards must be two 1-d arrays of one length, got {model.shape} and {baseline.shape}")
    difference = model - baseline
    if soft:
        return _sigmoid(difference)
    return np.where(difference > 0, 1.0, np.where(difference < 0, 0.0, 0.5))


def win_rate(preferences, confidence: float = 0.95) -> WinRate:
    """Mean preference with a normal-approximation interval: mean +- z * sample std / sqrt(n), clipped to [0, 1].

    The standard error is the one AlpacaEval reports (standard error of the per-prompt preferences).
    """
    prefs = _check_preferences(preferences)
    n = prefs.size
    mean = float(prefs.mean())
    standard_error = float(prefs.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    low = max(0.0, mean - z * standard_error) if n > 1 else 0.0
    high = min(1.0, mean + z * standard_error) if n > 1 else 1.0
    return WinRate(value=mean, low=low, high=high, standard_error=standard_error, n=n)


def length_features(model_lengths, baseline_lengths) -> np.ndarray:
    """tanh of the length difference (model minus baseline) divided by its standard deviation over the prompts.

    As in AlpacaEval the difference is scaled but not centred; with no spread (all differences equal) the feature is
    zero, since a constant difference cannot be told apart from the model term.
    """
    model = np.asarray(model_lengths, dtype=np.float64)
    baseline = np.asarray(baseline_lengths, dtype=np.float64)
    if model.shape != baseline.shape or model.ndim != 1:
        raise ValueError(f"lengths must be two 1-d arrays of one length, got {model.shape} and {baseline.shape}")
    delta = model - baseline
    scale = delta.std(ddof=1) if delta.size > 1 else 0.0
    if not scale > 0:
        return np.zeros_like(delta)
    return np.tanh(delta / scale)


def fit_preference_glm(
    preferences, length_feature, instruction_difficulty=None, l2: float = DEFAULT_L2
) -> dict[str, float]:
    """Logistic GLM of the preference on [length, model, (instruction difficulty)] with soft targets, no intercept.

    Minimises sum_i BCE(y_i, sigmoid(x_i . w)) + l2 / 2 * |w|^2 by Newton's method (the objective is strictly convex
    for l2 > 0, and for l2 = 0 whenever the maximum likelihood estimate exists).
    """
    prefs = _check_preferences(preferences)
    design, names = _design(prefs.size, length_feature, instruction_difficulty)
    weights = np.zeros(design.shape[1])
    for _ in range(100):
        probs = _sigmoid(design @ weights)
        gradient = design.T @ (probs - prefs) + l2 * weights
        curvature = probs * (1.0 - probs)
        hessian = (design * curvature[:, None]).T @ design + l2 * np.eye(design.shape[1])
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        weights -= step
        if np.max(np.abs(step)) < 1e-12:
            break
    return dict(zip(names, weights.tolist(), strict=True))


def length_controlled_win_rate(
    preferences,
    model_lengths,
    baseline_lengths,
    instruction_difficulty=None,
    l2: float = DEFAULT_L2,
    confidence: float = 0.95,
    bootstrap: int = 200,
    seed: int = 0,
) -> LengthControlledWinRate:
    """AlpacaEval 2's length-controlled win rate: fit the GLM, then average its prediction at zero length difference.

    The interval is a seeded percentile bootstrap over prompts (the GLM refitted on each resample); the length scale
    is recomputed on each resample, as the statistic would be on a new prompt set.
    """
    prefs = _check_preferences(preferences)
    model_lengths = np.asarray(model_lengths, dtype=np.float64)
    baseline_lengths = np.asarray(baseline_lengths, dtype=np.float64)
    difficulty = None if instruction_difficulty is None else np.asarray(instruction_difficulty, dtype=np.float64)

    def estimate(index):
        feature = length_features(model_lengths[index], baseline_lengths[index])
        part = None if difficulty is None else difficulty[index]
        weights = fit_preference_glm(prefs[index], feature, part, l2=l2)
        logits = weights["model"] + (0.0 if part is None else weights["instruction_difficulty"] * part)
        return float(np.mean(_sigmoid(np.broadcast_to(logits, index.shape)))), weights

    everything = np.arange(prefs.size)
    value, weights = estimate(everything)
    rng = np.random.default_rng(seed)
    draws = [estimate(rng.integers(0, prefs.size, prefs.size))[0] for _ in range(bootstrap)]
    tail = (1.0 - confidence) / 2.0
    low, high = (float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))) if draws else (value, value)
    return LengthControlledWinRate(value=value, low=low, high=high, weights=weights, n=prefs.size)


def _design(n: int, length_feature, instruction_difficulty) -> tuple[np.ndarray, list[str]]:
    columns = [np.asarray(length_feature, dtype=np.float64), np.ones(n)]
    names = ["length", "model"]
    if instruction_difficulty is not None:
        columns.append(np.asarray(instruction_difficulty, dtype=np.float64))
        names.append("instruction_difficulty")
    for name, column in zip(names, columns, strict=True):
        if column.shape != (n,):
            raise ValueError(f"GLM feature '{name}' has shape {column.shape}, expected ({n},) like the preferences")
    return np.stack(columns, axis=1), names


def _check_preferences(preferences) -> np.ndarray:
    prefs = np.asarray(preferences, dtype=np.float64)
    if prefs.ndim != 1 or prefs.size == 0:
        raise ValueError(f"preferences must be a non-empty 1-d array, got shape {prefs.shape}")
    if not np.all((prefs >= 0.0) & (prefs <= 1.0)):
        bad = int(np.flatnonzero(~((prefs >= 0.0) & (prefs <= 1.0)))[0])
        raise ValueError(f"preferences must lie in [0, 1]; prompt {bad} has {prefs[bad]}")
    return prefs


def _sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))
