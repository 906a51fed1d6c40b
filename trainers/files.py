"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import json
import os


def write_json_atomic(path: str, obj) -> None:
    """``json.dump(obj)`` to ``path`` through a per-process temporary file renamed over it (os.replace is
    atomic on one file system), creating the parent folder if needed. A failed dump leaves ``path`` as it was
    and no temporary file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            json.dump(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
