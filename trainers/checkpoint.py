"""Atomic, rotating checkpoints and resume-point lookup.

A checkpoint is a directory ``checkpoints/step_NNNNNNN`` holding Accelerate's state (model, optimizer,
scheduler, RNG of every rank) and ``trainer_state.json``. It is written under a temporary name and renamed
into place only after every rank has finished writing, so a run killed mid-save never leaves a directory that
looks complete; leftovers of such a save are removed on the next save.

Under DeepSpeed, Accelerate's state is DeepSpeed's own checkpoint (``pytorch_model/``: every rank's ZeRO
shards of the weights and optimizer), resumable with the same number of processes. For another number,
convert it once to DeepSpeed's universal format and resume from the converted directory::

    python -m trainers.checkpoint to-universal runs/x/checkpoints/step_0000100   # -> step_0000100_universal
    accelerate launch ... train.py ... resume=runs/x/checkpoints/step_0000100_universal
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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
    from trainers.distributed import zero_stage

    state = {**state, "num_processes": accelerator.num_processes, "zero_stage": zero_stage(accelerator)}
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
    from trainers.distributed import zero_stage

    with open(os.path.join(path, STATE_FILE)) as handle:
        state = json.load(handle)
    saved_world, saved_stage = state.get("num_processes"), state.get("zero_stage", 0)
    stage = zero_stage(accelerator)
    if (saved_stage > 0) != (stage > 0):
        raise ValueError(f"{path} was saved {'with' if saved_stage else 'without'} DeepSpeed ZeRO and this run is "
                         f"{'with' if stage else 'without'}: resume with the launch configuration that wrote it")
    if stage and not state.get("universal") and (saved_world not in (None, accelerator.num_processes)
                                                 or saved_stage != stage):
        raise ValueError(
            f"{path} holds ZeRO-{saved_stage} shards of {saved_world} processes and this run is ZeRO-{stage} on "
            f"{accelerator.num_processes}: resume with the same settings, or convert it first with `python -m "
            f"trainers.checkpoint to-universal {path}` and resume from the directory it prints"
        )
    if state.get("universal"):
        for engine in accelerator._models:  # DeepSpeed reads this flag only when loading
            engine._config.load_universal_checkpoint = True
    accelerator.load_state(path)
    return state


def to_universal(path: str, out: str | None = None) -> str:
    """Convert a DeepSpeed checkpoint to the universal format (loadable with any number of processes)."""
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    out = out or path.rstrip("/") + "_universal"
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp, ignore=shutil.ignore_patterns("pytorch_model*", "latest*"))
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    os.path.join(path, "pytorch_model"), "--output_folder", os.path.join(tmp, "pytorch_model"),
                    "--inject_missing_state"], check=True)
    for name in os.listdir(tmp):  # the converter writes its own `latest_universal`; Accelerate names the tag
        if name.startswith("latest"):
            os.remove(os.path.join(tmp, name))
    with open(os.path.join(tmp, STATE_FILE)) as handle:
        state = json.load(handle)
    with open(os.path.join(tmp, STATE_FILE), "w") as handle:
        json.dump({**state, "universal": True}, handle, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "to-universal":
        sys.exit("usage: python -m trainers.checkpoint to-universal <checkpoint dir> [<output dir>]")
    print(to_universal(*sys.argv[2:]))
