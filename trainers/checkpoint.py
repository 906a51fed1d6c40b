"""Atomic, rotating checkpoints and resume-point lookup.

A checkpoint is a directory ``checkpoints/step_NNNNNNN`` holding Accelerate's state (model, optimizer,
scheduler, RNG of every rank), ``trainer_state.json`` (step, counters, the run's resolved config) and
``manifest.json``: the relative path, size and sha256 of every other file, written by the main process after
every rank has finished writing. The directory is written under a temporary name and renamed into place only
then, so a run killed mid-save never leaves a directory that looks complete; an existing folder of the same step
is first renamed aside, then replaced, then deleted. Leftovers of an interrupted save are removed on the next.

A LoRA run's checkpoint holds only the weights that change: ``model.safetensors`` (DeepSpeed: the module state in
``pytorch_model/mp_rank_00_model_states.pt``) lacks the frozen base, which a resume rebuilds from the config (the
resume check pins every model key) and which is bit-identical to the saved run's, since it is never trained.
``trainer_state.json`` records this as ``"model_weights": "trainable"``; loading then checks that the file holds
exactly the model's trainable weights. FSDP checkpoints still hold the whole model.

Resuming verifies the manifest (sizes and checksums): ``resume=latest|auto`` take the newest checkpoint that
verifies and log each newer one skipped with its reason; an explicit checkpoint that fails is an error.

Under DeepSpeed, Accelerate's state is DeepSpeed's own checkpoint (``pytorch_model/``: every rank's ZeRO
shards of the weights and optimizer), resumable with the same number of processes. For another number,
convert it once to DeepSpeed's universal format and resume from the converted directory::

    python -m tunelab.trainers.checkpoint to-universal runs/x/checkpoints/step_0000100   # -> step_0000100_universal
    accelerate launch ... train.py ... resume=runs/x/checkpoints/step_0000100_universal
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

PREFIX = "step_"
WEIGHTS_FILE = "model.safetensors"  # Accelerate's name for the first model's weights
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
LEFTOVERS = (".tmp-", ".old-")  # an interrupted save's new folder, and a replaced folder not yet deleted

log = logging.getLogger("tunelab")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete or corrupted), with the reason."""


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Step folders holding a trainer state, oldest first (not verified: see ``verify``)."""
    return [path for path in step_dirs(output_dir) if os.path.isfile(os.path.join(path, STATE_FILE))]


def step_dirs(output_dir: str) -> list[str]:
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit())
    return [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(path: str) -> list[str]:
    found = []
    for folder, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(folder, n), path) for n in names]
    return sorted(f for f in found if f != MANIFEST)


def write_manifest(path: str) -> None:
    entries = {rel: {"size": os.path.getsize(os.path.join(path, rel)), "sha256": _sha256(os.path.join(path, rel))}
               for rel in _files(path)}
    with open(os.path.join(path, MANIFEST), "w") as handle:
        json.dump({"files": entries}, handle, indent=1)


def verify(path: str) -> str | None:
    """Why ``path`` is not an intact checkpoint, or None if every file matches its manifest entry."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        return "no such directory"
    if not os.path.isfile(manifest):
        return f"no {MANIFEST} (the save did not complete, or the file was deleted)"
    try:
        with open(manifest) as handle:
            entries = json.load(handle)["files"]
        expected = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    if STATE_FILE not in expected:
        return f"{MANIFEST} does not list {STATE_FILE}"
    for rel, (size, digest) in expected.items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != size:
            return f"{rel} has {os.path.getsize(file)} bytes, the manifest records {size} (truncated or overwritten)"
        if _sha256(file) != digest:
            return f"{rel} does not match its sha256 in the manifest (corrupted)"
    return None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from. latest|auto: the newest that verifies, each newer one skipped with a
    warning; latest fails if none verifies, auto starts fresh only if there is no step folder at all."""
    if resume in (None, "", "none"):
        return None
    if resume in ("auto", "latest"):
        rejected = []
        for path in reversed(step_dirs(output_dir)):
            reason = verify(path)
            if reason is None:
                return path
            log.warning("resume=%s: skipping checkpoint %s: %s", resume, path, reason)
            rejected.append(f"{os.path.basename(path)}: {reason}")
        if rejected:
            raise CheckpointError(
                f"resume={resume}: no checkpoint in {checkpoint_dir(output_dir)} verifies ("
                + "; ".join(rejected) + "). Resume from another checkpoint with resume=<dir>, or move them away "
                "to start over"
            )
        if resume == "latest":
            raise CheckpointError(f"resume=latest but {checkpoint_dir(output_dir)} has no complete checkpoint")
        return None
    reason = verify(resume)
    if reason is not None:
        raise CheckpointError(f"resume={resume!r} is not an intact checkpoint: {reason}. Use resume=latest to take the "
                              "newest checkpoint of output_dir that verifies, or name another one")
    return resume


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as handle:
        return json.load(handle)


def read_model_state(path: str) -> dict:
    """The model weights of the checkpoint ``path`` as one state dict (keys as Accelerate saved them), for reading a
    checkpoint's model outside a run (e.g. SFTMix's confidence scoring).

    ``model.safetensors`` (single process / DDP, the tested path) or ``pytorch_model*.bin``; DeepSpeed
    (``pytorch_model/``) and FSDP sharded (``pytorch_model_fsdp_0/``) states are consolidated on the fly with
    DeepSpeed's ``zero_to_fp32`` and torch's ``dcp_to_torch_save`` (not exercised by the tests).
    """
    import torch

    if os.path.isfile(os.path.join(path, "model.safetensors")):
        from safetensors.torch import load_file

        return load_file(os.path.join(path, "model.safetensors"))
    for name in ("pytorch_model.bin", "pytorch_model_fsdp.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
    if os.path.isdir(os.path.join(path, "pytorch_model")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(path, tag="pytorch_model")
        return {k.removeprefix("module."): v for k, v in state.items()}
    if os.path.isdir(os.path.join(path, "pytorch_model_fsdp_0")):
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(os.path.join(path, "pytorch_model_fsdp_0"), os.path.join(tmp, "state.pt"))
            state = torch.load(os.path.join(tmp, "state.pt"), map_location="cpu", weights_only=True)
        return state.get("model", state)
    raise FileNotFoundError(f"{path}: no model state found (model.safetensors, pytorch_model*.bin, "
                            "pytorch_model/ or pytorch_model_fsdp_0/)")


def save(accelerator, output_dir: str, step: int, state: dict, keep_last: int) -> str:
    from tunelab.trainers.distributed import zero_stage

    light = _stores_trainable_weights_only(accelerator)
    deepspeed = _is_deepspeed(accelerator)
    state = {**state, "num_processes": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
             "model_weights": "trainable" if light else "full"}
    root = checkpoint_dir(output_dir)
    final = os.path.join(root, f"{PREFIX}{step:07d}")
    tmp = os.path.join(root, f".tmp-{PREFIX}{step:07d}")
    aside = os.path.join(root, f".old-{PREFIX}{step:07d}")
    if accelerator.is_main_process:
        for name in os.listdir(root) if os.path.isdir(root) else []:
            if name.startswith(LEFTOVERS):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    hook = accelerator.register_save_state_pre_hook(_drop_frozen_weights) if light and not deepspeed else None
    try:
        accelerator.save_state(tmp, **({"exclude_frozen_parameters": True} if light and deepspeed else {}))
    finally:
        if hook is not None:
            hook.remove()
    if light and deepspeed:
        _drop_tied_frozen_weights(accelerator, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as handle:
            json.dump(state, handle, indent=1)
        write_manifest(tmp)
        # never delete in place: a half-deleted folder under the final name could still look complete
        if os.path.exists(final):
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        # Folders of later steps belong to a run resumed from an earlier checkpoint; they are replaced when the
        # run gets there, and must not push this one out.
        reached = [p for p in complete_checkpoints(output_dir) if int(os.path.basename(p)[len(PREFIX):]) <= step]
        for old in reached[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: str) -> dict:
    from tunelab.trainers.distributed import zero_stage

    state = read_state(path)
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
            f"tunelab.trainers.checkpoint to-universal {path}` and resume from the directory it prints"
        )
    if state.get("universal"):
        for engine in accelerator._models:  # DeepSpeed reads this flag only when loading
            engine._config.load_universal_checkpoint = True
    hook, options = None, {}
    if state.get("model_weights") == "trainable" and _is_deepspeed(accelerator):
        _check_deepspeed_trainable_weights(accelerator, path)
        options = {"load_module_strict": False}  # the frozen base stays as built from the config
    elif state.get("model_weights") == "trainable":
        hook = accelerator.register_load_state_pre_hook(lambda models, _: _load_trainable_weights(models, path))
    try:
        accelerator.load_state(path, **options)
    finally:
        if hook is not None:
            hook.remove()
    return state


def _has_adapter(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _stores_trainable_weights_only(accelerator) -> bool:
    """The policy has a LoRA adapter, and its state dict is written by Accelerate (a save hook drops the frozen
    weights) or by DeepSpeed (which leaves them out when asked; a DeepSpeed-prepared frozen reference then saves
    no weights, and is rebuilt from the config like the base). FSDP writes its own sharded files, whole."""
    from accelerate.utils import DistributedType

    models = accelerator._models
    if not models or accelerator.distributed_type in (DistributedType.FSDP, DistributedType.MEGATRON_LM):
        return False
    if _is_deepspeed(accelerator):
        return _has_adapter(models[0].module)
    return all(map(_has_adapter, models))


def _deepspeed_module_file(engine, path: str, index: int) -> str:
    """This rank's module-state file of a DeepSpeed checkpoint (one per rank under ZeRO-3, else rank 0's)."""
    return engine._get_ckpt_name(path, "pytorch_model" if index == 0 else f"pytorch_model_{index}")


def _drop_tied_frozen_weights(accelerator, path: str) -> None:
    """DeepSpeed's ``exclude_frozen_parameters`` skips each frozen parameter under its first name only, so a tied
    one (the LM head sharing the embedding) is still written under its second: drop those too (each rank in the
    file it wrote)."""
    import torch

    for i, engine in enumerate(accelerator._models):
        if not (engine.zero_optimization_partition_weights() or accelerator.is_main_process):
            continue  # without ZeRO-3 only rank 0 writes the file
        file = _deepspeed_module_file(engine, path, i)
        saved = torch.load(file, map_location="cpu", weights_only=False)
        frozen = _frozen_names(engine.module)
        if any(name in frozen for name in saved["module"]):
            saved["module"] = {name: t for name, t in saved["module"].items() if name not in frozen}
            torch.save(saved, file)


def _check_deepspeed_trainable_weights(accelerator, path: str) -> None:
    """Before a non-strict DeepSpeed load: each engine's saved module state holds exactly its trainable weights,
    so nothing the run trains is silently left at its initial value."""
    import torch

    for i, engine in enumerate(accelerator._models):
        file = _deepspeed_module_file(engine, path, i)
        _require_exactly_trainable(file, set(torch.load(file, map_location="cpu", weights_only=False)["module"]),
                                   engine.module)


def _require_exactly_trainable(file: str, saved: set[str], module) -> None:
    """A light checkpoint's weights file must hold exactly the module's trainable weights, by state-dict name."""
    expected = set(module.state_dict()) - _frozen_names(module)
    if saved != expected:
        missing, extra = sorted(expected - saved), sorted(saved - expected)
        raise CheckpointError(
            f"{file} holds the trainable weights of another model (missing: {', '.join(missing[:3]) or 'none'}; "
            f"not in this model: {', '.join(extra[:3]) or 'none'}): resume with the model and LoRA settings "
            "that wrote it")


def _frozen_names(module) -> set[str]:
    """State-dict names of the frozen parameters, a tied one under each of its names."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _drop_frozen_weights(models, weights, _output_dir) -> None:
    """Accelerate's save hook: each model's state dict loses its frozen parameters before it is written."""
    for i, model in enumerate(models):
        frozen = _frozen_names(model)
        weights[i] = {name: tensor for name, tensor in weights[i].items() if name not in frozen}


def _load_trainable_weights(models, path: str) -> None:
    """Accelerate's load hook for a checkpoint without the frozen base: each model takes its trainable weights from
    the file, which must hold exactly those, and is then removed from the list Accelerate itself loads."""
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        file = os.path.join(path, WEIGHTS_FILE if i == 0 else WEIGHTS_FILE.replace(".", f"_{i}."))
        device = next(model.parameters()).device
        saved = load_file(file, device=str(device))
        _require_exactly_trainable(file, set(saved), model)
        model.load_state_dict(saved, strict=False)
    models.clear()


def to_universal(path: str, out: str | None = None) -> str:
    """Convert a DeepSpeed checkpoint to the universal format (loadable with any number of processes)."""
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"{path} is not an intact checkpoint: {reason}")
    out = out or path.rstrip("/") + "_universal"
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp, ignore=shutil.ignore_patterns("pytorch_model*", "latest*", MANIFEST))
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
    write_manifest(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "to-universal":
        sys.exit("usage: python -m tunelab.trainers.checkpoint to-universal <checkpoint dir> [<output dir>]")
    print(to_universal(*sys.argv[2:]))
