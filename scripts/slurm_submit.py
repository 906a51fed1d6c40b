#!/usr/bin/env python3
"""Submit a tunelab training run to a Slurm cluster.

Writes a plain, commented sbatch script into ``<output-dir>/slurm/`` and hands
it to ``sbatch``. The job asks for N nodes with one Slurm task per node; that
task runs ONE ``accelerate launch`` per node, which starts one training process
per GPU. The first node of the allocation hosts the rendezvous.

Example::

    python scripts/slurm_submit.py --recipe sft --nodes 2 --gpus-per-node 8 \\
        --accelerate-config recipes/accelerate/zero3.yaml \\
        --partition gpu --time 24:00:00 --output-dir runs/sft-7b \\
        -- train.max_steps=2000 train.global_batch_size=256

Everything after ``--`` is passed to ``train.py`` as Hydra overrides, after
``recipe=... output_dir=... resume=auto``. The job is submitted with
``--requeue`` and ``--signal=B:USR1@<seconds>``: when Slurm warns the batch
shell (time limit close, or preemption where the site signals it), the script
requeues itself and the next run continues from the newest complete checkpoint
through ``resume=auto``.

``--dry-run`` prints the script and submits nothing. ``--cpu`` makes a CPU-only
job (no GPU request, gloo); it exists for testing the wiring.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ACCELERATE_CONFIG = "recipes/accelerate/ddp.yaml"

_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` at the first ``--``: (options, Hydra overrides)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slurm_submit.py",
        description="Write an sbatch script for a tunelab run and submit it. "
        "Hydra overrides for train.py go after a lone `--`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--recipe", required=True, help="recipe name passed as recipe=<name>")
    p.add_argument("--output-dir", required=True, help="run directory (checkpoints, logs, sbatch script)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs requested per node")
    p.add_argument(
        "--procs-per-node",
        type=int,
        default=None,
        help="training processes per node (default: --gpus-per-node, or 1 with --cpu)",
    )
    p.add_argument(
        "--accelerate-config",
        default=DEFAULT_ACCELERATE_CONFIG,
        help="accelerate config file; a relative path is looked up from the current directory, "
        "then --workdir, then this repository",
    )
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", default="24:00:00", help="time limit (Slurm syntax, e.g. 2-00:00:00)")
    p.add_argument("--job-name", default=None, help="job name (default: tunelab-<recipe>)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="rendezvous port on the first node (default: derived from the job id, 20000-29999)",
    )
    p.add_argument("--account", default=None, help="Slurm account to charge")
    p.add_argument("--qos", default=None, help="Slurm QOS")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node for the one task per node")
    p.add_argument("--mem", default=None, help="memory per node (Slurm syntax, e.g. 500G; 0 = all)")
    p.add_argument(
        "--exclusive",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask for whole nodes (default: on for GPU jobs, off with --cpu)",
    )
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="send USR1 to the batch shell this many seconds before the time limit (it requeues the job)",
    )
    p.add_argument("--no-requeue", action="store_true", help="do not requeue on preemption / time limit")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPT",
        help="extra #SBATCH option, e.g. --sbatch-arg=--constraint=h100 (repeatable)",
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="CMD",
        help="shell line run before launching, e.g. 'source .venv/bin/activate' (repeatable)",
    )
    p.add_argument(
        "--accelerate-args",
        default="",
        help="extra arguments for `accelerate launch`, as one shell-quoted string",
    )
    p.add_argument("--workdir", default=str(REPO_ROOT), help="checkout holding train.py")
    p.add_argument("--cpu", action="store_true", help="CPU-only job (no GPUs, gloo); for testing")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, write and submit nothing")
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.cpu:
        args.gpus_per_node = 0
    elif args.gpus_per_node < 1:
        parser.error("--gpus-per-node must be >= 1 (use --cpu for a CPU-only job)")
    if args.procs_per_node is None:
        args.procs_per_node = args.gpus_per_node if not args.cpu else 1
    if args.procs_per_node < 1:
        parser.error("--procs-per-node must be >= 1")
    if args.exclusive is None:
        args.exclusive = not args.cpu
    if args.job_name is None:
        args.job_name = f"tunelab-{args.recipe}"
    if not _JOB_NAME_RE.match(args.job_name):
        parser.error(f"--job-name {args.job_name!r}: use letters, digits and ._+- only")
    if args.time and not _TIME_RE.match(args.time):
        parser.error(f"--time {args.time!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS, ...)")
    if args.port is not None and not (1024 <= args.port <= 65535):
        parser.error("--port must be in 1024..65535")
    if args.signal_seconds < 1:
        parser.error("--signal-seconds must be >= 1")
    if not re.match(r"^[A-Za-z0-9_./+-]+$", args.recipe):
        parser.error(f"--recipe {args.recipe!r}: unexpected characters")
    for opt in args.sbatch_arg:
        if not opt.startswith("-") or "\n" in opt:
            parser.error(f"--sbatch-arg {opt!r}: expected one option such as --constraint=h100")
    for line in args.setup:
        if "\n" in line:
            parser.error("--setup takes one line per use")


def resolve_paths(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).expanduser().resolve()
    args.workdir = workdir
    args.output_dir = Path(args.output_dir).expanduser().resolve()
    cfg = Path(args.accelerate_config).expanduser()
    if not cfg.is_absolute():
        # a relative path may be meant from here, from the checkout, or from this repo
        candidates = [Path.cwd() / cfg, workdir / cfg, REPO_ROOT / cfg]
        cfg = next((c for c in candidates if c.is_file()), workdir / cfg)
    args.accelerate_config = cfg.resolve()


def _q(value: object) -> str:
    return shlex.quote(str(value))


def render_script(args: argparse.Namespace, overrides: list[str]) -> str:
    """Return the text of the sbatch script for ``args`` and Hydra ``overrides``."""
    slurm_dir = args.output_dir / "slurm"
    script_path = slurm_dir / f"{args.job_name}.sbatch"
    now = _dt.datetime.now().replace(microsecond=0).isoformat()

    L: list[str] = []
    add = L.append
    add("#!/bin/bash")
    add(f"# tunelab training job, generated by scripts/slurm_submit.py on {now}.")
    add("# Written to be read and edited: change the settings below and resubmit with")
    add(f"#     sbatch {_q(script_path)}")
    add("#")
    add("# One Slurm task per node runs one `accelerate launch`, which starts the")
    add("# per-GPU training processes on that node. Machine rank = SLURM_NODEID.")
    add(f"#SBATCH --job-name={args.job_name}")
    add(f"#SBATCH --nodes={args.nodes}")
    add("#SBATCH --ntasks-per-node=1")
    if not args.cpu:
        add(f"#SBATCH --gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        add(f"#SBATCH --cpus-per-task={args.cpus_per_task}")
    if args.mem is not None:
        add(f"#SBATCH --mem={args.mem}")
    if args.exclusive:
        add("#SBATCH --exclusive")
    if args.partition:
        add(f"#SBATCH --partition={args.partition}")
    if args.account:
        add(f"#SBATCH --account={args.account}")
    if args.qos:
        add(f"#SBATCH --qos={args.qos}")
    if args.time:
        add(f"#SBATCH --time={args.time}")
    add("# stdout+stderr of every run of this job; a requeued job appends to the same file")
    add(f"#SBATCH --output={slurm_dir}/%x-%j.out")
    add("#SBATCH --open-mode=append")
    if not args.no_requeue:
        add("# requeue after preemption/node failure; USR1 to this shell before the time limit")
        add("#SBATCH --requeue")
        add(f"#SBATCH --signal=B:USR1@{args.signal_seconds}")
    else:
        add("#SBATCH --no-requeue")
    for opt in args.sbatch_arg:
        add(f"#SBATCH {opt}")
    add("")
    add("set -uo pipefail")
    add("")
    add("# ------------------------------------------------------------------ settings")
    add(f"WORKDIR={_q(args.workdir)}")
    add(f"RECIPE={_q(args.recipe)}")
    add(f"OUTPUT_DIR={_q(args.output_dir)}")
    add(f"ACCELERATE_CONFIG={_q(args.accelerate_config)}")
    add("# training processes per node (one per GPU)")
    add(f"PROCS_PER_NODE={args.procs_per_node}")
    if args.port is not None:
        add(f"MAIN_PORT={args.port}")
    else:
        add("# rendezvous port: derived from the job id so jobs sharing a node do not collide")
        add("MAIN_PORT=$((20000 + SLURM_JOB_ID % 10000))")
    if args.cpu:
        add("# CPU-only job: accelerate uses gloo when ACCELERATE_USE_CPU is set")
        add("export ACCELERATE_USE_CPU=true")
    add("")
    if args.setup:
        add("# ------------------------------------------------------------------ environment")
        L.extend(args.setup)
        add("")
    add("# ------------------------------------------------------------------ rendezvous")
    add("# The first host of the allocation is machine rank 0 and hosts the rendezvous.")
    add('MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    add("NUM_PROCESSES=$((SLURM_NNODES * PROCS_PER_NODE))")
    add("export WORKDIR RECIPE OUTPUT_DIR ACCELERATE_CONFIG MAIN_ADDR MAIN_PORT NUM_PROCESSES")
    add("")
    add("echo \"[$(date '+%F %T')] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST\"")
    add('echo "  $SLURM_NNODES node(s) x $PROCS_PER_NODE process(es), rendezvous $MAIN_ADDR:$MAIN_PORT"')
    add("")
    add("# ------------------------------------------------------------------ per node")
    add("# srun runs this once on every node. resume=auto continues from the newest")
    add("# complete checkpoint in OUTPUT_DIR, so a requeued job picks up where it stopped.")
    add("launch_node() {")
    add('  cd "$WORKDIR" || exit 1')
    launch = [
        "exec accelerate launch",
        '--config_file "$ACCELERATE_CONFIG"',
    ]
    if args.cpu:
        launch.append("--mixed_precision no")
    launch += [
        '--num_machines "$SLURM_NNODES"',
        '--machine_rank "$SLURM_NODEID"',
        '--num_processes "$NUM_PROCESSES"',
        '--main_process_ip "$MAIN_ADDR"',
        '--main_process_port "$MAIN_PORT"',
    ]
    extra = shlex.split(args.accelerate_args)
    if extra:
        launch.append(" ".join(_q(a) for a in extra))
    launch += [
        "train.py",
        'recipe="$RECIPE"',
        'output_dir="$OUTPUT_DIR"',
        "resume=auto",
    ]
    launch += [_q(o) for o in overrides]
    for i, part in enumerate(launch):
        indent = "  " if i == 0 else "    "
        tail = " \\" if i < len(launch) - 1 else ""
        add(f"{indent}{part}{tail}")
    add("}")
    add("export -f launch_node")
    add("")
    add("# ------------------------------------------------------------------ requeue")
    if not args.no_requeue:
        add("# Slurm sends USR1 to this shell --signal seconds before the time limit (sites")
        add("# may also send it before preemption). Put the job back in the queue; the")
        add("# requeued run starts this script again and training resumes (resume=auto).")
        add("requeue_job() {")
        add("  echo \"[$(date '+%F %T')] USR1: requeueing job $SLURM_JOB_ID\"")
        add('  scontrol requeue "$SLURM_JOB_ID"')
        add("}")
        add("trap requeue_job USR1")
    else:
        add("# (requeue disabled with --no-requeue)")
    add("")
    add("# srun runs in the background and this shell waits for it, so that signals")
    add("# (the requeue trap above) are handled while training runs.")
    add('cd "$WORKDIR" || exit 1')
    cpus = '"${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"'
    add('srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 \\')
    add(f"  --cpus-per-task={cpus} \\")
    add("  --kill-on-bad-exit=1 --export=ALL \\")
    add("  bash -c launch_node &")
    add("SRUN_PID=$!")
    add("# `wait` returns early (status > 128) when a trapped signal arrives: keep waiting.")
    add("while :; do")
    add('  wait "$SRUN_PID"')
    add("  rc=$?")
    add('  if [ "$rc" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi')
    add("  break")
    add("done")
    add("echo \"[$(date '+%F %T')] srun finished with exit code $rc\"")
    add('exit "$rc"')
    return "\n".join(L) + "\n"


def submit(script_path: Path, workdir: Path) -> str:
    """Run sbatch on ``script_path``; return the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script_path)],
        check=False,
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"sbatch failed with exit code {proc.returncode}")
    out = proc.stdout.strip().splitlines()
    if not out:
        raise SystemExit("sbatch printed no job id")
    return out[-1].split(";")[0].strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, overrides = split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(opts)
    validate(args, parser)
    resolve_paths(args)
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key in {"recipe", "output_dir", "resume"}:
            parser.error(f"override {o!r}: set {key} with the script's own option, not after --")
    if not (args.workdir / "train.py").is_file():
        print(f"warning: {args.workdir}/train.py does not exist (yet)", file=sys.stderr)
    if not args.accelerate_config.is_file():
        parser.error(f"--accelerate-config {args.accelerate_config}: no such file")

    text = render_script(args, overrides)
    if args.dry_run:
        sys.stdout.write(text)
        return 0

    slurm_dir = args.output_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script_path = slurm_dir / f"{args.job_name}.sbatch"
    script_path.write_text(text)
    os.chmod(script_path, 0o755)
    job_id = submit(script_path, args.workdir)
    print(f"submitted job {job_id}")
    print(f"  script: {script_path}")
    print(f"  log:    {slurm_dir}/{args.job_name}-{job_id}.out")
    print(f"  run:    {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
