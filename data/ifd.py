"""IFD data selection (Cherry LLM: Li et al. 2024, NAACL 2024; docs/methods.md, IFD): the ``ifd_select`` examples
stage keeps the train examples with the highest Instruction-Following Difficulty, read from a scores file that
trainers/ifd_scores.py (``python scripts/ifd_score.py``) writes for exactly this tokenized train dataset.

Selection: examples with IFD > ``max_ifd`` (1 in the paper: there the instruction does not help predict the answer)
are dropped; of the rest, the ``keep_fraction`` of the whole train set with the highest IFD is kept (ties: the
lower index), in their original order. ``keep_fraction`` 0.1: the paper's headline setting ("only 10% of the
original data" of Alpaca, its abstract). Eval data is left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os

from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.data.stages import register_stage

log = logging.getLogger(__name__)

SCORES_FILE = "ifd_scores.json"
STAGE_NAME = "ifd_select"


def read_scores(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def select_by_ifd(ifd: list[float], keep_fraction: float, max_ifd: float = 1.0) -> list[int]:
    """Indices kept: IFD <= max_ifd, the top ``round(keep_fraction * len(ifd))`` by IFD, in index order."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"ifd_select keep_fraction must be in (0, 1], got {keep_fraction}")
    eligible = [i for i, v in enumerate(ifd) if math.isfinite(v) and v <= max_ifd]
    count = min(len(eligible), max(1, round(keep_fraction * len(ifd))))
    ranked = sorted(eligible, key=lambda i: (-ifd[i], i))
    return sorted(ranked[:count])


@register_stage(STAGE_NAME, "examples")
def ifd_select(dataset, split: str, seed: int, context: dict | None = None, scores: str | None = None,
               keep_fraction: float = 0.1, max_ifd: float = 1.0):
    """Keep the train examples with the highest IFD <= max_ifd (a ``keep_fraction`` of the train set)."""
    if split != "train":
        return dataset
    if not scores:
        raise ValueError(f"data stage {STAGE_NAME} needs `scores`: the {SCORES_FILE} written by "
                         "python scripts/ifd_score.py for this data config")
    path = os.path.join(str(scores), SCORES_FILE) if os.path.isdir(str(scores)) else str(scores)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IFD scores not found at {path}. Score the data first: python scripts/ifd_score.py "
                                f"--output {path} <the same recipe and overrides as the training run>")
    fingerprint = dataset_fingerprint(dataset)
    store = read_scores(path)
    if fingerprint not in store:
        raise ValueError(f"{path} has no IFD scores for this train dataset (fingerprint {fingerprint}; the file has "
                         f"{', '.join(store) or 'none'}): score it with the same data config, seed and tokenizer")
    ifd = [float(v) for v in store[fingerprint]["ifd"]]
    if len(ifd) != len(dataset):
        raise ValueError(f"{path}: {len(ifd)} IFD scores for {len(dataset)} examples")
    kept = select_by_ifd(ifd, float(keep_fraction), float(max_ifd))
    above = sum(not (math.isfinite(v) and v <= max_ifd) for v in ifd)
    log.info("ifd_select: kept %d of %d train examples (%d with IFD > %s dropped; keep_fraction %s)", len(kept),
             len(ifd), above, max_ifd, keep_fraction)
    return dataset.select(kept)
