"""Tokenized unpaired rows -> one example per labelled completion, each given a mismatched completion of its prompt.

A loss on unpaired data (KTO) estimates a baseline from sequences that pair a prompt with a completion written for
another prompt: KTO's reference point z0 is the policy's KL from the reference on such mismatched pairs. Each
example here carries one, ``mismatched_ids``, which the collator lays out as a second branch on the example's prompt
(``prompt | completion | mismatched``, data/collate.py), so the prompt is computed once.

Which completion: the examples of a split, in a seeded permutation, form a cycle, and each takes the completion of
the next example on the cycle whose prompt differs from its own (the two halves of a converted pair share a prompt,
so neither serves as the other's mismatched completion). It is cut to ``max_length - len(prompt)`` tokens, so the
mismatched sequence fits the length budget like any other. The assignment is fixed per example before training:
deterministic for the seed, independent of packing, micro-batch size (1 included), gradient accumulation, the
number of ranks and the sampler's order, and scored once per example by the precomputed reference.

TRL 1.16 (KTOTrainer._prepare_dataset) instead rotates completions by one within each chunk of
``per_device_train_batch_size`` consecutive rows and then requires a sequential sampler and a per-device batch
above 1, so that a batch's mismatched completions are that batch's own completions. Here a micro-batch's mismatched
completions are other draws from the same split's completions; both estimate the same expectation over mismatched
pairs (the paper's z0, arXiv 2402.01306 Sec. 4.1), and ours lets the training order stay random.
"""

from __future__ import annotations

import logging

import datasets
import torch

log = logging.getLogger(__name__)


def one_example_per_completion(rows: datasets.Dataset) -> datasets.Dataset:
    """Tokenized unpaired rows (``prompt_ids``, ``completions``, ``labels``; data/tokenize.py) -> one example per
    completion (``prompt_ids``, ``completion_ids``, ``label``), keeping the row's other columns (its source and row)."""
    kept = [c for c in rows.column_names if c not in ("completions", "labels")]

    def explode(batch: dict) -> dict:
        out: dict[str, list] = {c: [] for c in (*kept, "completion_ids", "label")}
        for i, (completions, labels) in enumerate(zip(batch["completions"], batch["labels"])):
            for completion, label in zip(completions, labels):
                for c in kept:
                    out[c].append(batch[c][i])
                out["completion_ids"].append(completion)
                out["label"].append(bool(label))
        return out

    return rows.map(explode, batched=True, remove_columns=rows.column_names, desc="one example per completion")


def mismatched_partners(prompts: list[tuple[int, ...]], seed: int) -> list[int]:
    """For each example, the index of the example whose completion it gets as its mismatched one (see above)."""
    n = len(prompts)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = [0] * n
    for k, i in enumerate(order):
        for step in range(1, n):
            j = order[(k + step) % n]
            if prompts[j] != prompts[i]:
                partner[i] = j
                break
        else:
            raise ValueError(f"unpaired data: {n} example(s) that all share one prompt; the mismatched completions "
                             "(KTO's reference point) need examples with at least two different prompts")
    return partner


def with_mismatched_completions(examples: datasets.Dataset, seed: int, max_length: int) -> datasets.Dataset:
    """The examples with a ``mismatched_ids`` column: the partner's completion, cut to fit beside the prompt."""
    if len(examples) == 0:
        return examples
    prompts = [tuple(p) for p in examples["prompt_ids"]]
    completions = examples["completion_ids"]
    partner = mismatched_partners(prompts, seed)
    mismatched = [completions[j][:max_length - len(prompts[i])] for i, j in enumerate(partner)]
    return examples.add_column("mismatched_ids", mismatched)


def label_balance_note(n_desirable: int, n_undesirable: int) -> str | None:
    """For unequal label counts, the desirable/undesirable loss weights that the KTO paper's guidance (Sec. 4.2,
    Eq. 8: w_d n_d / (w_u n_u) in [1, 4/3]) allows, as TRL 1.16 reports them; None for equal counts."""
    if n_desirable == n_undesirable or not (n_desirable and n_undesirable):
        return None
    d_low = n_undesirable / n_desirable
    u_high = n_desirable / n_undesirable
    return (f"unpaired data: {n_desirable} desirable and {n_undesirable} undesirable training completions; weight "
            "them so that desirable_weight * n_desirable / (undesirable_weight * n_undesirable) lies in [1, 4/3] "
            f"(KTO paper Sec. 4.2): e.g. desirable_weight in [{d_low:.3g}, {4 / 3 * d_low:.3g}] with "
            f"undesirable_weight 1, or undesirable_weight in [{3 / 4 * u_high:.3g}, {u_high:.3g}] with "
            "desirable_weight 1")


def unpaired_examples(rows: datasets.Dataset | None, seed: int, max_length: int,
                      split: str = "train") -> datasets.Dataset | None:
    """Tokenized unpaired rows -> the examples the unpaired layout collates (None stays None); for the training
    split, the label counts are logged, with the weighting guidance when they differ."""
    if rows is None:
        return None
    examples = with_mismatched_completions(one_example_per_completion(rows), seed, max_length)
    if split == "train":
        n_desirable = sum(examples["label"])
        n_undesirable = len(examples) - n_desirable
        note = label_balance_note(n_desirable, n_undesirable)
        if note:
            log.warning(note)
        else:
            log.info("unpaired data: %d desirable and %d undesirable training completions", n_desirable,
                     n_undesirable)
    return examples
