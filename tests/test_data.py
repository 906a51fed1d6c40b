"""Tokenization with prompt masking, templates, truncation, sources, and bad-input errors."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from data.pipeline import build_datasets
from data.sources import DataFileError
from data.templates import build_template, encode_segments
from trainers.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def data_cfg(**over):
    base = dict(
        sources=[{"path": "bundled:instructions", "format": "alpaca", "num_rows": 50}],
        template="chat", max_length=256, max_prompt_length=192, truncation="truncate", packing=True,
        shared_prompt=True, eval_fraction=0.0, on_error="raise", num_proc=None,
    )
    base.update(over)
    return OmegaConf.create(base)


def test_chat_masking_labels_only_assistant_tokens_and_eos(tok):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Repeat the word two times."},
        {"role": "assistant", "content": "stone stone"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "river river"},
    ]
    ids, mask = encode_segments(tok, build_template("chat", tok).segments(turns))
    targets = tok.decode([i for i, m in zip(ids, mask) if m])
    assert targets == "stone stone<|im_end|>river river<|im_end|>"
    # everything else (system, user turns, role headers, newlines after EOS) is unlabelled
    context = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Be brief." in context and "Again" in context and "stone" not in context
    # the full sequence is exactly the chat template's rendering of the conversation
    assert tok.decode(ids) == tok.apply_chat_template(turns, tokenize=False)


def test_prompt_tokens_are_exactly_the_generation_prompt(tok):
    turns = [{"role": "user", "content": "Name the capital city of the country.\n\nArnland"},
             {"role": "assistant", "content": "The capital of Arnland is Velmora."}]
    template = build_template("chat", tok)
    ids, mask = encode_segments(tok, template.segments(turns))
    prompt_ids = tok(template.prompt(turns[:1]), add_special_tokens=False)["input_ids"]
    assert ids[: mask.index(1)] == prompt_ids


def test_alpaca_template_sections_and_eos(tok):
    turns = [{"role": "user", "content": "Add numbers.", "input": "2 3"}, {"role": "assistant", "content": "5"}]
    segments = build_template("alpaca", tok).segments(turns)
    assert segments[0][0].endswith("### Instruction:\nAdd numbers.\n\n### Input:\n2 3\n\n### Response:\n")
    assert segments[1] == ("5<|im_end|>", True)


def test_sft_truncation_keeps_prompt_and_cuts_response(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "completion": " ".join(["stone"] * 200)}) + "\n")
    cfg = data_cfg(sources=[{"path": str(path), "format": "prompt_completion"}], max_length=40)
    train, _, counts = build_datasets(cfg, tok, "sft", 0)
    assert len(train[0]["input_ids"]) == 40 and counts["train/truncated"] == 1
    cfg = data_cfg(sources=[{"path": str(path), "format": "prompt_completion"}], max_length=40, truncation="drop")
    with pytest.raises(ValueError, match="no training examples left"):
        build_datasets(cfg, tok, "sft", 0)


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")


GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


@pytest.mark.parametrize("bad,reason", [
    ({"instruction": "x", "input": ""}, "missing field 'output'"),
    ({"instruction": "x", "input": "", "output": "   "}, "field 'output' is empty"),
    ({"instruction": 3, "input": "", "output": "y"}, "must be a string"),
])
def test_bad_rows_name_file_and_row(tok, tmp_path, bad, reason):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [GOOD, GOOD, bad, GOOD])
    cfg = data_cfg(sources=[{"path": str(path), "format": "alpaca"}])
    with pytest.raises(ValueError, match=rf"bad\.jsonl row 3: .*{reason}"):
        build_datasets(cfg, tok, "sft", 0)
    train, _, counts = build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}], on_error="skip"),
                                      tok, "sft", 0)
    assert len(train) == 3 and counts["train/error"] == 1


def test_overlong_prompt_is_a_bad_row(tok, tmp_path):
    path = tmp_path / "long.jsonl"
    write_jsonl(path, [GOOD, {"instruction": " ".join(["river"] * 300), "input": "", "output": "ok"}])
    with pytest.raises(ValueError, match=r"long\.jsonl row 2: prompt has \d+ tokens"):
        build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}], max_length=64), tok, "sft", 0)


def test_malformed_json_line_named_or_skipped(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    write_jsonl(path, [GOOD], raw_lines=['{"instruction": "x", "output": ', json.dumps(GOOD)])
    with pytest.raises(DataFileError, match=r"broken\.jsonl:2: malformed JSON line"):
        build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}]), tok, "sft", 0)
    train, _, counts = build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}], on_error="skip"),
                                      tok, "sft", 0)
    assert len(train) == 2 and counts["train/unreadable"] == 1


def test_unknown_format_template_and_bundled_names_list_valid_ones(tok):
    with pytest.raises(KeyError, match="valid: alpaca, messages, prompt_completion"):
        build_datasets(data_cfg(sources=[{"path": "bundled:instructions", "format": "alpacca"}]), tok, "sft", 0)
    with pytest.raises(KeyError, match="valid: chat, alpaca"):
        build_datasets(data_cfg(template="zephyr"), tok, "sft", 0)
    with pytest.raises(KeyError, match="valid: instructions, preferences"):
        build_datasets(data_cfg(sources=[{"path": "bundled:nope", "format": "alpaca"}]), tok, "sft", 0)


def test_mixture_weights_split_and_determinism(tok, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    write_jsonl(a, [{"instruction": f"a{i}", "input": "", "output": "x"} for i in range(40)])
    import datasets

    datasets.Dataset.from_list([{"prompt": f"b{i}", "completion": "y"} for i in range(40)]).to_parquet(str(b))
    cfg = data_cfg(sources=[{"path": str(a), "format": "alpaca", "weight": 0.5},
                            {"path": str(b), "format": "prompt_completion", "weight": 2.0}], eval_fraction=0.1)
    train, evaluation, _ = build_datasets(cfg, tok, "sft", 0)
    # 20 rows of a, 80 of b; 10% of each held out
    assert len(train) + len(evaluation) == 100 and len(evaluation) == 10
    again, _, _ = build_datasets(cfg, tok, "sft", 0)
    assert train["input_ids"] == again["input_ids"]
