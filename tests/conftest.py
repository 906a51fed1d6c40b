"""Shared test helpers: compose a run config exactly as train.py does, with fast settings for tests."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tunelab.trainers.config_schema import compose_config
from tunelab.trainers.distributed import free_port, reset_accelerate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")

FAST = [
    "train.progress_bar=false",
    "train.plot=false",
    "data.sources.0.num_rows=400",
]


def make_cfg(overrides: list[str], fast: bool = True):
    return compose_config((FAST if fast else []) + list(overrides))


def two_process_launch() -> list[str]:
    """The command that runs train.py as two CPU processes (DDP over gloo) on a free port; append overrides."""
    port = free_port()
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(RECIPES, "accelerate", "ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(port), os.path.join(ROOT, "train.py")]


def read_metrics(output_dir: str, split: str = "train") -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["split"] == split]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("TUNELAB_CACHE", str(path))
    return path


@pytest.fixture
def fresh_accelerate_state():
    """For modules whose tests build Trainers in this process (``pytestmark = pytest.mark.usefixtures(...)``):
    Accelerate's state is a process-wide singleton, so each test's Trainer must not inherit the previous one's."""
    yield
    reset_accelerate()

