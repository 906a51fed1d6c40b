"""scripts/slurm_submit.py: the generated sbatch script, run for real.

Most tests put stand-in ``sbatch``/``srun``/``scontrol`` executables on PATH that emulate a Slurm cluster
whose nodes all live on this machine:

* ``sbatch`` runs the batch script at once (synchronously) with the job's Slurm variables set; the nodes are
  ``127.0.0.[1-N]``, so every "host name" is a loopback address and resolves without DNS;
* ``scontrol show hostnames`` expands Slurm host lists; ``scontrol requeue`` records the request;
* ``srun`` starts one copy of its command per node in parallel with SLURM_NODEID/SLURM_PROCID set, waits,
  and returns the first failure (killing the other tasks, as ``--kill-on-bad-exit`` does).

The ``slurm_real`` tests use a real Slurm controller (``bash scripts/ci_slurm_setup.sh``) and are skipped
where none answers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "scripts" / "slurm_submit.py"

# settings that keep a training run to a few seconds on a CPU
FAST_TRAIN = [
    "train.progress_bar=false",
    "train.plot=false",
    "data.sources.0.num_rows=400",
]

# --------------------------------------------------------------------------- stand-in Slurm

HOSTLIST = '''\
import re


def _split_top(spec):
    parts, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        cur += ch
    if cur:
        parts.append(cur)
    return parts


def _expand_one(item):
    m = re.search(r"\\[([^\\]]+)\\]", item)
    if not m:
        return [item]
    head, tail, out = item[: m.start()], item[m.end():], []
    for part in m.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            nums = [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
        else:
            nums = [part]
        for n in nums:
            out.extend(_expand_one(head + n + tail))
    return out


def expand(spec):
    return [h for item in _split_top(spec) for h in _expand_one(item)]
'''

SBATCH = '''\
import os, re, subprocess, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
args = sys.argv[1:]
script = [a for a in args if not a.startswith("-")][-1]
opts = {}
for line in Path(script).read_text().splitlines():
    m = re.match(r"#SBATCH\\s+--([\\w-]+)(?:=(\\S+))?", line)
    if m:
        opts[m.group(1)] = m.group(2)
counter = state / "next_job_id"
job_id = int(counter.read_text())
counter.write_text(str(job_id + 1))
nodes = int(opts.get("nodes") or 1)
name = opts.get("job-name") or "sbatch"
env = dict(
    os.environ,
    SLURM_JOB_ID=str(job_id), SLURM_JOBID=str(job_id), SLURM_JOB_NAME=name,
    SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_JOB_NODELIST="127.0.0.[1-%d]" % nodes if nodes > 1 else "127.0.0.1",
    SLURM_SUBMIT_DIR=os.getcwd(), SLURM_NODEID="0", SLURM_CPUS_ON_NODE="1",
)
if opts.get("cpus-per-task"):
    env["SLURM_CPUS_PER_TASK"] = opts["cpus-per-task"]
out = (opts.get("output") or "slurm-%j.out").replace("%x", name).replace("%j", str(job_id))
mode = "a" if opts.get("open-mode") == "append" else "w"
with open(out, mode) as log:
    proc = subprocess.Popen(["bash", script], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    (state / ("job_%d.pid" % job_id)).write_text(str(proc.pid))
    rc = proc.wait()
(state / ("job_%d.rc" % job_id)).write_text(str(rc))
print(job_id if "--parsable" in args else "Submitted batch job %d" % job_id)
'''

SRUN = '''\
import os, signal, subprocess, sys, time
from hostlist import expand

args = sys.argv[1:]
opts = {}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    opts[key] = value
hosts = expand(os.environ["SLURM_JOB_NODELIST"])
nnodes = int(opts.get("--nodes") or os.environ["SLURM_NNODES"])
assert opts.get("--ntasks-per-node", "1") == "1", "the stand-in srun runs one task per node"
procs = []
for node in range(nnodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURM_NTASKS=str(nnodes), SLURMD_NODENAME=hosts[node], SLURM_STEP_NUM_NODES=str(nnodes))
    procs.append(subprocess.Popen(args, env=env, start_new_session=True))


def kill_all(sig):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


signal.signal(signal.SIGTERM, lambda s, f: kill_all(signal.SIGTERM))
signal.signal(signal.SIGINT, lambda s, f: kill_all(signal.SIGTERM))
rc, pending = 0, dict(enumerate(procs))
while pending:
    for node, p in list(pending.items()):
        code = p.poll()
        if code is None:
            continue
        del pending[node]
        if code != 0 and rc == 0:
            rc = code if code > 0 else 128 - code
            print("srun: error: %s: task %d: Exited with exit code %d" % (hosts[node], node, rc), file=sys.stderr)
            if "--kill-on-bad-exit" in opts and opts["--kill-on-bad-exit"] != "0":
                kill_all(signal.SIGTERM)
    time.sleep(0.05)
sys.exit(rc)
'''

SCONTROL = '''\
import os, sys
from pathlib import Path
from hostlist import expand

args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    print("\\n".join(expand(args[2] if len(args) > 2 else os.environ["SLURM_JOB_NODELIST"])))
elif args[:1] == ["requeue"]:
    with open(Path(os.environ["FAKE_SLURM_STATE"]) / "requeue.log", "a") as fh:
        fh.write(" ".join(args[1:]) + "\\n")
else:
    sys.exit("stand-in scontrol: unsupported command %r" % (args,))
'''

# records what `accelerate launch` was given on each node; optional failure / wait for a file
ACCELERATE = '''\
import json, os, sys, time
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
node = os.environ["SLURM_NODEID"]
keys = ["SLURM_NODEID", "SLURM_PROCID", "SLURMD_NODENAME", "MAIN_ADDR", "MAIN_PORT", "ACCELERATE_USE_CPU"]
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}
(state / ("accelerate_node%s.json" % node)).write_text(json.dumps(record))
if os.environ.get("FAKE_ACCELERATE_FAIL_NODE") == node:
    sys.exit(3)
release = os.environ.get("FAKE_ACCELERATE_WAIT_FILE")
deadline = time.time() + 60
while release and not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.05)
'''


def _write_exe(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)


class FakeSlurm:
    """A bin dir with the stand-ins, a state dir, and the environment to run them with."""

    def __init__(self, tmp_path: Path, fake_accelerate: bool):
        self.bin = tmp_path / "fake_slurm_bin"
        self.state = tmp_path / "fake_slurm_state"
        self.bin.mkdir()
        self.state.mkdir()
        (self.bin / "hostlist.py").write_text(HOSTLIST)
        _write_exe(self.bin / "sbatch", SBATCH)
        _write_exe(self.bin / "srun", SRUN)
        _write_exe(self.bin / "scontrol", SCONTROL)
        if fake_accelerate:
            _write_exe(self.bin / "accelerate", ACCELERATE)
        # a random first job id: the rendezvous port is derived from it
        (self.state / "next_job_id").write_text(str(random.randint(1000, 9000)))
        self.env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                        FAKE_SLURM_STATE=str(self.state), PYTHONUNBUFFERED="1")

    def node_record(self, node: int) -> dict:
        return json.loads((self.state / f"accelerate_node{node}.json").read_text())

    def job_rc(self, job_id: str) -> int:
        return int((self.state / f"job_{job_id}.rc").read_text())


def submit(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    m = re.search(r"submitted job (\S+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return m.group(1)


def log_of(output_dir: Path, job_name: str, job_id: str) -> str:
    return (output_dir / "slurm" / f"{job_name}-{job_id}.out").read_text()


# --------------------------------------------------------------------------- the stand-ins themselves


def test_stand_in_hostlist_expansion(tmp_path):
    fake = FakeSlurm(tmp_path, fake_accelerate=False)
    out = subprocess.run(["scontrol", "show", "hostnames", "gpu-[01-03,10],login1,n[8-9]x[1-2]"],
                         env=fake.env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["gpu-01", "gpu-02", "gpu-03", "gpu-10", "login1", "n8x1", "n8x2", "n9x1", "n9x2"]


# --------------------------------------------------------------------------- dry run / script text


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = submit(["--recipe", "sft", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                   "--time", "2-00:00:00", "--job-name", "big", "--output-dir", str(out), "--account", "proj",
                   "--qos", "high", "--accelerate-config", "recipes/accelerate/zero3.yaml", "--dry-run",
                   "--", "train.max_steps=10", "data.name=a b", "x=$HOME"], os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert not out.exists()
    for line in ["#SBATCH --job-name=big", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 f"#SBATCH --output={out}/slurm/%x-%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "PROCS_PER_NODE=8",
                 f"ACCELERATE_CONFIG={ROOT}/recipes/accelerate/zero3.yaml"]:
        assert line in text.splitlines(), line
    # address = first host of the allocation; ranks from Slurm; world = nodes x processes per node
    assert 'MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "NUM_PROCESSES=$((SLURM_NNODES * PROCS_PER_NODE))" in text
    for arg in ['--num_machines "$SLURM_NNODES"', '--machine_rank "$SLURM_NODEID"',
                '--num_processes "$NUM_PROCESSES"', '--main_process_ip "$MAIN_ADDR"',
                '--main_process_port "$MAIN_PORT"']:
        assert arg in text
    assert 'trap requeue_job USR1' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    # overrides are shell-quoted, after the fixed ones
    assert re.search(r'recipe="\$RECIPE" \\\n\s+output_dir="\$OUTPUT_DIR" \\\n\s+resume=auto \\\n'
                     r"\s+train.max_steps=10 \\\n\s+'data.name=a b' \\\n\s+'x=\$HOME'\n", text), text
    # the GPU defaults are bf16 configs: no CPU switch in a GPU job
    assert "ACCELERATE_USE_CPU" not in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_options_are_checked(tmp_path):
    base = ["--recipe", "sft", "--output-dir", str(tmp_path / "r"), "--dry-run"]
    bad = [["--nodes", "0"], ["--time", "tomorrow"], ["--job-name", "a b"], ["--port", "80"],
           ["--accelerate-config", "nope.yaml"], ["--", "output_dir=/elsewhere"], ["--", "resume=latest"]]
    for extra in bad:
        proc = submit(base + extra, os.environ.copy())
        assert proc.returncode == 2, (extra, proc.stdout)
    proc = submit(base + ["--no-requeue", "--port", "29500"], os.environ.copy())
    assert proc.returncode == 0
    assert "#SBATCH --no-requeue" in proc.stdout and "trap requeue_job" not in proc.stdout
    assert "MAIN_PORT=29500" in proc.stdout


# --------------------------------------------------------------------------- wiring, with a stand-in accelerate


def test_each_node_gets_its_rank_and_the_shared_rendezvous(tmp_path):
    fake = FakeSlurm(tmp_path, fake_accelerate=True)
    out = tmp_path / "run"
    overrides = ["train.max_steps=7", "data.name=with space", "model.note='quoted'", "x=$NOT_EXPANDED;echo hi"]
    proc = submit(["--recipe", "sft", "--nodes", "3", "--gpus-per-node", "4", "--output-dir", str(out),
                   "--job-name", "wiring", "--accelerate-config", "recipes/accelerate/zero2.yaml",
                   "--setup", "export TUNELAB_SETUP_RAN=yes", "--", *overrides], fake.env)
    assert proc.returncode == 0, proc.stderr
    job = job_id_of(proc)
    assert fake.job_rc(job) == 0, log_of(out, "wiring", job)
    script = out / "slurm" / "wiring.sbatch"
    assert script.is_file() and os.access(script, os.X_OK)
    port = str(20000 + int(job) % 10000)
    for node in range(3):
        rec = fake.node_record(node)
        argv = rec["argv"]
        assert argv[0] == "launch"
        flags = dict(zip(argv[1::2], argv[2::2]))
        assert flags["--config_file"] == str(ROOT / "recipes" / "accelerate" / "zero2.yaml")
        assert flags["--num_machines"] == "3"
        assert flags["--machine_rank"] == str(node)
        assert flags["--num_processes"] == "12"
        assert flags["--main_process_ip"] == "127.0.0.1"  # the first host of 127.0.0.[1-3]
        assert flags["--main_process_port"] == port
        i = argv.index("train.py")
        assert argv[i + 1:] == ["recipe=sft", f"output_dir={out}", "resume=auto", *overrides]
        assert rec["cwd"] == str(ROOT)
        assert rec["env"]["SLURMD_NODENAME"] == f"127.0.0.{node + 1}"
    log = log_of(out, "wiring", job)
    assert f"job {job} (restart 0) on 127.0.0.[1-3]" in log
    assert f"3 node(s) x 4 process(es), rendezvous 127.0.0.1:{port}" in log
    assert "srun finished with exit code 0" in log


def test_a_failing_node_fails_the_job(tmp_path):
    fake = FakeSlurm(tmp_path, fake_accelerate=True)
    out = tmp_path / "run"
    env = dict(fake.env, FAKE_ACCELERATE_FAIL_NODE="1", FAKE_ACCELERATE_WAIT_FILE=str(tmp_path / "never"))
    proc = submit(["--recipe", "sft", "--nodes", "2", "--cpu", "--output-dir", str(out), "--job-name", "fail"], env)
    assert proc.returncode == 0, proc.stderr
    job = job_id_of(proc)
    assert fake.job_rc(job) == 3  # node 1's exit code; node 0 (still waiting) was killed
    assert "srun finished with exit code 3" in log_of(out, "fail", job)


def test_usr1_requeues_the_job_and_the_script_keeps_waiting(tmp_path):
    fake = FakeSlurm(tmp_path, fake_accelerate=True)
    out = tmp_path / "run"
    release = tmp_path / "release"
    env = dict(fake.env, FAKE_ACCELERATE_WAIT_FILE=str(release))
    cmd = [sys.executable, str(SUBMIT), "--recipe", "sft", "--nodes", "2", "--cpu", "--output-dir", str(out),
           "--job-name", "pre", "--signal-seconds", "300"]
    submitter = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        records = [fake.state / "accelerate_node0.json", fake.state / "accelerate_node1.json"]
        while not all(r.exists() for r in records):
            assert time.time() < deadline, "the nodes never started"
            assert submitter.poll() is None, submitter.communicate()
            time.sleep(0.05)
        (pid_file,) = fake.state.glob("job_*.pid")
        job = pid_file.stem.split("_")[1]
        os.kill(int(pid_file.read_text()), signal.SIGUSR1)  # what Slurm does --signal seconds before the limit
        while not (fake.state / "requeue.log").exists():
            assert time.time() < deadline, "the trap did not call scontrol requeue"
            time.sleep(0.05)
        release.touch()
        stdout, stderr = submitter.communicate(timeout=60)
    finally:
        release.touch()
        if submitter.poll() is None:
            submitter.kill()
    assert submitter.returncode == 0, stderr
    assert (fake.state / "requeue.log").read_text().split() == [job]
    assert fake.job_rc(job) == 0  # the batch shell went on waiting for srun after the trap
    log = log_of(out, "pre", job)
    assert f"USR1: requeueing job {job}" in log
    assert "srun finished with exit code 0" in log
    assert "#SBATCH --signal=B:USR1@300" in (out / "slurm" / "pre.sbatch").read_text()


# --------------------------------------------------------------------------- real training through the script


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "trainer_state.json").is_file())


@pytest.mark.slow
def test_two_nodes_train_for_real_and_a_resubmission_resumes(tmp_path):
    """2 stand-in nodes x 1 CPU process (gloo) run the real train.py; then the same job again resumes."""
    if not (ROOT / "train.py").is_file():
        pytest.fail("train.py is missing at the repository root")
    fake = FakeSlurm(tmp_path, fake_accelerate=False)
    out = tmp_path / "run"
    common = ["--recipe", "sft", "--nodes", "2", "--cpu", "--cpus-per-task", "1", "--output-dir", str(out),
              "--job-name", "tiny"]
    train = [*FAST_TRAIN, "train.save_every=2", "train.eval_every=2", "train.log_every=1"]
    proc = submit([*common, "--", "train.max_steps=4", *train], fake.env)
    assert proc.returncode == 0, proc.stderr
    job = job_id_of(proc)
    log = log_of(out, "tiny", job)
    assert fake.job_rc(job) == 0, log[-5000:]
    assert "global batch 16 = 8 micro x 2 ranks" in log  # both nodes joined one process group
    assert _checkpoint_steps(out) == [2, 4]
    assert (out / "checkpoints" / "step_0000004" / "random_states_1.pkl").is_file()  # rank 1 saved its RNG
    assert (out / "export" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert {r["step"] for r in records if r["split"] == "eval"} >= {0, 2, 4}

    # the same job again (as after a requeue), asked to go further: resume=auto picks up step 4
    proc = submit([*common, "--", "train.max_steps=6", *train], fake.env)
    assert proc.returncode == 0, proc.stderr
    job2 = job_id_of(proc)
    log2 = log_of(out, "tiny", job2)
    assert fake.job_rc(job2) == 0, log2[-5000:]
    assert re.search(r"resumed from \S+step_0000004 at step 4", log2), log2[-5000:]
    assert _checkpoint_steps(out)[-1] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- a real Slurm controller


def _real_slurm_nodes() -> int:
    """Idle nodes of a real Slurm controller answering here (0 if none)."""
    if not (shutil.which("sinfo") and shutil.which("sbatch") and shutil.which("scontrol")):
        return 0
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if proc.returncode != 0:
        return 0
    return sum(1 for line in proc.stdout.splitlines() if line.split()[-1:] in (["idle"], ["mixed"]))


def _job_state(job: str) -> dict:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=15)
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slurm_real
@pytest.mark.slow
def test_real_slurm_two_nodes_preempted_requeued_and_resumed(tmp_path):
    """On a real controller (scripts/ci_slurm_setup.sh): train on 2 nodes, send the job the USR1 warning
    mid-run, and check that it requeues itself and finishes from its latest checkpoint."""
    if _real_slurm_nodes() < 2:
        pytest.skip("no real Slurm controller with 2 idle nodes (run: sudo bash scripts/ci_slurm_setup.sh)")
    out = tmp_path / "run"
    proc = submit(["--recipe", "sft", "--nodes", "2", "--cpu", "--cpus-per-task", "1", "--time", "15",
                   "--output-dir", str(out), "--job-name", "real", "--",
                   "train.max_steps=30", "train.save_every=3", "train.eval_every=0", "train.log_every=10",
                   *FAST_TRAIN], os.environ.copy())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = job_id_of(proc)
    try:
        # first run: wait for a complete checkpoint, then warn the batch shell as Slurm does before the limit
        _wait(lambda: _checkpoint_steps(out), 240, "the first checkpoint")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=15)
        _wait(lambda: int(_job_state(job).get("Restarts", 0)) >= 1, 120, "the requeue")

        def started_again():
            state = _job_state(job).get("JobState")
            if state == "PENDING":  # Slurm holds a requeued job back for a while (BeginTime): start it now
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True,
                               timeout=15)
            return state not in ("PENDING", "REQUEUED", "COMPLETING", "REQUEUE_HOLD", None)

        _wait(started_again, 240, "the requeued job to start")
        state = _wait(lambda: (s := _job_state(job)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                           "TIMEOUT", "NODE_FAIL") and s,
                      300, "the requeued job to finish")
    finally:
        if _job_state(job).get("JobState") in ("PENDING", "RUNNING", "REQUEUED"):
            subprocess.run(["scancel", job], timeout=15)
    log = log_of(out, "real", job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-5000:]
    assert f"USR1: requeueing job {job}" in log
    assert f"job {job} (restart 1)" in log
    m = re.search(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert m and int(m.group(2)) >= 2, log[-5000:]
    assert _checkpoint_steps(out)[-1] == 30
    assert (out / "export" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- Hydra sweeps via submitit


def test_submitit_slurm_launcher_composes():
    """`python train.py -m hydra/launcher=submitit_slurm ...` composes with the plugin installed."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.core.global_hydra import GlobalHydra

    from tunelab.trainers.config_schema import compose_config

    try:
        cfg = compose_config([
            "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=1", "hydra.launcher.gpus_per_node=8",
            "hydra.launcher.tasks_per_node=1", "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=240", "recipe=sft", "train.lr=1e-4",
        ], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.partition, launcher.timeout_min) == (1, 8, "gpu", 240)
    assert cfg.train.lr == pytest.approx(1e-4)


def test_sbatch_text_is_readable():
    """The generated script stays a short, plain file a person can edit (no generated one-liners)."""
    proc = submit(["--recipe", "sft", "--output-dir", "/tmp/x", "--dry-run"], os.environ.copy())
    lines = proc.stdout.splitlines()
    assert len(lines) < 110
    assert max(map(len, lines)) < 120
    assert textwrap.dedent(proc.stdout).startswith("#!/bin/bash\n# tunelab training job")
