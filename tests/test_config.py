"""Config composition: defaults, recipe/model/data choices, overrides, and errors for unknown names."""

from __future__ import annotations

import os

import pytest
from conftest import ROOT, make_cfg
from hydra.errors import MissingConfigException

from tunelab.losses import LOSSES, PAIR_WEIGHTINGS, build_loss
from tunelab.trainers.config_schema import config_docs, constructor_options, documented_options


def test_default_run_is_sft_on_tiny_model_and_bundled_data():
    cfg = make_cfg([], fast=False)
    assert cfg.model.source == "tiny" and cfg.data.sources[0].path == "bundled:instructions"
    assert list(cfg.loss) == ["ntp"] and cfg.train.max_steps == 120


def test_paper_recipe_switches_model_and_data_and_overrides_still_win():
    cfg = make_cfg(["recipe=sft_llama3_8b_ultrachat"], fast=False)
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert cfg.data.sources[0].path == "HuggingFaceH4/ultrachat_200k"
    assert (cfg.train.lr, cfg.train.global_batch_size, cfg.data.max_length) == (2.0e-5, 128, 2048)
    cfg = make_cfg(["recipe=sft_llama3_8b_ultrachat", "data=bundled_sft", "model=tiny", "train.lr=0.5"], fast=False)
    assert cfg.model.source == "tiny" and cfg.data.sources[0].path == "bundled:instructions" and cfg.train.lr == 0.5


@pytest.mark.parametrize("group", ["recipe", "model", "data"])
def test_unknown_group_option_lists_the_valid_ones(group):
    with pytest.raises(MissingConfigException, match=rf"Available options in '{group}'") as err:
        make_cfg([f"{group}=no_such_thing"], fast=False)
    assert "tiny" in str(err.value) or "sft" in str(err.value) or "bundled_sft" in str(err.value)


def test_unknown_loss_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"unknown loss 'ntpp'; valid: .*ntp"):
        build_loss({"ntpp": {}})
    with pytest.raises(TypeError, match="bad options for loss 'ntp'"):
        build_loss({"ntp": {"betta": 1}})
    with pytest.raises(ValueError, match="`loss` block is empty"):
        build_loss({})


def test_config_reference_page_is_current():
    with open(os.path.join(ROOT, "docs", "config.md")) as page:
        assert page.read() == config_docs(), "docs/config.md is stale: write config_docs() to it"


@pytest.mark.parametrize("name", sorted(LOSSES) + sorted(PAIR_WEIGHTINGS))
def test_every_loss_option_is_documented_in_its_class(name):
    kind = LOSSES.get(name) or PAIR_WEIGHTINGS[name]
    options = constructor_options(kind)
    if options is None:  # takes **options (orpo's `lambda`): its docstring must still name them
        assert documented_options(kind), name
    else:
        assert set(documented_options(kind)) == set(options), name
