"""Multi-process training on CPU (gloo) through the normal entry point, ``accelerate launch ... train.py``.

DDP, DeepSpeed ZeRO-2 and ZeRO-3 (the shipped launch configs, fp32 on CPU) train two processes, save, resume
and export; they agree with each other and with one process running the same global batch; a ZeRO-3
checkpoint resumes on another number of processes through DeepSpeed's universal format; two one-process
"machines" on 127.0.0.1 train exactly like one two-process run; and a ZeRO-3 DPO run with a sharded frozen
reference, LoRA and gradient checkpointing starts at log 2.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tunelab.trainers.distributed import free_port

pytestmark = pytest.mark.slow

FAST = ["train.progress_bar=false", "train.plot=false", "data.sources.0.num_rows=400", "train.log_every=1",
        "train.eval_every=2", "train.save_every=2", "train.max_steps=4"]


def launch_args(config: str, processes: int, *, machines: int = 1, rank: int = 0, port: int | None = None):
    args = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(ROOT, "recipes", "accelerate", f"{config}.yaml"), "--num_processes", str(processes),
            "--mixed_precision", "no", "--main_process_port", str(port or free_port())]
    if machines > 1:
        args += ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
    return args + [os.path.join(ROOT, "train.py")]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(config: str, out, *overrides, processes: int = 2):
    proc = subprocess.run([*launch_args(config, processes), f"output_dir={out}", *FAST, *overrides], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def losses(out, split: str = "train") -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return {r["step"]: r["loss"] for r in map(json.loads, handle) if r["split"] == split}


def exported_state(out) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export"), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 4-step two-process run per launch config (checkpoints at steps 2 and 4, TensorBoard on, export at the
    end: finishing the tracker must leave the process group to the export)."""
    root = tmp_path_factory.mktemp("distributed")
    out = {}
    for config in ("ddp", "zero2", "zero3"):
        out[config] = root / config
        log = train(config, out[config], "train.trackers=[tensorboard]")
        assert "global batch 16 = 8 micro x 2 ranks x 1 accumulation" in log, log[-3000:]
    return out


@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_two_processes_train_save_and_export(runs, config):
    out = runs[config]
    train_losses = losses(out)
    assert sorted(train_losses) == [1, 2, 3, 4]
    assert train_losses[4] < train_losses[1] - 0.3  # it learns
    steps = sorted(os.listdir(out / "checkpoints"))
    assert steps == ["step_0000002", "step_0000004"]
    state = json.loads((out / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["zero_stage"] == {"ddp": 0, "zero2": 2, "zero3": 3}[config]
    assert (out / "checkpoints" / "step_0000004" / "random_states_1.pkl").is_file()  # rank 1 saved its RNG
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(out / "tunelab") for f in files)
    assert (out / "export" / "model.safetensors").is_file()


def test_zero_stages_match_ddp_losses_and_exported_weights(runs):
    reference = losses(runs["ddp"])
    weights = exported_state(runs["ddp"])
    for config in ("zero2", "zero3"):
        got = losses(runs[config])
        for step, value in reference.items():
            assert got[step] == pytest.approx(value, abs=2e-4), (config, step)
        for name, tensor in exported_state(runs[config]).items():
            torch.testing.assert_close(tensor, weights[name], atol=5e-4, rtol=1e-3, msg=f"{config}: {name}")


@pytest.mark.parametrize("config", ["ddp", "zero2", "zero3"])
def test_resume_from_a_checkpoint_reproduces_the_losses(runs, tmp_path, config):
    """Restart from the step-2 checkpoint of the run above: steps 3 and 4 give the same losses."""
    out = tmp_path / "resumed"
    log = train(config, out, f"resume={runs[config] / 'checkpoints' / 'step_0000002'}")
    assert "resumed from" in log
    first, again = losses(runs[config]), losses(out)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(first[step], abs=1e-5), step


def test_zero3_checkpoint_resumes_on_one_process_through_the_universal_format(runs, tmp_path):
    checkpoint = runs["zero3"] / "checkpoints" / "step_0000002"
    out = tmp_path / "one"
    with pytest.raises(subprocess.CalledProcessError) as refused:  # a plain ZeRO checkpoint is per world size
        subprocess.run([*launch_args("zero3", 1), f"output_dir={out}", *FAST, f"resume={checkpoint}"], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=600, check=True)
    assert "to-universal" in refused.value.stderr + refused.value.stdout
    converted = subprocess.run([sys.executable, "-m", "tunelab.trainers.checkpoint", "to-universal", str(checkpoint),
                                str(tmp_path / "universal")], cwd=ROOT, env=env(), capture_output=True, text=True,
                               timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    train("zero3", out, f"resume={tmp_path / 'universal'}", "train.micro_batch_size=16", processes=1)
    first, again = losses(runs["zero3"]), losses(out)
    assert sorted(again) == [3, 4]
    for step in (3, 4):  # the same global batch of 16, now one micro-batch on one process
        assert again[step] == pytest.approx(first[step], abs=1e-4), step


def test_two_processes_reach_the_losses_of_one_process_with_the_same_global_batch(runs, tmp_path):
    """1 process x micro 16 and 2 processes x micro 8 see the same 16 examples a step: same losses (1e-5)."""
    out = tmp_path / "single"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={out}", *FAST,
                           "train.micro_batch_size=16", "export.enabled=false"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    single, double = losses(out), losses(runs["ddp"])
    assert sorted(single) == sorted(double)
    for step, value in double.items():
        assert single[step] == pytest.approx(value, abs=1e-5), step
    for step, value in losses(runs["ddp"], "eval").items():
        assert losses(out, "eval")[step] == pytest.approx(value, abs=1e-5), step


def test_two_machines_of_one_process_equal_one_two_process_run(runs, tmp_path):
    """--num_machines 2 on 127.0.0.1 (one process each): the losses of the single-node DDP run."""
    out, port = tmp_path / "nodes", free_port()
    procs = [subprocess.Popen([*launch_args("ddp", 2, machines=2, rank=rank, port=port), f"output_dir={out}",
                               *FAST, "export.enabled=false"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"machine {rank}:\n{log[-5000:]}"
    assert "8 micro x 2 ranks" in logs[0]
    reference, got = losses(runs["ddp"]), losses(out)
    assert sorted(got) == sorted(reference)
    for step, value in reference.items():
        assert got[step] == pytest.approx(value, abs=1e-5), step


def test_zero3_dpo_with_sharded_frozen_reference_lora_and_checkpointing(tmp_path):
    out = tmp_path / "dpo"
    log = train("zero3", out, "recipe=dpo", "reference.strategy=frozen_copy", "model.lora.enabled=true",
                "model.gradient_checkpointing=true", "train.max_steps=3", "train.save_every=3",
                "train.lr=1e-3", "export.merge_lora=true")
    assert "runs sharded (ZeRO-3, no optimizer)" in log
    with open(out / "metrics.jsonl") as handle:
        records = [r for r in map(json.loads, handle) if r["split"] == "train"]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert records[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # the adapter trained
    assert (out / "export_adapter" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "export")
    assert all(torch.isfinite(p).all() for p in merged.parameters())


@pytest.mark.slow
def test_zero2_bf16_frozen_reference_scores_like_the_policy(tmp_path):
    """DeepSpeed's bf16 mode casts the prepared policy's weights to bf16; the frozen copy, made before ``prepare``,
    takes the same dtypes, so at step 0 (reference == policy) every reward is 0: eval loss log 2 and accuracy 0
    (0.6932 and 0.4 while the copy stayed float32)."""
    out = tmp_path / "dpo"
    train("zero2", out, "recipe=dpo", "reference.strategy=frozen_copy", "train.mixed_precision=bf16",
          "train.max_steps=1", "data.sources.0.num_rows=200", "export.enabled=false", processes=1)
    with open(out / "metrics.jsonl") as handle:
        first_eval = next(r for r in map(json.loads, handle) if r["split"] == "eval")
    assert first_eval["step"] == 0
    assert abs(first_eval["loss"] - math.log(2)) < 1e-6 and first_eval["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_a_deepspeed_lora_checkpoint_leaves_out_the_frozen_base_and_resumes_exactly(tmp_path, config):
    """DeepSpeed writes only the adapter (its tied-head duplicate of the frozen embedding dropped too); a resume
    from step 2 rebuilds the base from the config and gives steps 3 and 4 the losses of the uninterrupted run."""
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "train.lr=1e-3", "export.enabled=false"]
    first, again = tmp_path / "first", tmp_path / "again"
    train(config, first, *lora)
    checkpoint = first / "checkpoints" / "step_0000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["model_weights"] == "trainable"
    files = sorted((checkpoint / "pytorch_model").glob("*model_states.pt"))  # ZeRO-3: one per rank
    assert len(files) == (2 if config == "zero3" else 1)
    for file in files:
        module = torch.load(file, weights_only=False)["module"]
        assert module and all("lora_" in name for name in module), (file.name, sorted(module)[:5])
    log = train(config, again, *lora, f"resume={checkpoint}")
    assert "resumed from" in log
    assert sorted(losses(again)) == [3, 4]
    for step in (3, 4):
        assert losses(again)[step] == pytest.approx(losses(first)[step], abs=1e-5), step
