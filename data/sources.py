"""Raw rows from a source: a hub dataset id, local json/jsonl/parquet files, or a bundled generator.

Every loaded row gets ``_source`` and ``_row`` columns so a bad row can be reported by file and row number
(for JSON lines, the 1-based line number). Loading itself is ``datasets``' (download, caching, formats).
Before that, each local JSON file is checked for what ``datasets`` would report without naming the file or row,
or accept silently: an empty file, bytes that are not UTF-8 (for JSON lines the bad lines are named, or
skipped and counted with ``data.on_error=skip``; a JSON list can only be refused as a whole), and a single
JSON object where rows were expected. A source's ``columns: {<field>: <its column>}`` renames its columns
to the fields the formats read, and its ``max_rows`` keeps only its first rows. ``data.path`` (with
``data.format``, ``data.split``, ``data.max_rows``) is the short form of a one-source ``data.sources`` list.
"""

from __future__ import annotations

import json
import logging
import os
from glob import glob
from typing import NamedTuple

import datasets

from tunelab.data import bundled
from tunelab.data.formats import FORMAT_FIELDS, OPTIONAL_FIELDS

BUNDLED = {
    "instructions": bundled.instruction_rows,
    "preferences": bundled.preference_rows,
    "varied_instructions": bundled.varied_instruction_rows,  # variable-length answers (MCTune demo)
}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FIELDS = sorted({field for fields in FORMAT_FIELDS.values() for field in fields} | set(OPTIONAL_FIELDS))
_CHUNK_BYTES = 1 << 24
_EXPECTED = "expected JSON lines (one row object per line) or a JSON list of row objects"

log = logging.getLogger(__name__)


class DataFileError(ValueError):
    pass


class UnreadableLine(NamedTuple):
    """A JSON line skipped with data.on_error=skip: its kind (for the log's counts), ``file:line`` and why."""

    kind: str
    where: str
    reason: str


def _local_files(path: str) -> list[str]:
    files = sorted(glob(os.path.join(path, "*"))) if os.path.isdir(path) else sorted(glob(path))
    files = [f for f in files if os.path.splitext(f)[1] in LOCAL_BUILDERS]
    if not files:
        raise DataFileError(f"no .json/.jsonl/.parquet files at {path!r}")
    if len({LOCAL_BUILDERS[os.path.splitext(f)[1]] for f in files}) > 1:
        raise DataFileError(f"{path!r} mixes json and parquet files")
    return files


def _first_non_blank(file: str) -> bytes:
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            if chunk.strip():
                return chunk.lstrip()[:1]
    raise DataFileError(f"{file} is empty: {_EXPECTED}")


def _first_non_utf8(file: str) -> tuple[int, int] | None:
    """(1-based line, byte value) of the first byte that is not UTF-8 text, or None. Chunks end at a newline,
    which never occurs inside a multi-byte UTF-8 character, so each decodes on its own."""
    line = 1
    with open(file, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES) + handle.readline():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as err:
                return line + chunk.count(b"\n", 0, err.start), chunk[err.start]
            line += chunk.count(b"\n")
    return None


def _whole_file_object(file: str) -> dict | None:
    """The file's content if it is one JSON object spread over several lines (so not JSON lines), else None."""
    with open(file, "rb") as handle:
        first_line = handle.readline()
    try:
        json.loads(first_line)
        return None  # the first line is a row on its own: JSON lines
    except ValueError:
        pass
    try:
        with open(file, encoding="utf-8") as handle:
            content = json.load(handle)
    except ValueError:
        return None  # malformed: the line-by-line reading names the line
    return content if isinstance(content, dict) else None


def _check_json_file(file: str) -> bool:
    """Refuses what ``datasets`` would misreport; True if the file must be read line by line (JSON lines with
    bytes that are not UTF-8, which ``datasets`` would read into strings that fail later without a row)."""
    layout = "list" if _first_non_blank(file) == b"[" else "lines"
    bad = _first_non_utf8(file)
    if bad and layout == "list":
        line, byte = bad
        raise DataFileError(
            f"{file}:{line}: byte 0x{byte:02x} is not UTF-8 text; data files must be UTF-8 (re-encode it, e.g. "
            "`iconv -f latin1 -t utf-8`). A JSON list cannot be read row by row, so data.on_error=skip cannot skip it"
        )
    if layout == "lines" and (content := _whole_file_object(file)) is not None:
        keys = ", ".join(list(content)[:8]) or "none"
        raise DataFileError(f"{file} holds a single JSON object (keys: {keys}); {_EXPECTED}")
    return bad is not None


def _explain_json_list(file: str) -> DataFileError | None:
    """Why ``datasets`` could not read this JSON list file, or None if the file looks fine."""
    try:
        with open(file, encoding="utf-8") as handle:
            content = json.load(handle)
    except ValueError as parse_err:
        line = getattr(parse_err, "lineno", None)
        return DataFileError(f"{file}{f':{line}' if line else ''}: malformed JSON ({parse_err}); {_EXPECTED}")
    if isinstance(content, list) and not content:
        return DataFileError(f"{file} is empty (an empty list): {_EXPECTED}")
    if isinstance(content, list):
        for i, item in enumerate(content):
            if not isinstance(item, dict):
                return DataFileError(f"{file} row {i}: a row must be a JSON object, got {type(item).__name__}")
        return None
    return DataFileError(f"{file} holds a JSON {type(content).__name__}; {_EXPECTED}")


def _scan_json_lines(files: list[str], on_error: str) -> tuple[list[dict], list[UnreadableLine]]:
    """Line-by-line reading, used when ``datasets`` cannot read a file correctly: names each bad line."""
    rows, skipped = [], []
    for file in files:
        with open(file, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    kind = "not UTF-8"
                    problem = (f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8 text (data files "
                               "must be UTF-8; re-encode the file, e.g. `iconv -f latin1 -t utf-8`)")
                else:
                    try:
                        row = json.loads(line)
                        kind, problem = ("", "") if isinstance(row, dict) else (
                            "not a JSON object", "a row must be a JSON object")
                    except ValueError as err:
                        kind, problem = "malformed JSON", f"malformed JSON line ({err})"
                if problem:
                    if on_error != "skip":
                        raise DataFileError(f"{file}:{line_no}: {problem}")
                    skipped.append(UnreadableLine(kind, f"{file}:{line_no}", problem))
                    continue
                rows.append({**row, "_source": file, "_row": line_no})
    return rows, skipped


def _with_position(ds: datasets.Dataset, source: str, first_row: int) -> datasets.Dataset:
    ds = ds.add_column("_source", [source] * len(ds))
    return ds.add_column("_row", list(range(first_row, first_row + len(ds))))


def _rows_from_scan(files: list[str], on_error: str) -> tuple[datasets.Dataset, list[UnreadableLine]]:
    rows, skipped = _scan_json_lines(files, on_error)
    if not rows:
        raise DataFileError(f"no readable rows in {', '.join(files)} ({len(skipped)} unreadable lines skipped)")
    return datasets.Dataset.from_list(rows), skipped


def _load_local(path: str, on_error: str) -> tuple[datasets.Dataset, list[UnreadableLine]]:
    files = _local_files(path)
    builder = LOCAL_BUILDERS[os.path.splitext(files[0])[1]]
    if builder == "json" and any([_check_json_file(file) for file in files]):
        return _rows_from_scan(files, on_error)
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as err:  # noqa: BLE001 - re-raised below with the file and line named
        unexplained = DataFileError(f"could not read {', '.join(files)}: {type(err).__name__}: {err}")
        if builder != "json":
            raise unexplained from err
        lists = [file for file in files if _first_non_blank(file) == b"["]
        if lists:  # a list cannot be read line by line: explain the file, or report datasets' error
            raise next(filter(None, map(_explain_json_list, lists)), unexplained) from err
        ds, skipped = _rows_from_scan(files, on_error)
        if not skipped:
            raise unexplained from err
        return ds, skipped
    if len(files) == 1:
        return _with_position(ds, files[0], 0 if _first_non_blank(files[0]) == b"[" else 1), []
    return _with_position(ds, ",".join(files), 0), []


def rename_columns(ds: datasets.Dataset, columns, path: str) -> datasets.Dataset:
    """``columns`` maps a field the formats read to this source's column holding it. A column already named
    like a mapped field is dropped: the mapping says which column holds that field."""
    mapping = dict(columns or {})
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise KeyError(f"source {path!r}: columns maps unknown field(s) {', '.join(unknown)}; "
                       f"valid: {', '.join(FIELDS)}")
    missing = sorted(column for column in mapping.values() if column not in ds.column_names)
    if missing:
        raise KeyError(f"source {path!r}: columns names {', '.join(missing)}, not among its columns "
                       f"{', '.join(c for c in ds.column_names if not c.startswith('_'))}")
    shadowed = [field for field in mapping if field in ds.column_names and field not in mapping.values()]
    if shadowed:
        log.info("%s: columns: dropping its own %s in favour of the mapped column(s)", path, ", ".join(shadowed))
        ds = ds.remove_columns(shadowed)
    renames = {column: field for field, column in mapping.items() if column != field}
    return ds.rename_columns(renames) if renames else ds


def _first_rows(ds: datasets.Dataset, max_rows, path: str) -> datasets.Dataset:
    if max_rows is None:
        return ds
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"source {path!r}: max_rows={max_rows!r} is invalid: valid values are null (every row) or "
                         "an integer > 0")
    return ds.select(range(min(max_rows, len(ds))))


def load_rows(spec, on_error: str) -> tuple[datasets.Dataset, list[UnreadableLine]]:
    """(rows, unreadable lines skipped) for one source spec: its ``columns`` renamed, and only its first
    ``max_rows`` rows (in file order, before any weighting, shuffling or eval split) when that is set."""
    path = spec.path
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        if name not in BUNDLED:
            raise KeyError(f"unknown bundled dataset {name!r}; valid: {', '.join(BUNDLED)}")
        rows = BUNDLED[name](n=spec.get("num_rows") or 2000, seed=spec.get("seed") or 0)
        ds, skipped = _with_position(datasets.Dataset.from_list(rows), path, 0), []
    elif os.path.exists(path) or any(ch in path for ch in "*?["):
        ds, skipped = _load_local(path, on_error)
    else:
        ds = datasets.load_dataset(path, spec.get("name"), split=spec.get("split") or "train")
        ds, skipped = _with_position(ds, path, 0), []
    return _first_rows(rename_columns(ds, spec.get("columns"), path), spec.get("max_rows"), path), skipped


SHORT_FORM = ("path", "format", "split", "max_rows")


def sources_overridden(overrides) -> bool:
    """Whether command-line overrides (Hydra's ``key=value`` strings) set ``data.sources`` or part of it."""
    keys = (override.split("=", 1)[0].lstrip("+~") for override in overrides)
    return any(key == "data.sources" or key.startswith("data.sources.") for key in keys)


def expand_short_form(data_cfg, sources_given: bool = False) -> None:
    """Turn ``data.path=<file, folder, glob or hub id>`` (with optional ``data.format``, default auto,
    ``data.split`` and ``data.max_rows``) into ``data.sources: [{path, format, split, max_rows}]``, in place,
    replacing the data config's sources; the short keys are then cleared, so the saved config holds one list and
    expanding again changes nothing. ``sources_given``: data.sources was also set by the user, which is an error."""
    if data_cfg.get("path") is None:
        stray = [f"data.{key}" for key in SHORT_FORM[1:] if data_cfg.get(key) is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} given without data.path: they belong to the short form "
                             "data.path=<file> (for data.sources entries, set sources.<i>.format etc.)")
        return
    if sources_given:
        raise ValueError(f"data.path={data_cfg.path} and data.sources are both given: give one, data.path (a single "
                         "source, with data.format / data.split / data.max_rows) or data.sources (a list)")
    source = {"path": data_cfg.path, "format": data_cfg.get("format") or "auto"}
    source.update({key: data_cfg[key] for key in ("split", "max_rows") if data_cfg.get(key) is not None})
    data_cfg.sources = [source]
    for key in SHORT_FORM:
        data_cfg[key] = None
