"""Pair truncation policies (data/tokenize.py): the authors' fixed budgets, shared budgets, and the start-up check
of impossible length settings."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tunelab.data.pipeline import build_datasets
from tunelab.data.templates import build_template
from tunelab.data.tokenize import pair_example
from tunelab.trainers.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def long_text(words: int) -> str:
    return " ".join(f"w{i % 10}" for i in range(words))


def row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def cut(tok, r: dict, truncation: str, max_length: int, max_prompt_length: int) -> dict:
    template = build_template("chat", tok)
    return pair_example(r, "pairwise_strings", template, tok, max_length, max_prompt_length, truncation)


def whole(tok, r: dict) -> dict:
    return cut(tok, r, "shared_budget", 10**6, 10**6 - 1)


def test_fixed_budget_keeps_max_length_minus_max_prompt_length_response_tokens_after_a_short_prompt(tok):
    # The zephyr DPO / RPO setting 1024 / 512: a short prompt does not lend its unused budget to the responses.
    r = row("Repeat the words.", long_text(1500), "Short answer.")
    full = whole(tok, r)
    assert len(full["prompt_ids"]) < 40 and len(full["chosen_ids"]) > 1024
    out = cut(tok, r, "fixed_budget", 1024, 512)
    assert out["status"] == "truncated"
    assert out["prompt_ids"] == full["prompt_ids"]
    assert out["chosen_ids"] == full["chosen_ids"][:512]
    assert out["rejected_ids"] == full["rejected_ids"]  # within its budget: untouched


def test_shared_budget_gives_the_responses_what_the_prompt_leaves(tok):
    r = row("Repeat the words.", long_text(1500), "Short answer.")
    full = whole(tok, r)
    out = cut(tok, r, "shared_budget", 1024, 512)
    assert out["status"] == "truncated"
    assert out["prompt_ids"] == full["prompt_ids"]
    assert len(out["chosen_ids"]) == 1024 - len(full["prompt_ids"])
    assert out["chosen_ids"] == full["chosen_ids"][: 1024 - len(full["prompt_ids"])]


@pytest.mark.parametrize("truncation", ["fixed_budget", "shared_budget"])
def test_a_long_prompt_keeps_its_end_then_the_responses_are_cut(tok, truncation):
    r = row(long_text(300), long_text(200), "Short answer.")
    full = whole(tok, r)
    assert len(full["prompt_ids"]) > 96
    out = cut(tok, r, truncation, 160, 96)
    assert out["prompt_ids"] == full["prompt_ids"][-96:]  # the end holds the generation header
    assert out["chosen_ids"] == full["chosen_ids"][: 160 - 96]
    assert out["rejected_ids"] == full["rejected_ids"]


def test_fixed_budget_leaves_responses_whole_when_cutting_the_prompt_suffices(tok):
    # TRL's order: the prompt is cut first, and the responses only if the pair still does not fit.
    r = row(long_text(300), long_text(20), "Short answer.")
    full = whole(tok, r)
    assert len(full["chosen_ids"]) < 160 - 96 and len(full["prompt_ids"]) + len(full["chosen_ids"]) > 160
    out = cut(tok, r, "fixed_budget", 160, 96)
    assert out["status"] == "truncated"
    assert out["prompt_ids"] == full["prompt_ids"][-96:]
    assert out["chosen_ids"] == full["chosen_ids"]


@pytest.mark.parametrize("truncation", ["fixed_budget", "shared_budget"])
def test_a_pair_that_fits_exactly_is_not_counted_as_truncated(tok, truncation):
    r = row("Repeat the words.", long_text(30), "Short answer.")
    full = whole(tok, r)
    exact = len(full["prompt_ids"]) + len(full["chosen_ids"])
    out = cut(tok, r, truncation, exact, exact - len(full["chosen_ids"]))
    assert out["status"] == "ok" and out["chosen_ids"] == full["chosen_ids"]
    assert cut(tok, r, truncation, exact - 1, exact - len(full["chosen_ids"]) - 1)["status"] == "truncated"


def data_cfg(path, **over):
    base = dict(
        sources=[{"path": str(path), "format": "pairwise_strings"}], template="chat", max_length=64,
        max_prompt_length=32, truncation="fixed_budget", packing=True, shared_prompt=True, eval_fraction=0.0,
        on_error="raise", num_proc=None,
    )
    base.update(over)
    return OmegaConf.create(base)


@pytest.mark.parametrize("over, message", [
    ({"max_length": 512, "max_prompt_length": 512},
     r"data.max_prompt_length=512 must be smaller than data.max_length=512"),
    ({"max_length": 256, "max_prompt_length": 1024},
     r"data.max_prompt_length=1024 must be smaller than data.max_length=256"),
    ({"max_prompt_length": 0}, r"data.max_prompt_length must be a positive integer, got 0"),
    ({"max_length": -5}, r"data.max_length must be a positive integer, got -5"),
    ({"truncation": "truncate"}, r"data.truncation='truncate'; valid: fixed_budget, shared_budget, drop"),
])
def test_impossible_settings_are_rejected_before_any_data_is_read(tok, tmp_path, over, message):
    missing = tmp_path / "never_read.jsonl"  # the check must come first: reading this file would fail differently
    with pytest.raises(ValueError, match=message):
        build_datasets(data_cfg(missing, **over), tok, "pairs", 0)


def test_sft_data_does_not_need_a_prompt_budget(tok, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi.", "completion": "Hi."}) + "\n")
    cfg = data_cfg(path, max_length=64, max_prompt_length=64)
    cfg.sources[0].format = "prompt_completion"
    train, _, counts = build_datasets(cfg, tok, "sft", 0)
    assert len(train) == 1 and counts["train/ok"] == 1


def test_truncated_pairs_through_the_pipeline_have_nonempty_responses(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [row(long_text(80), long_text(80), "No."), row("Hi", long_text(80), "Hello."), row("Hi", "Yes.", "No.")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _, counts = build_datasets(data_cfg(path), tok, "pairs", 0)
    assert counts["train/truncated"] == 2 and counts["train/ok"] == 1
    for ex in train:
        assert len(ex["prompt_ids"]) <= 32 and ex["chosen_ids"] and ex["rejected_ids"]
        assert len(ex["chosen_ids"]) <= 64 - 32 and len(ex["rejected_ids"]) <= 64 - 32
