"""Raw rows from a source: a hub dataset id, local json/jsonl/parquet files, or a bundled generator.

Every loaded row gets ``_source`` and ``_row`` columns so a bad row can be reported by file and row number
(for JSON lines, the 1-based line number). Loading itself is ``datasets``' (download, caching, formats).
"""

from __future__ import annotations

import json
import os
from glob import glob

import datasets

from data import bundled

BUNDLED = {
    "instructions": bundled.instruction_rows,
    "preferences": bundled.preference_rows,
    "varied_instructions": bundled.varied_instruction_rows,  # variable-length answers (MCTune demo)
}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataFileError(ValueError):
    pass


def _local_files(path: str) -> list[str]:
    files = sorted(glob(os.path.join(path, "*"))) if os.path.isdir(path) else sorted(glob(path))
    files = [f for f in files if os.path.splitext(f)[1] in LOCAL_BUILDERS]
    if not files:
        raise DataFileError(f"no .json/.jsonl/.parquet files at {path!r}")
    if len({LOCAL_BUILDERS[os.path.splitext(f)[1]] for f in files}) > 1:
        raise DataFileError(f"{path!r} mixes json and parquet files")
    return files


def _scan_json_lines(files: list[str], on_error: str) -> tuple[list[dict], int]:
    """Line-by-line reading, used only when ``datasets`` could not parse a file: names the bad line."""
    rows, skipped = [], 0
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("a row must be a JSON object")
                except ValueError as err:
                    if on_error != "skip":
                        raise DataFileError(f"{file}:{line_no}: malformed JSON line ({err})") from None
                    skipped += 1
                    continue
                rows.append({**row, "_source": file, "_row": line_no})
    return rows, skipped


def _with_position(ds: datasets.Dataset, source: str, first_row: int) -> datasets.Dataset:
    ds = ds.add_column("_source", [source] * len(ds))
    return ds.add_column("_row", list(range(first_row, first_row + len(ds))))


def load_rows(spec, on_error: str) -> tuple[datasets.Dataset, int]:
    """(rows, number of unreadable rows skipped) for one source spec."""
    path = spec.path
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        if name not in BUNDLED:
            raise KeyError(f"unknown bundled dataset {name!r}; valid: {', '.join(BUNDLED)}")
        rows = BUNDLED[name](n=spec.get("num_rows") or 2000, seed=spec.get("seed") or 0)
        return _with_position(datasets.Dataset.from_list(rows), path, 0), 0
    if os.path.exists(path) or any(ch in path for ch in "*?["):
        files = _local_files(path)
        builder = LOCAL_BUILDERS[os.path.splitext(files[0])[1]]
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        except Exception as err:  # noqa: BLE001 - re-raised below with the file and line named
            if builder != "json":
                raise DataFileError(f"could not read {files}: {err}") from err
            rows, skipped = _scan_json_lines(files, on_error)
            if skipped == 0:
                raise DataFileError(f"could not read {files}: {err}") from err
            return datasets.Dataset.from_list(rows), skipped
        if len(files) == 1:
            return _with_position(ds, files[0], 1 if path.endswith(".jsonl") else 0), 0
        return _with_position(ds, ",".join(files), 0), 0
    ds = datasets.load_dataset(path, spec.get("name"), split=spec.get("split") or "train")
    return _with_position(ds, path, 0), 0
