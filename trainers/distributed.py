"""Builds the run's process group and Accelerator, the DeepSpeed plugin included, from the launcher's settings
(and ends the group once the run is done).

``accelerate launch --config_file recipes/accelerate/<ddp|zero2|zero3|...>.yaml train.py ...`` tells the trainer
what to run through environment variables; this module turns them into one ``Accelerator`` whose batch
geometry is ours:

- On a CPU, Accelerate's DeepSpeed mode starts no process group and counts one process. ``init_state`` then
  starts DeepSpeed's communication on gloo itself, so every rank knows the world size and DeepSpeed runs
  ZeRO-2/3 across CPU processes (tests and laptops) exactly as across GPUs.
- DeepSpeed's ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps`` and ``train_batch_size``
  come from ``train.micro_batch_size``, the derived accumulation and ``train.global_batch_size`` (all in
  examples, i.e. pairs for preference data; DeepSpeed uses them for its consistency check and bookkeeping
  only, since the trainer feeds it micro-batches itself), ``gradient_clipping`` from ``train.max_grad_norm``.
  A DeepSpeed JSON file (``--deepspeed_config_file``) may leave these ``auto``; numbers that disagree with the
  recipe are an error rather than a silently different run.
- Mixed precision: the Accelerator gets what ``trainers/precision.py`` resolved from ``model.dtype`` and
  ``train.mixed_precision`` (``auto`` or null there takes the launcher's ``mixed_precision``).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DeepSpeedPlugin, DistributedType

log = logging.getLogger("tunelab")

# DeepSpeed keys that Accelerate can only fill from a model's ``config.hidden_size``; our module passed to
# ``prepare`` is the log-prob wrapper, so they are filled here from the wrapped model's config.
HIDDEN_SIZE_KEYS = {
    "zero_optimization.reduce_bucket_size": lambda h: h * h,
    "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
}


def deepspeed_launched() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def init_state() -> PartialState:
    """The process group of this run: NCCL on GPUs, gloo on CPUs, DeepSpeed's own communication under DeepSpeed."""
    cpu = not torch.cuda.is_available()
    if cpu and deepspeed_launched() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        _skip_shm_kernel()
        # With cpu=True Accelerate would ignore DeepSpeed; with cpu=False and no backend it counts a single
        # process. Naming gloo makes it call deepspeed.init_distributed(dist_backend="gloo") and count ranks.
        return PartialState(cpu=False, backend="gloo")
    return PartialState(cpu=cpu)


def end_process_group() -> None:
    """Every rank, once a run has finished: wait for all, then destroy the process group. Left to interpreter
    exit, gloo's worker threads can outlive the group and abort a finished rank with SIGABRT ("terminate called
    without an active exception", pytorch/pytorch#190489). Not called after a failure: a rank still inside a
    collective would leave the others waiting here."""
    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()


def exit_run(exit_code: int = 0) -> None:
    """The end of ``train.py`` once a run has finished (or stopped cleanly, ``exit_code`` != 0): the process group is
    ended as above, logs and streams are flushed, and a process that was part of a group leaves with ``os._exit``,
    skipping the interpreter's teardown. Objects still holding the group (the DeepSpeed engine, its async work)
    are destroyed there, after the interpreter has begun to shut down, and gloo's threads can then abort a finished
    rank (SIGABRT, "terminate called without an active exception": seen once in a test run of ZeRO-3 DPO,
    after the run's last line; pytorch/pytorch PR 179291 describes the mechanism), which would turn a finished run
    into a failed job for the launcher and Slurm. Everything the run writes is closed before this point (trackers
    finished, checkpoints and exports renamed into place). A single process without a group returns (code 0) or
    exits normally."""
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    end_process_group()
    if not grouped:
        if exit_code:
            raise SystemExit(exit_code)
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous (MASTER_PORT, --main_process_port)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def reset_accelerate() -> None:
    """Forget a finished Trainer's Accelerate state (a process-wide singleton), so that the next Trainer in the
    same process (the next round, demo stage or test) builds its own Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _skip_shm_kernel() -> None:
    """On a CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce kernel at start (minutes
    on a small machine, and a C++ compiler needed) that only its inference all-reduce uses, never ZeRO training.
    Skip it unless TUNELAB_DS_SHM_KERNEL=1."""
    if os.environ.get("TUNELAB_DS_SHM_KERNEL", "0") == "1":
        return
    # (not `import deepspeed.comm.torch as m`: that name resolves to the torch package re-exported by deepspeed.comm)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _check_explicit(config: dict, key: str, ours, hint: str) -> None:
    value = config.get(key)
    if value is None or value == "auto":
        return
    if float(value) != float(ours):
        raise ValueError(
            f"the DeepSpeed config sets {key}={value} but this run needs {key}={ours} ({hint}); set it to "
            f'"auto" (or remove it) in the DeepSpeed config file, or change the recipe to match'
        )


def configure_deepspeed(plugin: DeepSpeedPlugin, train_cfg, accumulation: int, num_processes: int) -> dict:
    """Fill (or check) the batch geometry and clipping in the plugin's DeepSpeed config, in place."""
    config = plugin.deepspeed_config
    clip = float(train_cfg.max_grad_norm or 0.0)  # 0 disables clipping in DeepSpeed
    geometry = f"train.global_batch_size={train_cfg.global_batch_size} = micro {train_cfg.micro_batch_size} x " \
               f"{num_processes} processes x {accumulation} accumulation"
    _check_explicit(config, "train_micro_batch_size_per_gpu", train_cfg.micro_batch_size, geometry)
    _check_explicit(config, "gradient_accumulation_steps", accumulation, geometry)
    _check_explicit(config, "train_batch_size", train_cfg.global_batch_size, geometry)
    _check_explicit(config, "gradient_clipping", clip, "train.max_grad_norm")
    config["train_micro_batch_size_per_gpu"] = int(train_cfg.micro_batch_size)
    config["gradient_accumulation_steps"] = int(accumulation)
    config["train_batch_size"] = int(train_cfg.global_batch_size)
    config["gradient_clipping"] = clip
    if train_cfg.get("sequence_parallel", 1) > 1:  # DeepSpeed's batch check counts data-parallel ranks only
        config["sequence_parallel_size"] = int(train_cfg.sequence_parallel)
    plugin.gradient_accumulation_steps = int(accumulation)
    plugin.gradient_clipping = clip
    return config


def build_accelerator(train_cfg, state: PartialState, accumulation: int, project_dir: str, mixed_precision: str,
                      log_with=None) -> Accelerator:
    deepspeed = state.distributed_type == DistributedType.DEEPSPEED
    plugin = None
    if deepspeed:
        if train_cfg.on_nonfinite == "skip":
            raise ValueError(
                "train.on_nonfinite=skip is not supported under DeepSpeed: its optimizer step runs inside the "
                "backward of the last micro-batch, before the step's loss is known; use on_nonfinite=stop"
            )
        plugin = DeepSpeedPlugin()  # from the launcher's environment, as Accelerate itself would build it
        configure_deepspeed(plugin, train_cfg, accumulation, state.num_processes)
    acc = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation, cpu=state.device.type == "cpu" and not deepspeed,
        deepspeed_plugin=plugin, log_with=log_with, project_dir=project_dir,
    )
    if acc.gradient_accumulation_steps != accumulation:
        raise ValueError(
            f"the launcher sets gradient accumulation to {acc.gradient_accumulation_steps} but train.global_batch_"
            f"size={train_cfg.global_batch_size} needs {accumulation} (micro {train_cfg.micro_batch_size} x "
            f"{state.num_processes} processes); drop --gradient_accumulation_steps / ACCELERATE_GRADIENT_"
            "ACCUMULATION_STEPS: tunelab derives it"
        )
    return acc


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def fill_model_keys(accelerator, model) -> None:
    """Before ``prepare``: DeepSpeed ``auto`` values that depend on the model's hidden size."""
    if not is_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for key, value in HIDDEN_SIZE_KEYS.items():
        if plugin.is_auto(key):
            if hidden is None:
                raise ValueError(f"the DeepSpeed config leaves {key}=auto but the model has no config.hidden_size; "
                                 "set a number in the DeepSpeed config file")
            node, leaf = plugin.hf_ds_config.find_config_node(key)
            node[leaf] = value(hidden)


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (its data lives in shards across the ranks)."""
    return hasattr(param, "ds_id")
