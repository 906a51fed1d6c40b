"""SFTMix data side (Xiao et al. 2024, arXiv 2410.05248; docs/methods_sftmix.md): the confidence split and the
pairing order. The confidence itself (stage 1: a model scores the examples) is trainers/sftmix_scores.py, which
writes the scores file this module reads.

Split (the ``sftmix_split`` examples stage). The train dataset gets ``confidence`` and ``group`` columns from the
scores file (matched by the content fingerprint of the tokenized train dataset): the top ``split_ratio`` fraction
by confidence is confident (group 1, D_c), the rest unconfident (group 0, D_u); ties go to the lower index. Eval
data is left alone (no groups), so the eval loss stays the plain NTP loss and is comparable with an SFT baseline.

Pairing (the ``sftmix_pairs`` ordering of ``data/sampler.py``). Each epoch both halves are shuffled from
(seed, epoch) and interleaved as ``c0, u0, c1, u1, ...``; micro-batches are contiguous slices of an even
size, so every micro-batch holds whole (confident, unconfident) pairs and the ``group`` column that the collator
carries per sequence (the loss declares it in ``Needs.columns``) shows the alternation the ``sftmix`` loss checks.
An epoch has ``len(dataset) // 2`` pairs: with halves of
unequal size (``split_ratio != 0.5``) the larger half is truncated to that many (a different subset each
epoch) and the smaller one is repeated, each repetition freshly shuffled.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.data.sampler import epoch_generator, register_ordering
from tunelab.data.stages import register_stage

log = logging.getLogger(__name__)

CONFIDENCE_FILE = "sftmix_confidence.json"
STAGE_NAME = "sftmix_split"
CONFIDENT, UNCONFIDENT = 1, 0


def read_scores(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


# ---- split -------------------------------------------------------------------------------------------------
def split_groups(conf: list[float], split_ratio: float = 0.5) -> list[int]:
    """1 for the top ``split_ratio`` fraction by confidence (ties: lower index first), else 0."""
    n = len(conf)
    if not 0.0 < split_ratio < 1.0:
        raise ValueError(f"sftmix split_ratio must be in (0, 1), got {split_ratio}")
    n_confident = int(round(split_ratio * n))
    if not 0 < n_confident < n:
        raise ValueError(f"sftmix split_ratio={split_ratio} of {n} examples leaves an empty half")
    ranked = sorted(range(n), key=lambda i: (-conf[i], i))
    groups = [UNCONFIDENT] * n
    for i in ranked[:n_confident]:
        groups[i] = CONFIDENT
    return groups


def _scores_path(scores: str) -> str:
    return os.path.join(scores, CONFIDENCE_FILE) if os.path.isdir(scores) else scores


@register_stage(STAGE_NAME, "examples")
def sftmix_split(dataset, split: str, seed: int, context: dict | None = None, scores: str | None = None,
                 split_ratio: float = 0.5):
    """Add ``confidence`` and ``group`` to the train examples from a stage-1 scores file (run dir or path)."""
    if split != "train":
        return dataset
    if not scores:
        raise ValueError("data stage sftmix_split needs `scores`: the stage-1 reference run dir or its "
                         f"{CONFIDENCE_FILE} (recipe=sftmix: set sftmix.reference_run=<run dir>)")
    path = _scores_path(str(scores))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SFTMix confidence scores not found at {path}. Run stage 1 first: "
            f"python scripts/sftmix_score.py --run-dir <reference run dir>"
        )
    fingerprint = dataset_fingerprint(dataset)
    store = read_scores(path)
    if fingerprint not in store:
        raise ValueError(
            f"{path} has no confidence scores for this train dataset (fingerprint {fingerprint}; the file has "
            f"{', '.join(store) or 'none'}). The scores were computed on different tokenized data: use the same "
            "data config, seed and tokenizer as the reference run, or re-run scripts/sftmix_score.py with "
            "matching overrides."
        )
    entry = store[fingerprint]
    conf = entry["confidence"]
    if len(conf) != len(dataset):
        raise ValueError(f"{path}: {len(conf)} scores for {len(dataset)} examples")
    groups = split_groups(conf, float(split_ratio))
    log.info("sftmix split: %d confident / %d unconfident (split_ratio %s, checkpoints %s)", sum(groups),
             len(groups) - sum(groups), split_ratio, ", ".join(entry.get("checkpoints", [])))
    for column in ("confidence", "group"):
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
    return dataset.add_column("confidence", [float(c) for c in conf]).add_column("group", groups)


# ---- pairing order -----------------------------------------------------------------------------------------
def _group_indices(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The confident and unconfident example indices, read each time (one integer column: cheap next to a step)."""
    if "group" not in dataset.column_names:
        raise KeyError("data.ordering=sftmix_pairs needs a `group` column: add the sftmix_split data stage")
    groups = torch.tensor(dataset["group"], dtype=torch.long)
    return torch.nonzero(groups == CONFIDENT).flatten(), torch.nonzero(groups == UNCONFIDENT).flatten()


def _draw(indices: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices: a shuffle truncated, or repeated (each pass reshuffled) when there are too few."""
    passes = [indices[torch.randperm(len(indices), generator=generator)] for _ in range(-(-count // len(indices)))]
    return torch.cat(passes)[:count]


@register_ordering("sftmix_pairs")
def sftmix_pairs(dataset, seed: int, epoch: int) -> list[int]:
    """[c0, u0, c1, u1, ...] for one epoch: len(dataset) // 2 (confident, unconfident) pairs."""
    confident, unconfident = _group_indices(dataset)
    if len(confident) == 0 or len(unconfident) == 0:
        raise ValueError(f"sftmix_pairs needs both groups; got {len(confident)} confident, "
                         f"{len(unconfident)} unconfident examples")
    generator = epoch_generator(seed, epoch)
    n_pairs = len(dataset) // 2
    pairs = torch.stack([_draw(confident, n_pairs, generator), _draw(unconfident, n_pairs, generator)], dim=1)
    return pairs.flatten().tolist()
