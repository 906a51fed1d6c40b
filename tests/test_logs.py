"""What a run prints: no known-harmless library warning or progress bar, other warnings still shown, and in a
two-process launch every line once (from rank 0)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
from conftest import ROOT, two_process_launch

HARMLESS = ("Removed shared tensor", "Setting accelerator to CPU", "is_gradient_checkpointing",
            "Could not find a config file", "were not passed to `accelerate launch`", "examples/s", "Writing model")
QUICK = ["train.progress_bar=false", "train.plot=false", "data.sources.0.num_rows=200", "train.max_steps=2"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("model", [["model.lora.enabled=true"], []], ids=["lora", "full"])
def test_a_run_prints_none_of_the_known_harmless_messages(tmp_path, model):
    """The LoRA run meets peft's and transformers' warnings, the full run's checkpoint has a tied LM head; both
    import DeepSpeed for their export on a machine without a GPU."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={tmp_path}", *QUICK, *model],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    assert "run dir" in printed and "exported to" in printed  # our own lines are there
    assert [m for m in HARMLESS if m in printed] == [], printed


SHOW_OTHERS = """
import logging, warnings
from tunelab.trainers.logs import setup_logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
setup_logging(main=True)
warnings.warn("a real deprecation", FutureWarning)
warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
shared = logging.getLogger("accelerate.utils.other")
shared.warning("[RANK 0] Removed shared tensor {'model.lm_head.weight'} while saving.")
shared.warning("[RANK 0] Removed shared tensor {'model.layers.0.mlp.up_proj.weight'} while saving.")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
logging.getLogger("tunelab").info("our line")
"""


def test_other_warnings_still_show_and_other_ranks_print_only_errors():
    main = subprocess.run([sys.executable, "-c", SHOW_OTHERS], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    printed = main.stdout + main.stderr
    assert "a real deprecation" in printed and "our line" in printed
    assert "up_proj.weight" in printed and "lm_head" not in printed  # only the tied head is known to be harmless
    assert "is_gradient_checkpointing" not in printed and "Setting accelerator" not in printed
    other = subprocess.run([sys.executable, "-c", SHOW_OTHERS.replace("main=True", "main=False")
                            + "logging.getLogger('tunelab').error('a real error')"], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=120)
    assert (other.stdout + other.stderr).strip() == "a real error"


@pytest.mark.slow
def test_a_two_process_launch_prints_each_line_once(tmp_path):
    launch = two_process_launch()
    proc = subprocess.run([*launch, f"output_dir={tmp_path}", *QUICK, "model.lora.enabled=true"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-3000:]
    lines = collections.Counter(line for line in printed.splitlines() if line.strip())
    assert lines["LoRA adapter exported to " + os.path.join(str(tmp_path), "export_adapter")] == 1, printed
    assert [line for line, count in lines.items() if count > 1] == [], printed
    assert [m for m in HARMLESS if m in printed] == [], printed
