"""Checkpoint verification and fallback, safe replacement of a step folder, run directories (unique, never reused
silently, resumed only under a compatible config) and metrics.jsonl after a resume."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess

import pytest
from conftest import ROOT, make_cfg, read_metrics, two_process_launch

from tunelab.trainers import checkpoint
from tunelab.trainers.checkpoint import CheckpointError
from tunelab.trainers.config_check import ConfigError
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.trainer import RunDirError, Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def trainer(out, *overrides) -> Trainer:
    overrides = [f"output_dir={out}", "export.enabled=false", "train.eval_every=0", *overrides]
    return Trainer(make_cfg(overrides), recipe_name="sft")


SHORT = ["train.max_steps=3", "train.save_every=1", "train.keep_last=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with a checkpoint at every step, trained once and copied by each test that damages it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer(out, *SHORT).fit()
    reset_accelerate()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def step(out, n):
    return os.path.join(out, "checkpoints", f"step_{n:07d}")


def truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def overwrite_middle(path):
    """4 KB of garbage in place: the size is unchanged, so only the checksum can tell."""
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        handle.write(b"\xff" * 4096)


def garble(path):
    with open(path, "w") as handle:
        handle.write('{"step": 3, "skipped')


CORRUPTIONS = {
    "truncated weights": (lambda d: truncate(os.path.join(d, "model.safetensors")),
                          r"model.safetensors has \d+ bytes, the manifest records \d+"),
    "garbage in the weights": (lambda d: overwrite_middle(os.path.join(d, "model.safetensors")),
                               "model.safetensors does not match its sha256"),
    "garbage in the optimizer state": (lambda d: overwrite_middle(os.path.join(d, "optimizer.bin")),
                                       "optimizer.bin does not match its sha256"),
    "deleted RNG state": (lambda d: os.remove(os.path.join(d, "random_states_0.pkl")),
                          "random_states_0.pkl is missing"),
    "deleted trainer state": (lambda d: os.remove(os.path.join(d, "trainer_state.json")),
                              "trainer_state.json is missing"),
    "garbled trainer state": (lambda d: garble(os.path.join(d, "trainer_state.json")),
                              r"trainer_state.json has \d+ bytes"),
    "deleted manifest": (lambda d: os.remove(os.path.join(d, "manifest.json")), "no manifest.json"),
    "garbled manifest": (lambda d: garble(os.path.join(d, "manifest.json")), "manifest.json is unreadable"),
}


def test_a_completed_checkpoint_lists_every_file_with_size_and_checksum(finished_run):
    with open(os.path.join(step(finished_run, 3), "manifest.json")) as handle:
        files = json.load(handle)["files"]
    on_disk = sorted(os.listdir(step(finished_run, 3)))
    assert sorted(files) == [name for name in on_disk if name != "manifest.json"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= set(files)
    weights = os.path.join(step(finished_run, 3), "model.safetensors")
    assert files["model.safetensors"]["size"] == os.path.getsize(weights)
    assert len(files["model.safetensors"]["sha256"]) == 64


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_latest_checkpoint_falls_back_with_a_reason_or_is_refused_by_name(run_copy, case, caplog):
    corrupt, reason = CORRUPTIONS[case]
    corrupt(step(run_copy, 3))
    with caplog.at_level(logging.WARNING, logger="tunelab"):
        assert checkpoint.resolve_resume("latest", str(run_copy)) == step(run_copy, 2)
    assert "skipping checkpoint" in caplog.text and "step_0000003" in caplog.text
    assert len([m for m in caplog.messages if re.search(reason, m)]) == 1
    with pytest.raises(CheckpointError, match=f"is not an intact checkpoint: {reason}"):
        checkpoint.resolve_resume(step(run_copy, 3), str(run_copy))


def test_when_no_checkpoint_verifies_latest_and_auto_refuse_and_list_the_reasons(run_copy):
    for n in (1, 2, 3):
        os.remove(os.path.join(step(run_copy, n), "random_states_0.pkl"))
    for mode in ("latest", "auto"):
        with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies \(step_0000003: random_states_0.pkl "
                                                  r"is missing; step_0000002: .*; step_0000001: "):
            checkpoint.resolve_resume(mode, str(run_copy))


def test_resume_latest_after_a_corrupted_checkpoint_continues_from_the_one_before(run_copy, caplog):
    os.remove(os.path.join(step(run_copy, 3), "random_states_0.pkl"))
    with caplog.at_level(logging.INFO, logger="tunelab"):
        summary = trainer(run_copy, *SHORT, "resume=latest").fit()
    assert f"resumed from {step(run_copy, 2)} at step 2" in caplog.text
    assert summary["steps"] == 3
    assert checkpoint.verify(step(run_copy, 3)) is None  # the damaged folder was replaced by an intact one


class Killed(Exception):
    pass


def test_replacing_a_step_folder_never_leaves_a_complete_looking_partial_one(tmp_path, monkeypatch):
    run = trainer(tmp_path / "replace", "train.max_steps=1")
    out = str(tmp_path / "replace")
    checkpoint.save(run.accelerator, out, 1, {"step": 1}, keep_last=0)
    real_rmtree = shutil.rmtree

    def die_half_way(path, *args, **kwargs):
        """Deletes the weights of the folder being replaced, then the process dies."""
        if os.path.basename(path).endswith("step_0000001") and os.path.isdir(path):
            os.remove(os.path.join(path, "model.safetensors"))
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", die_half_way)
    with pytest.raises(Killed):
        checkpoint.save(run.accelerator, out, 1, {"step": 1}, keep_last=0)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    for name in os.listdir(os.path.join(out, "checkpoints")):
        if name.startswith("step_"):  # anything under a step name is whole
            assert os.path.isfile(os.path.join(out, "checkpoints", name, "model.safetensors")), name
    assert checkpoint.resolve_resume("latest", out) == step(out, 1)


def test_rotation_after_a_fallback_keeps_the_new_checkpoint_over_damaged_later_ones(run_copy, monkeypatch):
    for n in (2, 3):
        os.remove(os.path.join(step(run_copy, n), "random_states_0.pkl"))
    save = checkpoint.save

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):  # resumes from step 1, saves step 2 with keep_last=1, dies
        trainer(run_copy, *SHORT, "train.keep_last=1", "resume=latest").fit()
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["step_0000002", "step_0000003"]
    assert checkpoint.resolve_resume("latest", str(run_copy)) == step(run_copy, 2)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    from tunelab.trainers import trainer as trainer_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer_module.time, "strftime", lambda fmt: "2026-01-01_00-00-00")
    first = Trainer(make_cfg(["export.enabled=false"]), recipe_name="sft").output_dir
    reset_accelerate()
    second = Trainer(make_cfg(["export.enabled=false"]), recipe_name="sft").output_dir
    assert first != second
    assert os.path.dirname(first) == os.path.dirname(second) == os.path.join("runs", "sft")
    assert all(os.path.basename(d).startswith("2026-01-01_00-00-00") for d in (first, second))


def test_a_used_output_dir_is_refused_unless_resuming(run_copy):
    before = {name: os.path.getmtime(os.path.join(run_copy, name)) for name in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(RunDirError, match=r"output_dir=.*run is not empty \(checkpoints, config.yaml, metrics.jsonl\)"
                                          r".*resume=auto or resume=latest, or choose another output_dir"):
        trainer(run_copy, *SHORT)
    assert {name: os.path.getmtime(os.path.join(run_copy, name)) for name in before} == before  # untouched


@pytest.mark.slow
def test_every_process_of_a_launch_stops_with_the_main_process_refusal(run_copy):
    """The main process decides on the run directory; its refusal reaches the other rank, which does not hang."""
    launch = two_process_launch()
    proc = subprocess.run([*launch, f"output_dir={run_copy}", "train.progress_bar=false", "train.max_steps=1",
                           "data.sources.0.num_rows=400", "export.enabled=false"], cwd=ROOT, timeout=300,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    refusals = re.findall(r"RunDirError: output_dir=\S+ is not empty", proc.stderr)
    assert len(refusals) == 2, proc.stderr[-3000:]


def test_resume_refuses_a_config_that_changes_the_training_and_names_the_keys(run_copy):
    with pytest.raises(ConfigError, match=r"another config \(seed: 42 in the checkpoint, 7 now; train.lr: 0.003 in "
                                          r"the checkpoint, 0.01 now\)"):
        trainer(run_copy, *SHORT, "resume=latest", "train.lr=0.01", "seed=7")


def test_resume_accepts_keys_that_may_change(run_copy):
    allowed = ["train.max_steps=4", "train.log_every=2", "train.save_every=2", "train.keep_last=1",
               "train.micro_batch_size=4", "train.logits_chunk_size=64", "train.eval_every=1"]
    summary = trainer(run_copy, *SHORT, *allowed, "resume=latest").fit()
    assert summary["steps"] == 4


def test_metrics_after_a_resume_hold_each_step_once(tmp_path, monkeypatch):
    common = ["train.max_steps=5", "train.log_every=1", "train.save_every=2", "train.eval_every=2"]
    trainer(tmp_path / "straight", *common).fit()
    reset_accelerate()
    original = Trainer.train_step

    def die_at_step_4(self):  # steps 1-3 are logged, the last checkpoint is step 2's
        if self.step == 3:
            raise Killed
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", die_at_step_4)
    with pytest.raises(Killed):
        trainer(tmp_path / "resumed", *common).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    reset_accelerate()
    trainer(tmp_path / "resumed", *common, "resume=latest").fit()
    straight, resumed = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-6)
    evals = read_metrics(str(tmp_path / "resumed"), split="eval")
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert [r["loss"] for r in evals] == pytest.approx([r["loss"] for r in read_metrics(
        str(tmp_path / "straight"), split="eval")], abs=1e-6)
