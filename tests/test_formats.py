"""Formats users bring, on local files in their real schemas: ShareGPT (LLaMA-Factory role names, tool turns),
Anthropic HH-RLHF transcripts, column renaming, and format auto-detection."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
from omegaconf import OmegaConf
from test_preference_data import write_jsonl

from tunelab.data.formats import FORMAT_FIELDS, PAIR_FORMATS, SFT_FORMATS, UNPAIRED_FORMATS, detect_format
from tunelab.data.pipeline import build_datasets
from tunelab.trainers.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def data_cfg(path, fmt="auto", **over):
    source = {"path": str(path), **({"format": fmt} if fmt is not None else {}), **over.pop("source", {})}
    base = dict(sources=[source], template="chat", max_length=256, max_prompt_length=192,
                truncation="shared_budget", packing=True, shared_prompt=True, eval_fraction=0.0, on_error="raise",
                num_proc=None)
    base.update(over)
    return OmegaConf.create(base)


def decode_targets(tok, ex):
    return tok.decode([i for i, m in zip(ex["input_ids"], ex["target_mask"]) if m])


def decode_context(tok, ex):
    return tok.decode([i for i, m in zip(ex["input_ids"], ex["target_mask"]) if not m])


# ---- ShareGPT -----------------------------------------------------------------------------------------------
SHAREGPT_CHAT = {  # the original ShareGPT dumps: id + conversations of human/gpt turns
    "id": "QWJhYvA_0",
    "conversations": [
        {"from": "human", "value": "Name the capital city of the country.\nArnland"},
        {"from": "gpt", "value": "The capital of Arnland is Velmora."},
        {"from": "human", "value": "And of Brisca?"},
        {"from": "gpt", "value": "The capital of Brisca is Tolland."},
    ],
}
SHAREGPT_TOOLS = {  # LLaMA-Factory's sharegpt schema: system column, function_call / observation turns
    "system": "You can look up capitals.",
    "conversations": [
        {"from": "human", "value": "What is the capital of Corvia?"},
        {"from": "function_call", "value": '{"name": "capital", "arguments": {"country": "Corvia"}}'},
        {"from": "observation", "value": '{"capital": "Maressa"}'},
        {"from": "gpt", "value": "The capital of Corvia is Maressa."},
    ],
}


def test_sharegpt_maps_speakers_and_trains_only_assistant_turns(tok, tmp_path):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT_CHAT, SHAREGPT_TOOLS])
    train, _, counts = build_datasets(data_cfg(path, "sharegpt"), tok, "sft", 0)
    assert counts["train/ok"] == 2
    chat, tools = train[0], train[1]
    expected = tok.apply_chat_template([
        {"role": "user", "content": "Name the capital city of the country.\nArnland"},
        {"role": "assistant", "content": "The capital of Arnland is Velmora."},
        {"role": "user", "content": "And of Brisca?"},
        {"role": "assistant", "content": "The capital of Brisca is Tolland."},
    ], tokenize=False)
    assert tok.decode(chat["input_ids"]) == expected
    assert decode_targets(tok, chat) == ("The capital of Arnland is Velmora.<|im_end|>"
                                         "The capital of Brisca is Tolland.<|im_end|>")
    # the tool call is an assistant reply (trained); the tool's answer is a `tool` turn (context only)
    assert decode_targets(tok, tools) == ('{"name": "capital", "arguments": {"country": "Corvia"}}<|im_end|>'
                                          "The capital of Corvia is Maressa.<|im_end|>")
    context = decode_context(tok, tools)
    assert context.startswith("<|im_start|>system\nYou can look up capitals.<|im_end|>")
    assert '<|im_start|>tool\n{"capital": "Maressa"}<|im_end|>' in context


@pytest.mark.parametrize("bad,reason", [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
     "conversations\\[1\\] has unknown speaker 'bot'; valid: human, user, gpt"),
    ({"conversations": SHAREGPT_CHAT["conversations"][:3]}, "conversation ends with a user turn"),
    ({**SHAREGPT_TOOLS, "tools": '[{"name": "capital"}]'}, "the row defines tools"),
    ({"conversations": [{"role": "user", "content": "Hi"}]}, "conversations\\[0\\] must be a \\{from, value\\}"),
])
def test_bad_sharegpt_rows_name_file_row_and_reason(tok, tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT_CHAT, bad])
    with pytest.raises(ValueError, match=rf"sharegpt\.jsonl row 2: {reason}"):
        build_datasets(data_cfg(path, "sharegpt"), tok, "sft", 0)


# ---- HH-RLHF ------------------------------------------------------------------------------------------------
HH_PREFIX = ("\n\nHuman: Reverse the order of the words.\nstone river lamp\n\nAssistant: lamp river stone"
             "\n\nHuman: Now the words tiger honey.\n\nAssistant:")
HH_ROW = {"chosen": HH_PREFIX + " honey tiger", "rejected": HH_PREFIX + " tiger tiger"}


def test_hh_rlhf_transcripts_become_shared_prompt_turns_and_final_responses(tok, tmp_path):
    single = {"chosen": "\n\nHuman: Say hi.\n\nAssistant: hi", "rejected": "\n\nHuman: Say hi.\n\nAssistant: bye"}
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_ROW, single])
    train, _, counts = build_datasets(data_cfg(path, "hh_rlhf"), tok, "pairs", 0)
    assert counts["train/ok"] == 2
    turns = [{"role": "user", "content": "Reverse the order of the words.\nstone river lamp"},
             {"role": "assistant", "content": "lamp river stone"},
             {"role": "user", "content": "Now the words tiger honey."}]
    first = train[0]
    assert tok.decode(first["prompt_ids"]) == tok.apply_chat_template(turns, tokenize=False,
                                                                      add_generation_prompt=True)
    assert tok.decode(first["chosen_ids"]) == "honey tiger<|im_end|>"
    assert tok.decode(first["rejected_ids"]) == "tiger tiger<|im_end|>"
    assert tok.decode(train[1]["prompt_ids"]) == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bad,reason", [
    ({**HH_ROW, "rejected": HH_PREFIX.replace("tiger honey", "honey tiger") + " tiger tiger"},
     "the chosen and rejected transcripts differ before their final Assistant turn"),
    ({**HH_ROW, "rejected": HH_PREFIX + " x\n\nHuman: thanks"}, "the rejected transcript ends with a Human turn"),
    ({**HH_ROW, "rejected": HH_PREFIX + " x\n\nHuman: thanks\n\nAssistant: y"},
     "the chosen and rejected transcripts differ"),
    ({"chosen": HH_PREFIX + " a\n\nHuman: thanks", "rejected": HH_PREFIX + " b\n\nHuman: thanks"},
     "the chosen transcript ends with a Human turn"),
    ({**HH_ROW, "chosen": HH_PREFIX + "  "}, "chosen response is empty"),
    ({**HH_ROW, "chosen": "honey tiger"}, "field 'chosen' is not a transcript"),
])
def test_bad_hh_rlhf_rows_name_file_row_and_reason(tok, tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_ROW, bad])
    with pytest.raises(ValueError, match=rf"hh\.jsonl row 2: {reason}"):
        build_datasets(data_cfg(path, "hh_rlhf"), tok, "pairs", 0)


# ---- column renaming ----------------------------------------------------------------------------------------
def test_columns_rename_a_sources_fields(tok, tmp_path):
    rows = [{"question": "Say hi.", "good": "hi", "bad": "bye", "prompt": "an unrelated column"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    for fmt in ("pairwise_strings", "auto"):
        train, _, _ = build_datasets(data_cfg(path, fmt, source={"columns": columns}), tok, "pairs", 0)
        assert tok.decode(train[0]["prompt_ids"]) == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
        assert tok.decode(train[0]["chosen_ids"]) == "hi<|im_end|>"
        assert tok.decode(train[0]["rejected_ids"]) == "bye<|im_end|>"


def test_columns_errors_name_the_source_and_the_valid_names(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Say hi.", "answer": "hi"}])
    with pytest.raises(KeyError, match=r"columns maps unknown field\(s\) answer; valid: chosen, completion"):
        build_datasets(data_cfg(path, source={"columns": {"answer": "answer"}}), tok, "sft", 0)
    with pytest.raises(KeyError, match=r"qa\.jsonl.*columns names reply, not among its columns question, answer"):
        build_datasets(data_cfg(path, source={"columns": {"prompt": "question", "completion": "reply"}}),
                       tok, "sft", 0)


# ---- auto-detection -----------------------------------------------------------------------------------------
ULTRAFEEDBACK = {
    "prompt": "What colour is the sky?", "prompt_id": "abc",
    "chosen": [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Red."}],
    "messages": [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."}],
    "score_chosen": 8.0, "score_rejected": 2.0,
}


@pytest.mark.parametrize("row,kind,expected", [
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "sft", "alpaca"),
    ({"prompt": "Say hi.", "completion": "hi"}, "sft", "prompt_completion"),
    (SHAREGPT_CHAT, "sft", "sharegpt"),
    (ULTRAFEEDBACK, "sft", "messages"),  # ultrachat / ultrafeedback: the same file serves SFT and pairs
    (ULTRAFEEDBACK, "pairs", "pairwise_messages"),
    ({"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}, "pairs", "pairwise_strings"),
    (HH_ROW, "pairs", "hh_rlhf"),
])
def test_auto_detects_the_one_fitting_format_and_logs_it(tok, tmp_path, caplog, row, kind, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    with caplog.at_level(logging.INFO, logger="tunelab.data.pipeline"):
        train, _, counts = build_datasets(data_cfg(path, fmt=None), tok, kind, 0)  # no format: auto
    assert f"data.jsonl: format auto -> {expected} (columns " in caplog.text
    assert len(train) == 1 and counts["train/ok"] == 1


def test_auto_refuses_columns_that_fit_no_format_or_several(tok, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Say hi.", "answer": "hi"}])
    with pytest.raises(ValueError, match=r"odd\.jsonl \(format: auto\): its columns \(question: string, answer: "
                                         r"string\) fit none of the sft formats: alpaca \(instruction: string"):
        build_datasets(data_cfg(path), tok, "sft", 0)
    # strings in chosen/rejected with a prompt column, the chosen text a transcript: either reading is possible
    path = write_jsonl(tmp_path / "both.jsonl", [{**HH_ROW, "prompt": "Reverse the words."}])
    with pytest.raises(ValueError, match="fit several formats: pairwise_strings, hh_rlhf"):
        build_datasets(data_cfg(path), tok, "pairs", 0)


# ---- conversations a template cannot render: bad rows, not a traceback without a row -------------------------
def test_multi_turn_rows_under_the_alpaca_template_are_bad_rows(tok, tmp_path):
    single = {"conversations": SHAREGPT_CHAT["conversations"][:2]}
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [single, SHAREGPT_CHAT])
    with pytest.raises(ValueError, match=r"sharegpt\.jsonl row 2: the alpaca template takes exactly one user turn"):
        build_datasets(data_cfg(path, "sharegpt", template="alpaca"), tok, "sft", 0)
    train, _, counts = build_datasets(data_cfg(path, "sharegpt", template="alpaca", on_error="skip"), tok, "sft", 0)
    assert len(train) == 1 and counts["train/error"] == 1


def test_a_chat_template_refusing_a_conversation_makes_a_bad_row(tmp_path):
    strict = tiny_tokenizer()  # a template that, like Mistral-Instruct's, checks the roles it is given
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [SHAREGPT_CHAT, SHAREGPT_TOOLS])
    with pytest.raises(ValueError, match=r"sharegpt\.jsonl row 2: the tokenizer's chat template refused this "
                                         r"conversation: Conversation roles must alternate user/assistant"):
        build_datasets(data_cfg(path, "sharegpt"), strict, "sft", 0)


# ---- docs/data_formats.md against data/formats.py ---------------------------------------------------------------
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "data_formats.md")


def doc_examples() -> dict[str, list[dict]]:
    """Each ```json block of the page under the `**<format>**` paragraph that introduces it."""
    examples: dict[str, list[dict]] = {}
    for name, block in re.findall(r"^\*\*(\w+)\*\*.*?```json\n(.*?)```", open(DOC).read(), re.M | re.S):
        examples.setdefault(name, []).append(json.loads(block))
    return examples


def test_the_format_pages_field_table_is_the_code_s():
    rows = [f"| `{name}` | {'SFT' if name in SFT_FORMATS else 'unpaired' if name in UNPAIRED_FORMATS else 'pairs'} | "
            + ", ".join(f"`{column}` ({kind})" for column, kind in fields.items()) + " |"
            for name, fields in FORMAT_FIELDS.items()]
    assert "| Format | Data | Fields |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n" in open(DOC).read()
    assert set(FORMAT_FIELDS) == set(SFT_FORMATS) | set(PAIR_FORMATS) | set(UNPAIRED_FORMATS)


def test_each_formats_example_row_on_the_page_is_read_by_it_and_detected_as_it():
    examples = doc_examples()
    assert sorted(examples) == sorted(FORMAT_FIELDS) and all(len(rows) == 1 for rows in examples.values())
    for name, [row] in examples.items():
        kind = "sft" if name in SFT_FORMATS else "unpaired" if name in UNPAIRED_FORMATS else "pairs"
        (SFT_FORMATS | PAIR_FORMATS | UNPAIRED_FORMATS)[name](row)  # raises RowError if the example is not a valid row
        column_kinds = {column: "string" if isinstance(value, str) else "bool" if isinstance(value, bool) else
                        "turns" if isinstance(value, list) and all(isinstance(t, dict) for t in value) else None
                        for column, value in row.items()}
        assert detect_format(column_kinds, row, kind)[0] == name
