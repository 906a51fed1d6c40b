"""OPTune's utility weighting of preference pairs (Chen et al. 2024, "OPTune: Efficient Online Preference Tuning",
arXiv 2406.07657): a pair weighting, beside WPO's, that scales each pair of any pairwise loss by how much the reward
model prefers its chosen response, so that pairs whose responses the reward model barely tells apart teach little.

The paper describes the idea (a "weighted DPO" in which each generated pair counts by its utility, its reward gap,
instead of as a binary preference); its exact weight function could not be read here, so the function of the gap is
a documented choice (``form``), with the reward-model scale as ``temperature``. Per pair i with the reward model's
scores r_c (chosen) and r_r (rejected), gap d = r_c - r_r:

    margin (default):  w = 2 sigmoid(d / T) - 1 = tanh(d / 2T)   in [0, 1): the expected sign of the label when the
                                                                 reward model is a Bradley-Terry model at scale T
                                                                 (P(chosen better) = sigmoid(d / T)); 0 for a tie
    probability:       w = sigmoid(d / T)                        in [0.5, 1): that probability itself
    linear:            w = d / T                                 unbounded: the raw gap in units of T

A negative gap (a pairs file whose label disagrees with its reward model) gets weight 0 under ``margin`` and
``linear``. The weights are constants (no gradient), and the weighted loss is sum_i w_i loss_i over the step's pair
count, as WPO's (``PairwiseLoss`` multiplies each pair's loss), which keeps gradient accumulation and data parallelism
exact (no per-batch normalisation).

The scores come from the per-pair columns ``chosen_reward`` and ``rejected_reward`` (``Needs.columns``): the online
source (trainers/online.py) gives every sampled pair both, and a pairs file that carries them (data/onpolicy.py's
files) brings them through the data pipeline. A pair without them is an error that says so. Logged:
``optune/weight_mean``, ``optune/weight_min``, ``optune/weight_max`` and ``optune/gap_mean``.
"""

from __future__ import annotations

import torch

from tunelab.data.contract import ForwardOutputs, Needs
from tunelab.losses.base import Metric
from tunelab.losses.registry import register_pair_weighting

CHOSEN, REJECTED = "chosen_reward", "rejected_reward"
FORMS = {
    "margin": lambda gap: (2 * torch.sigmoid(gap) - 1).clamp(min=0.0),
    "probability": torch.sigmoid,
    "linear": lambda gap: gap.clamp(min=0.0),
}


@register_pair_weighting("optune")
class OPTuneWeighting:
    """OPTune's per-pair utility weight from the reward gap r_chosen - r_rejected (Chen et al. 2024).

    Options:
    - ``form``: margin (default, 2 sigmoid(gap / T) - 1) | probability (sigmoid(gap / T)) | linear (gap / T); the
      paper's exact function is not stated here, see losses/optune.py.
    - ``temperature``: T, the reward model's scale (1: a Bradley-Terry reward model such as recipe=reward trains).
    """

    def __init__(self, form: str = "margin", temperature: float = 1.0):
        if form not in FORMS:
            raise ValueError(f"unknown optune form {form!r}; valid: {', '.join(FORMS)}")
        if not temperature > 0:
            raise ValueError(f"optune temperature must be > 0, got {temperature!r}")
        self.form, self.temperature = form, float(temperature)
        self.needs = Needs(pairs=True, columns=frozenset({CHOSEN, REJECTED}))

    def gaps(self, out: ForwardOutputs) -> torch.Tensor:
        """[P] r_chosen - r_rejected of each pair, from its chosen sequence's columns (each example's value is on
        both of its sequences)."""
        chosen = out.seq_columns[CHOSEN][out.chosen].double()
        rejected = out.seq_columns[REJECTED][out.chosen].double()
        missing = torch.isnan(chosen) | torch.isnan(rejected)
        if bool(missing.any()):
            raise ValueError(f"pair_weighting optune: {int(missing.sum())} of {len(missing)} pairs in the batch lack "
                             f"{CHOSEN!r}/{REJECTED!r}; the pairs must carry the reward model's scores (online pairs "
                             "and the pairs files of data/onpolicy.py do)")
        return chosen - rejected

    def __call__(self, out: ForwardOutputs) -> tuple[torch.Tensor, dict[str, Metric]]:
        gap = self.gaps(out)
        weights = FORMS[self.form](gap / self.temperature).to(out.seq_logps.dtype)
        metrics = {
            "optune/weight_mean": Metric(weights.float().sum(), weights.numel()),
            "optune/weight_min": Metric(weights.float().min() if weights.numel() else 1.0, reduce="min"),
            "optune/weight_max": Metric(weights.float().max() if weights.numel() else 0.0, reduce="max"),
            "optune/gap_mean": Metric(gap.float().sum(), gap.numel()),
        }
        return weights, metrics
