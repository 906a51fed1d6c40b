"""Ctrl-C and preemption: the running step finishes, a verified checkpoint is written, the process exits with
128 + the signal's number and says how to resume; the run resumes from that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, read_metrics

from tunelab.trainers import checkpoint
from tunelab.trainers.interrupt import StopRequest


def test_a_signal_only_raises_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest().listening() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # without the handler this would end the test process
        time.sleep(0.1)
        assert stop.signal_number == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before  # a second SIGTERM would act at once
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_exits_non_zero_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "train.py", f"output_dir={out}", "train.max_steps=400", "train.save_every=1000",
            "train.log_every=1", "train.eval_every=0", "train.progress_bar=false", "train.plot=false",
            "export.enabled=false", "train.scheduler=constant", "train.warmup_ratio=0"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "[train step 2]" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGINT, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    stopped = [line for line in log.splitlines() if "stopped by SIGINT after step" in line]
    assert len(stopped) == 1 and f"output_dir={out} resume=latest" in stopped[0]
    step = int(stopped[0].split("after step ")[1].split("/")[0])
    assert 2 <= step < 400
    saved = checkpoint.complete_checkpoints(str(out))
    assert saved and saved[-1].endswith(f"step_{step:07d}")
    assert [r["step"] for r in read_metrics(str(out))] == list(range(1, step + 1))  # the last steps are logged
    resumed = subprocess.run([*args[:3], f"train.max_steps={step + 2}", *args[4:], "resume=latest"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert [r["step"] for r in read_metrics(str(out))] == list(range(1, step + 3))
