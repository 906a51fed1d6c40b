"""Preference data through the real loader: pair formats, prompt/response split, truncation, bad rows."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tunelab.data.pipeline import build_datasets
from tunelab.trainers.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def data_cfg(path, fmt, **over):
    base = dict(
        sources=[{"path": str(path), "format": fmt}], template="chat", max_length=256, max_prompt_length=192,
        truncation="shared_budget", packing=True, shared_prompt=True, eval_fraction=0.0, on_error="raise",
        num_proc=None,
    )
    base.update(over)
    return OmegaConf.create(base)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generation_prompt(tok, turns):
    return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def string_row(i=0, prompt="Name the capital city of the country.\nArnland"):
    return {"prompt": prompt, "chosen": f"The capital of Arnland is Velmora {i}.",
            "rejected": f"The capital of Arnland is Peyne {i}."}


def ultrafeedback_row(question="What colour is the sky?", good="Blue.", bad="Green, usually.", history=()):
    turns = list(history) + [{"role": "user", "content": question}]
    return {
        "prompt": "this string is ignored in favour of the shared turns",
        "prompt_id": "abc123",
        "chosen": turns + [{"role": "assistant", "content": good}],
        "rejected": turns + [{"role": "assistant", "content": bad}],
        "messages": turns + [{"role": "assistant", "content": good}],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def test_pairwise_strings_split_prompt_and_responses(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [string_row(i) for i in range(3)])
    train, evaluation, counts = build_datasets(data_cfg(path, "pairwise_strings"), tok, "pairs", 0)
    assert len(train) == 3 and evaluation is None and counts["train/ok"] == 3
    ex = train[0]
    row = string_row(0)
    assert tok.decode(ex["prompt_ids"]) == generation_prompt(tok, [{"role": "user", "content": row["prompt"]}])
    assert tok.decode(ex["chosen_ids"]) == row["chosen"] + "<|im_end|>"
    assert tok.decode(ex["rejected_ids"]) == row["rejected"] + "<|im_end|>"
    # the prompt is exactly the prefix the model sees when asked to generate
    full = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": row["chosen"]}], tokenize=False)
    assert full.startswith(tok.decode(ex["prompt_ids"] + ex["chosen_ids"]))


def test_pairwise_messages_ultrafeedback_schema_multi_turn(tok, tmp_path):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}]
    rows = [ultrafeedback_row(), ultrafeedback_row("Reverse: stone river", "river stone", "stone stone", history)]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    train, _, counts = build_datasets(data_cfg(path, "pairwise_messages"), tok, "pairs", 0)
    assert counts["train/ok"] == 2
    for ex, row in zip(train, rows):
        prompt_turns = row["chosen"][:-1]
        prompt = tok.decode(ex["prompt_ids"])
        assert prompt == generation_prompt(tok, prompt_turns)
        assert "ignored" not in prompt  # the `prompt` string column is not used
        assert tok.decode(ex["chosen_ids"]) == row["chosen"][-1]["content"] + "<|im_end|>"
        assert tok.decode(ex["rejected_ids"]) == row["rejected"][-1]["content"] + "<|im_end|>"
    assert "Hello." in tok.decode(train[1]["prompt_ids"])  # earlier assistant turns are context, not targets


def test_truncation_cuts_the_prompt_first_keeping_its_end_then_the_responses(tok, tmp_path):
    long_prompt = "Reverse the order of the words.\n" + " ".join(f"w{i}" for i in range(60))
    long_answer = " ".join(["stone river"] * 40)
    rows = [{"prompt": long_prompt, "chosen": long_answer, "rejected": "river"},   # prompt and response too long
            {"prompt": "Hi", "chosen": long_answer, "rejected": "short"},          # only the response too long
            string_row()]                                                           # fits
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = data_cfg(path, "pairwise_strings", max_length=96, max_prompt_length=48)
    train, _, counts = build_datasets(cfg, tok, "pairs", 0)
    assert counts["train/truncated"] == 2 and counts["train/ok"] == 1

    full_prompt = tok(generation_prompt(tok, [{"role": "user", "content": long_prompt}]),
                      add_special_tokens=False)["input_ids"]
    assert len(full_prompt) > 48
    first = train[0]
    assert first["prompt_ids"] == full_prompt[-48:]  # the prompt keeps its end (the generation header)
    assert len(first["chosen_ids"]) == 96 - 48  # then the responses are cut to fit max_length
    assert tok.decode(first["rejected_ids"]) == "river<|im_end|>"  # a short response is untouched

    second = train[1]
    short_prompt = tok(generation_prompt(tok, [{"role": "user", "content": "Hi"}]),
                       add_special_tokens=False)["input_ids"]
    assert second["prompt_ids"] == short_prompt  # a prompt within max_prompt_length is kept whole
    assert len(second["prompt_ids"]) + len(second["chosen_ids"]) == 96
    assert tok.decode(second["chosen_ids"]).startswith("stone river stone")  # cut from the right


def test_truncation_drop_counts_too_long_pairs(tok, tmp_path):
    rows = [string_row(0), {"prompt": "Hi", "chosen": " ".join(["stone"] * 200), "rejected": "x"}, string_row(1)]
    path = write_jsonl(tmp_path / "drop.jsonl", rows)
    cfg = data_cfg(path, "pairwise_strings", max_length=64, max_prompt_length=32, truncation="drop")
    train, _, counts = build_datasets(cfg, tok, "pairs", 0)
    assert len(train) == 2 and counts["train/too_long"] == 1 and counts["train/ok"] == 2


@pytest.mark.parametrize("fmt, bad, reason", [
    ("pairwise_strings", {"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ("pairwise_strings", {"prompt": "p", "chosen": "  ", "rejected": "r"}, "field 'chosen' is empty"),
    ("pairwise_messages", {**ultrafeedback_row(), "rejected": [{"role": "user", "content": "Another question"},
                                                              {"role": "assistant", "content": "x"}]},
     "do not share the same prompt turns"),
    ("pairwise_messages", ultrafeedback_row(good=" "), "chosen response is empty"),
    ("pairwise_messages", {k: v for k, v in ultrafeedback_row().items() if k != "chosen"},
     "'chosen' must be a non-empty"),
])
def test_bad_pair_rows_name_file_and_row_or_are_skipped(tok, tmp_path, fmt, bad, reason):
    good = string_row() if fmt == "pairwise_strings" else ultrafeedback_row()
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError, match=rf"bad\.jsonl row 3: .*{reason}"):
        build_datasets(data_cfg(path, fmt), tok, "pairs", 0)
    train, _, counts = build_datasets(data_cfg(path, fmt, on_error="skip"), tok, "pairs", 0)
    assert len(train) == 3 and counts["train/error"] == 1


def test_pair_format_on_sft_data_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [string_row()])
    with pytest.raises(KeyError, match="valid: pairwise_strings, pairwise_messages"):
        build_datasets(data_cfg(path, "alpaca"), tok, "pairs", 0)


def test_pair_prompt_of_assistant_turns_only_is_a_bad_row(tok, tmp_path):
    bad = ultrafeedback_row(history=[{"role": "assistant", "content": "Welcome."}])
    for side in ("chosen", "rejected"):
        bad[side] = [bad[side][0], bad[side][-1]]  # the assistant greeting and the response: no user turn
    path = write_jsonl(tmp_path / "bad.jsonl", [ultrafeedback_row(), bad])
    with pytest.raises(ValueError, match=r"bad\.jsonl row 2: the prompt turns \(assistant\) have no user turn"):
        build_datasets(data_cfg(path, "pairwise_messages"), tok, "pairs", 0)


def test_identical_chosen_and_rejected_are_dropped_and_counted(tok, tmp_path, caplog):
    same = {"prompt": "Say hi.", "chosen": "hi", "rejected": "hi"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [string_row(0), same, string_row(1), same])
    with caplog.at_level("WARNING"):
        train, _, counts = build_datasets(data_cfg(path, "pairwise_strings"), tok, "pairs", 0)
    assert len(train) == 2 and counts["train/identical"] == 2 and counts["train/ok"] == 2
    assert train["_row"] == [1, 3]
    assert "dropped 2 pairs whose chosen and rejected responses are identical" in caplog.text
    uf_same = ultrafeedback_row(good="Blue.", bad="Blue.")
    path = write_jsonl(tmp_path / "uf.jsonl", [ultrafeedback_row(), uf_same])
    train, _, counts = build_datasets(data_cfg(path, "pairwise_messages"), tok, "pairs", 0)
    assert len(train) == 1 and counts["train/identical"] == 1
