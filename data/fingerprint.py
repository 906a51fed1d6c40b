"""Content fingerprints of datasets, and the start-up check that every rank trains on the same data.

A fingerprint is a SHA-256 of a dataset's column names, types and values in row order, so it changes exactly
when the examples do (unlike ``datasets``' own ``_fingerprint``, which tracks the transforms applied and is
random for in-memory data). Every rank builds its datasets itself; if any input to that build differs between
processes (a hash-seed-dependent draw, a file changed between reads, another tokenizer) the ranks would train
on different data without a sign, so the trainer compares the ranks' fingerprints before training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from accelerate import PartialState
from accelerate.utils import gather_object

log = logging.getLogger(__name__)

_BATCH_ROWS = 10_000


class DataMismatchError(RuntimeError):
    pass


def _hash_array(digest, array: pa.Array) -> None:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    kind = array.type
    digest.update(f"{kind}:{len(array)}:{array.null_count};".encode())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.fill_null(pc.list_value_length(array), -1)
        digest.update(np.asarray(lengths, dtype=np.int64).tobytes())
        _hash_array(digest, array.flatten())
    elif array.null_count == 0 and (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                                    or pa.types.is_boolean(kind)):
        digest.update(array.to_numpy(zero_copy_only=False).tobytes())
    else:
        digest.update(json.dumps(array.to_pylist(), sort_keys=True, ensure_ascii=False, default=str).encode())


def dataset_fingerprint(dataset) -> str:
    """Hex SHA-256 of a ``datasets.Dataset``'s content (``None`` for no dataset)."""
    digest = hashlib.sha256()
    if dataset is None:
        digest.update(b"none")
        return digest.hexdigest()
    digest.update(json.dumps([dataset.column_names, len(dataset)]).encode())
    for batch in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        for name in batch.column_names:
            _hash_array(digest, batch.column(name))
    return digest.hexdigest()


def check_fingerprints_agree(fingerprints: list[dict[str, str]]) -> None:
    """``fingerprints[rank]`` maps split -> fingerprint; raises naming the ranks and splits that differ."""
    reference = fingerprints[0]
    differing = [
        f"rank {rank} {split} {theirs[:12]} != rank 0 {reference.get(split, '(missing)')[:12]}"
        for rank, held in enumerate(fingerprints[1:], start=1)
        for split, theirs in held.items()
        if theirs != reference.get(split)
    ]
    if differing:
        raise DataMismatchError(
            "the ranks built different datasets (" + "; ".join(differing) + "). Every rank must read the same "
            "files with the same data config and tokenizer; check that the files did not change during start-up "
            "and that every node sees the same copy."
        )


def check_same_data_on_every_rank(splits: dict) -> dict[str, str]:
    """Fingerprint each split (name -> dataset or None) on this rank, gather every rank's fingerprints and
    refuse to go on unless they all agree; returns this rank's fingerprints."""
    mine = {name: dataset_fingerprint(ds) for name, ds in splits.items()}
    state = PartialState()
    if state.num_processes > 1:
        check_fingerprints_agree(gather_object([mine]))
    log.info("data fingerprint: %s (same on %d ranks)",
             ", ".join(f"{name} {fp[:12]}" for name, fp in mine.items()), state.num_processes)
    return mine
