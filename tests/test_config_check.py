"""Start-up config validation: each bad value is refused before any model or dataset is built, naming its key and
the valid values; every shipped recipe passes."""

from __future__ import annotations

import os

import pytest
from accelerate.state import AcceleratorState, GradientState
from conftest import RECIPES, make_cfg

from trainers import trainer as trainer_module
from trainers.config_check import ConfigError, check_config, check_resume_compatible


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


BAD = [  # (override, what the message must say)
    ("train.micro_batch_size=0", "train.micro_batch_size=0 is invalid: valid values are an integer > 0"),
    ("train.global_batch_size=0", "train.global_batch_size=0 is invalid: valid values are an integer > 0"),
    ("train.eval_batch_size=0", "train.eval_batch_size=0 is invalid: valid values are an integer > 0"),
    ("train.save_every=0", "train.save_every=0 is invalid: valid values are an integer > 0"),
    ("train.log_every=0", "train.log_every=0 is invalid: valid values are an integer > 0"),
    ("train.eval_every=-1", "train.eval_every=-1 is invalid: valid values are an integer >= 0"),
    ("train.attention_tile=0", "train.attention_tile=0 is invalid: valid values are an integer > 0"),
    ("train.logits_chunk_size=0", "train.logits_chunk_size=0 is invalid: valid values are an integer > 0"),
    ("train.global_batch_size=10", "train.global_batch_size=10 is not a multiple of train.micro_batch_size=8"),
    ("model.dtype=float7", "model.dtype='float7' is invalid: valid values are one of float32, bfloat16, float16"),
    ("train.max_steps=-3", "train.max_steps=-3 is invalid: valid values are null .* or an integer > 0"),
    ("train.on_nonfinite=skpi", "train.on_nonfinite='skpi' is invalid: valid values are one of stop, skip"),
    ("train.lr=-0.001", "train.lr=-0.001 is invalid: valid values are a number > 0"),
    ("train.lr=fast", "train.lr='fast' is invalid: valid values are a number > 0"),
    ("data.eval_fraction=1.5", r"data.eval_fraction=1.5 is invalid: valid values are a number in \[0, 1\)"),
    ("train.optimizer=adamx", "train.optimizer=.adamx. is invalid: valid values are one of adamw, adam, sgd, adaf"),
    ("train.scheduler=cosin", "train.scheduler='cosin' is invalid: valid values are one of constant, linear, cosine"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is invalid: valid values are one of \"no\""),
    ("train.mixed_precision=false", "train.mixed_precision=False is invalid: .*\"no\" \\(quoted in YAML\\)"),
    ("train.keep_last=-1", "train.keep_last=-1 is invalid: valid values are an integer >= 0"),
    ("train.epochs=0", "train.epochs=0 is invalid: valid values are an integer > 0"),
    ("resume=latest", "resume=latest needs output_dir=<the run to continue>"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_refused_at_start_up_naming_the_key(tmp_path, monkeypatch, override, message):
    def too_late(*args, **kwargs):
        raise AssertionError("the config must be refused before anything is built")

    for name in ("init_state", "build_tokenizer", "build_datasets", "build_model"):
        monkeypatch.setattr(trainer_module, name, too_late)
    output_dir = [] if override.startswith("resume") else [f"output_dir={tmp_path / 'run'}"]
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg([*output_dir, override])
    with pytest.raises(ConfigError, match=message):
        trainer_module.Trainer(cfg)
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "runs")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg(["train.log_every=0", "model.dtype=float7", "train.lr=fast"]))
    assert [line.split("=")[0].strip() for line in str(err.value).splitlines()[1:]] == [
        "train.log_every", "train.lr", "model.dtype"]


def test_absent_and_unknown_keys_are_left_alone():
    cfg = make_cfg(["+train.some_new_setting=3", "~data.eval_fraction"])
    check_config(cfg)


@pytest.mark.parametrize("recipe", sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES, "recipe"))
                                          if f.endswith(".yaml")))
def test_every_shipped_recipe_passes(recipe):
    check_config(make_cfg([f"recipe={recipe}"], fast=False))


def test_resume_compatibility_names_each_differing_key_and_counts_an_absent_key_as_null():
    saved = {"seed": 1, "output_dir": "a", "train": {"lr": 0.1, "max_steps": 5}, "model": {"dtype": "float32"}}
    check_resume_compatible(saved, {**saved, "output_dir": "b", "train": {"lr": 0.1, "max_steps": 9, "added": None}},
                            "ckpt")
    with pytest.raises(ConfigError, match=r"cannot resume from ckpt: it was written with another config \(train."
                                          r"added: None in the checkpoint, True now; train.lr: 0.1 in the "
                                          r"checkpoint, 0.2 now\)"):
        check_resume_compatible(saved, {**saved, "train": {"lr": 0.2, "max_steps": 5, "added": True}}, "ckpt")
