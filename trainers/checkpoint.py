"""Atomic, rotating checkpoints and resume-point lookup.

A checkpoint is a directory ``checkpoints/step_NNNNNNN`` holding Accelerate's state (model, optimizer,
scheduler, RNG of every rank) and ``trainer_state.json``. It is written under a temporary name and renamed
into place only after every rank has finished writing, so a run killed mid-save never leaves a directory that
looks complete; leftovers of such a save are removed on the next save.
"""

from __future__ import annotations

import json
import os
import shutil

PREFIX = "step_"
STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit())
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, STATE_FILE))]


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    if resume in (None, "", "none"):
        return None
    if resume in ("auto", "latest"):
        found = complete_checkpoints(output_dir)
        if found:
            return found[-1]
        if resume == "latest":
            raise FileNotFoundError(f"resume=latest but {checkpoint_dir(output_dir)} has no complete checkpoint")
        return None
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return resume


def save(accelerator, output_dir: str, step: int, state: dict, keep_last: int) -> str:
    root = checkpoint_dir(output_dir)
    final = os.path.join(root, f"{PREFIX}{step:07d}")
    tmp = os.path.join(root, f".tmp-{PREFIX}{step:07d}")
    if accelerator.is_main_process:
        for name in os.listdir(root) if os.path.isdir(root) else []:
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as handle:
            json.dump(state, handle, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str) -> dict:
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as handle:
        return json.load(handle)
