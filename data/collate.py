"""Tokenized examples -> one micro-batch (a ``Batch``) in a padding-free layout with sparse targets.

Each example becomes a *document*: its tokens, position ids, a branch id per token, and a list of targets
(which position's hidden state predicts which token, for which sequence). Documents are packed into rows
(first-fit decreasing, at most ``row_length`` tokens a row, when ``packing`` is on) and every row gets a
boolean attention mask: token i sees token j iff j <= i, both are in the same document, and j is on the
shared trunk (branch 0) or on i's own branch. Position ids restart at every document.

Shared-prompt pairs (``shared_prompt``): one document ``prompt | chosen | rejected``; the rejected branch
cannot see the chosen one and its positions continue from the prompt, so both responses get exactly the
log-probs they would get in two separate sequences while the prompt is computed once. The first token of
each response is predicted from the last prompt token, so that position carries two targets: targets are a
sparse list, never a dense [rows, length] label tensor, and logits are computed for them alone.

Unpaired examples (``unpaired``: ``prompt_ids``, ``completion_ids``, ``label``, ``mismatched_ids``) use the same
branched document, ``prompt | completion | mismatched completion``: the completion's role is desirable or
undesirable by its label, the second branch is a mismatched sequence (another example's completion on this prompt,
chosen by data/unpaired.py), so both are scored exactly as two separate sequences with the prompt computed once.

Because targets only ever point inside their own document, no document's first token has a label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tunelab.data.contract import (
    NLL_ROLES,
    ROLE_CHOSEN,
    ROLE_DESIRABLE,
    ROLE_MISMATCHED,
    ROLE_REJECTED,
    ROLE_SFT,
    ROLE_UNDESIRABLE,
    UNIT_PAIRS,
    UNIT_SEQUENCES,
    UNIT_TARGET_TOKENS,
    UNIT_UNPAIRED,
    Batch,
)


@dataclass
class Document:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    # (index in document of the predicting token, target id, sequence, index of the token in its response)
    targets: list[tuple[int, int, int, int]] = field(default_factory=list)

    def extend(self, tokens: list[int], branch: int, first_position: int) -> int:
        start = len(self.tokens)
        self.tokens += tokens
        self.positions += range(first_position, first_position + len(tokens))
        self.branches += [branch] * len(tokens)
        return start

    def add_targets(self, first_predictor: int, start: int, tokens: list[int], seq: int) -> None:
        """``tokens`` sit at document indices start.. and are predicted from first_predictor, then start..."""
        predictors = [first_predictor] + list(range(start, start + len(tokens) - 1))
        self.targets += [(p, t, seq, k) for k, (p, t) in enumerate(zip(predictors, tokens))]


def sft_document(example: dict, seq: int) -> Document:
    doc = Document()
    ids, mask = example["input_ids"], example["target_mask"]
    doc.extend(ids, 0, 0)
    k = 0
    for i in range(1, len(ids)):
        if mask[i]:
            doc.targets.append((i - 1, ids[i], seq, k))
            k += 1
    return doc


def branch_documents(prompt: list[int], responses: list[tuple[list[int], int]], shared_prompt: bool) -> list[Document]:
    """Documents for responses ``(tokens, sequence)`` to one prompt: one document with a branch per response when
    ``shared_prompt``, else one document per response."""
    p = len(prompt)
    if shared_prompt:
        doc = Document()
        doc.extend(prompt, 0, 0)
        for branch, (response, seq) in enumerate(responses, start=1):
            start = doc.extend(response, branch, p)
            doc.add_targets(p - 1, start, response, seq)
        return [doc]
    docs = []
    for response, seq in responses:
        doc = Document()
        doc.extend(prompt, 0, 0)
        start = doc.extend(response, 0, p)
        doc.add_targets(p - 1, start, response, seq)
        docs.append(doc)
    return docs


def pack_rows(lengths: list[int], row_length: int, packing: bool) -> list[list[int]]:
    """Document indices per row: first-fit decreasing when packing, else one document a row."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max(row_length, lengths[i]) - lengths[i])
    return rows


def pair_documents(example: dict, chosen_seq: int, rejected_seq: int, shared_prompt: bool) -> list[Document]:
    return branch_documents(example["prompt_ids"], [(example["chosen_ids"], chosen_seq),
                                                    (example["rejected_ids"], rejected_seq)], shared_prompt)


def unpaired_documents(example: dict, completion_seq: int, mismatched_seq: int, shared_prompt: bool) -> list[Document]:
    if "mismatched_ids" not in example:
        raise ValueError("an unpaired example has no mismatched_ids: data/unpaired.with_mismatched_completions adds "
                         "them when the data pipeline builds unpaired examples")
    return branch_documents(example["prompt_ids"], [(example["completion_ids"], completion_seq),
                                                    (example["mismatched_ids"], mismatched_seq)], shared_prompt)


class Collator:
    def __init__(self, kind: str, packing: bool, shared_prompt: bool, row_length: int, columns=()):
        self.kind = kind
        self.columns = tuple(columns)  # Needs.columns: per-example values carried to every sequence of the example
        self.packing = packing
        self.shared_prompt = shared_prompt
        self.row_length = row_length

    def documents(self, examples: list[dict]) -> tuple[list[Document], list[int]]:
        docs, roles = [], []
        if self.kind == "sft":
            for i, ex in enumerate(examples):
                docs.append(sft_document(ex, i))
                roles.append(ROLE_SFT)
        elif self.kind == "unpaired":
            for i, ex in enumerate(examples):
                docs += unpaired_documents(ex, 2 * i, 2 * i + 1, self.shared_prompt)
                roles += [ROLE_DESIRABLE if ex["label"] else ROLE_UNDESIRABLE, ROLE_MISMATCHED]
        else:
            for i, ex in enumerate(examples):
                docs += pair_documents(ex, 2 * i, 2 * i + 1, self.shared_prompt)
                roles += [ROLE_CHOSEN, ROLE_REJECTED]
        return docs, roles

    def __call__(self, examples: list[dict]) -> Batch:
        docs, roles = self.documents(examples)
        rows = pack_rows([len(d.tokens) for d in docs], self.row_length, self.packing)
        width = max(sum(len(docs[d].tokens) for d in row) for row in rows)
        n_rows = len(rows)
        input_ids = torch.zeros(n_rows, width, dtype=torch.long)
        position_ids = torch.zeros(n_rows, width, dtype=torch.long)
        doc_ids = torch.full((n_rows, width), -1, dtype=torch.long)
        branch_ids = torch.zeros(n_rows, width, dtype=torch.long)
        targets = []
        for r, row in enumerate(rows):
            offset = 0
            for d in row:
                doc = docs[d]
                n = len(doc.tokens)
                input_ids[r, offset:offset + n] = torch.tensor(doc.tokens)
                position_ids[r, offset:offset + n] = torch.tensor(doc.positions)
                branch_ids[r, offset:offset + n] = torch.tensor(doc.branches)
                doc_ids[r, offset:offset + n] = d
                base = r * width + offset
                targets += [(base + p, t, s, k) for p, t, s, k in doc.targets]
                offset += n
        target = torch.tensor(targets, dtype=torch.long).reshape(-1, 4)
        seq_role = torch.tensor(roles, dtype=torch.long)
        nll_roles = torch.isin(seq_role, torch.tensor(NLL_ROLES))
        counted = nll_roles[target[:, 2]]
        ref_seq_logps = ref_seq_prefix_logps = None
        if "ref_logps" in examples[0]:  # precomputed reference (trainers/reference.py)
            ref_seq_logps = torch.tensor([v for ex in examples for v in ex["ref_logps"]])
        if "ref_prefix_logps" in examples[0]:  # and of the pairs' common prefixes (Needs.reference_prefix)
            ref_seq_prefix_logps = torch.tensor([v for ex in examples for v in ex["ref_prefix_logps"]])
        return Batch(
            input_ids=input_ids,
            position_ids=position_ids,
            doc_ids=doc_ids,
            branch_ids=branch_ids,
            target_index=target[:, 0],
            target_ids=target[:, 1],
            target_seq=target[:, 2],
            target_pos=target[:, 3],
            seq_role=seq_role,
            chosen=torch.nonzero(seq_role == ROLE_CHOSEN).flatten(),
            rejected=torch.nonzero(seq_role == ROLE_REJECTED).flatten(),
            counts={
                UNIT_TARGET_TOKENS: int(counted.sum()),
                UNIT_SEQUENCES: int(nll_roles.sum()),
                UNIT_PAIRS: int((seq_role == ROLE_CHOSEN).sum()),
                UNIT_UNPAIRED: int(((seq_role == ROLE_DESIRABLE) | (seq_role == ROLE_UNDESIRABLE)).sum()),
            },
            num_tokens=int((doc_ids >= 0).sum()),
            seq_columns={name: sequence_column(examples, name, 1 if self.kind == "sft" else 2)
                         for name in self.columns},
            ref_seq_logps=ref_seq_logps,
            ref_seq_prefix_logps=ref_seq_prefix_logps,
        )


def sequence_column(examples: list[dict], name: str, sequences_per_example: int) -> torch.Tensor:
    """[S] float32 values of the column ``name``, each example's value repeated for each of its sequences; NaN
    where an example lacks it (e.g. eval data that a train-only stage left alone)."""
    values = []
    for i, ex in enumerate(examples):
        value = ex.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"column {name!r} of example {i} in the batch is {value!r}; a loss declared it in "
                             "Needs.columns, which carries one number per example")
        values += [math.nan if value is None else float(value)] * sequences_per_example
    return torch.tensor(values, dtype=torch.float32)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[rows, L] the first position of each position's document (the first key it may see); padding: itself."""
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(first, positions, torch.zeros_like(positions)).cummax(dim=1).values
    return torch.where(doc_ids >= 0, starts, positions)


def attention_mask(doc_ids: torch.Tensor, branch_ids: torch.Tensor, queries: slice = slice(None),
                   keys: slice = slice(None)) -> torch.Tensor:
    """[rows, 1, Q, K] boolean mask (True = may attend) of the ``queries`` x ``keys`` block of the layout (default:
    all L x L): causal, within a document, a branch seeing only branch 0 and itself; padding sees itself only."""
    positions = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    q, k = positions[queries], positions[keys]
    doc_q, doc_k = doc_ids[:, queries, None], doc_ids[:, None, keys]
    branch_q, branch_k = branch_ids[:, queries, None], branch_ids[:, None, keys]
    mask = (q[:, None] >= k[None, :]) & (doc_q == doc_k) & (doc_q >= 0) & ((branch_k == 0) | (branch_q == branch_k))
    return (mask | (q[:, None] == k[None, :]))[:, None]
