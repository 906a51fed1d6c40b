"""Tokenization with prompt masking, templates, truncation, sources, and bad-input errors."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tunelab.data.pipeline import build_datasets
from tunelab.data.sources import DataFileError, expand_short_form, sources_overridden
from tunelab.data.templates import build_template, encode_segments
from tunelab.trainers.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def data_cfg(**over):
    base = dict(
        sources=[{"path": "bundled:instructions", "format": "alpaca", "num_rows": 50}],
        template="chat", max_length=256, max_prompt_length=192, truncation="shared_budget", packing=True,
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


# ---- determinism across processes and ranks ---------------------------------------------------------------------
FINGERPRINTS_SCRIPT = """
import json, sys
from omegaconf import OmegaConf
from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.data.pipeline import build_datasets
from tunelab.data.sources import BUNDLED, load_rows
from tunelab.trainers.models import tiny_tokenizer

out = {}
for name in BUNDLED:
    rows, _ = load_rows(OmegaConf.create({"path": "bundled:" + name}), "raise")
    out[name] = dataset_fingerprint(rows)
for config, kind in (("bundled_sft", "sft"), ("bundled_pref", "pairs")):
    cfg = OmegaConf.load(f"{sys.argv[1]}/recipes/data/{config}.yaml")
    cfg.sources[0].num_rows = 600
    train, evaluation, _ = build_datasets(cfg, tiny_tokenizer(), kind, 42)
    out[config] = [dataset_fingerprint(train), dataset_fingerprint(evaluation)]
cfg = OmegaConf.load(f"{sys.argv[1]}/recipes/data/bundled_sft.yaml")  # MCTune's control tags are sampled per row
cfg.sources = [{"path": "bundled:varied_instructions", "format": "alpaca", "num_rows": 200}]
cfg.max_length, cfg.max_prompt_length = 1024, 900
cfg.stages = [{"name": "mctune", "max_num_tags": 5, "quantize": "1to5"}]
train, evaluation, _ = build_datasets(cfg, tiny_tokenizer(), "sft", 42)
out["mctune"] = [dataset_fingerprint(train), dataset_fingerprint(evaluation)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_bundled_data_and_pipeline_output_do_not_depend_on_the_hash_seed():
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    procs = [subprocess.Popen([sys.executable, "-c", FINGERPRINTS_SCRIPT, ROOT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
             for hash_seed in ("1", "2")]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    first, second = results
    assert set(first) == {"instructions", "preferences", "varied_instructions", "bundled_sft", "bundled_pref",
                          "mctune"}
    assert first == second


def test_bundled_pairs_always_differ():
    from tunelab.data.bundled import preference_rows

    rows = preference_rows(20000)
    assert not [r for r in rows if r["chosen"] == r["rejected"]]
    # the one task whose mistake could equal the answer: words ending in their first letter, order reversed
    assert {"prompt": "Write the first letter of each word.\nwindow river", "chosen": "w r", "rejected": "r w"} in rows


def test_fingerprint_follows_content_not_construction():
    import datasets

    from tunelab.data.fingerprint import dataset_fingerprint

    rows = [{"input_ids": [1, 2, 3], "target_mask": [0, 1, 1], "_source": "a.jsonl", "_row": 1},
            {"input_ids": [4, 5], "target_mask": [1, 1], "_source": "a.jsonl", "_row": 2},
            {"input_ids": [6], "target_mask": [1], "_source": "a.jsonl", "_row": 3}]
    whole = datasets.Dataset.from_list(rows)
    # the same two rows, once as a filtered view (indices mapping over a sliced table), once built directly
    filtered = whole.filter(lambda r: r["_row"] != 2)
    direct = datasets.Dataset.from_list([rows[0], rows[2]])
    assert dataset_fingerprint(filtered) == dataset_fingerprint(direct)
    # one token moved from one example to the next: same flat values, other example boundaries
    moved = datasets.Dataset.from_list([{**rows[0], "input_ids": [1, 2]}, {**rows[2], "input_ids": [3, 6]}])
    assert dataset_fingerprint(moved) != dataset_fingerprint(direct)
    changed = datasets.Dataset.from_list([rows[0], {**rows[2], "_source": "b.jsonl"}])
    assert dataset_fingerprint(changed) != dataset_fingerprint(direct)
    assert dataset_fingerprint(None) != dataset_fingerprint(direct)


def test_ranks_with_different_data_are_refused_by_name():
    from tunelab.data.fingerprint import DataMismatchError, check_fingerprints_agree

    same = {"train": "a" * 64, "eval": "b" * 64}
    check_fingerprints_agree([same, dict(same), dict(same)])
    with pytest.raises(DataMismatchError, match=r"rank 2 train cccccccccccc != rank 0 aaaaaaaaaaaa"):
        check_fingerprints_agree([same, dict(same), {**same, "train": "c" * 64}])


@pytest.mark.slow
def test_two_ranks_hold_the_same_preference_data(tmp_path):
    """Each launched process gets its own random hash seed: both ranks must still build the same pairs."""
    import subprocess

    from tests.conftest import ROOT
    from tests.test_distributed import FAST, env, launch_args

    out = tmp_path / "run"
    proc = subprocess.run([*launch_args("ddp", 2), "recipe=dpo", f"output_dir={out}", *FAST, "train.max_steps=1",
                           "export.enabled=false"], cwd=ROOT, env={**env(), "PYTHONHASHSEED": "random"},
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "(same on 2 ranks)" in log, log[-4000:]


# ---- files that are not rows: named, with what was expected ----------------------------------------------------
LATIN1_ROW = '{"instruction": "Caf\xe9 order", "input": "", "output": "ok"}\n'.encode("latin-1")


def test_non_utf8_json_lines_name_the_line_or_are_skipped(tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() + LATIN1_ROW + (json.dumps(GOOD) + "\n").encode())
    with pytest.raises(DataFileError, match=r"latin1\.jsonl:2: byte 0xe9 at column 21 is not UTF-8 text"):
        build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}]), tok, "sft", 0)
    train, _, counts = build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}], on_error="skip"),
                                      tok, "sft", 0)
    assert len(train) == 2 and counts["train/unreadable"] == 1 and train["_row"] == [1, 3]


def test_non_utf8_json_list_is_refused_as_a_whole_file_with_its_line(tok, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b"[" + json.dumps(GOOD).encode() + b",\n" + LATIN1_ROW.rstrip() + b"]\n")
    for on_error in ("raise", "skip"):
        with pytest.raises(DataFileError, match=r"latin1\.json:2: byte 0xe9 is not UTF-8 .* cannot skip it"):
            build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}], on_error=on_error),
                           tok, "sft", 0)


@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", r"empty\.jsonl is empty: expected JSON lines"),
    ("blank.jsonl", "\n  \n", r"blank\.jsonl is empty: expected JSON lines"),
    ("empty.json", "[]", r"empty\.json is empty \(an empty list\)"),
    ("object.json", json.dumps(GOOD, indent=2),
     r"object\.json holds a single JSON object \(keys: instruction, input, output\); expected JSON lines"),
])
def test_files_without_rows_say_what_they_hold(tok, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFileError, match=message):
        build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca"}]), tok, "sft", 0)


def test_conversation_ending_in_a_user_turn_is_a_bad_row(tok, tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    trailing = {"messages": good["messages"] + [{"role": "user", "content": "And then?"}]}
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [good, trailing, good])
    with pytest.raises(ValueError, match=r"chat\.jsonl row 2: conversation ends with a user turn"):
        build_datasets(data_cfg(sources=[{"path": str(path), "format": "messages"}]), tok, "sft", 0)
    train, _, counts = build_datasets(data_cfg(sources=[{"path": str(path), "format": "messages"}], on_error="skip"),
                                      tok, "sft", 0)
    assert len(train) == 2 and counts["train/error"] == 1


# ---- dropped rows by kind -----------------------------------------------------------------------------------------
def test_dropped_rows_count_under_their_kind_with_one_example_each(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [GOOD,
            {"instruction": "a", "input": ""},                            # line 2: missing 'output'
            {"input": "", "output": "b"},                                 # line 3: missing 'instruction'
            GOOD,
            {"instruction": "c", "input": "", "output": " "},            # line 5: 'output' is empty
            {"instruction": "\t", "input": "", "output": "d"},           # line 6: 'instruction' is empty
            {"instruction": "e", "input": ""},                            # line 7: missing 'output'
            {"instruction": " ".join(["river"] * 300), "input": "", "output": "ok"}]  # line 8: prompt too long
    write_jsonl(path, rows, raw_lines=['{"instruction": ', "[1, 2]"])      # lines 9, 10: unreadable
    cfg = data_cfg(sources=[{"path": str(path), "format": "alpaca"}], on_error="skip", max_length=64)
    train, _, counts = build_datasets(cfg, tok, "sft", 0)
    dropped = {kind: d.count for kind, d in counts.dropped.items()}
    assert dropped == {"missing field": 3, "empty text": 2, "prompt longer than budget": 1, "malformed JSON": 1,
                       "not a JSON object": 1}
    # the kinds add up to every row dropped: 10 lines, 2 kept
    assert sum(dropped.values()) == counts["train/error"] + counts["train/unreadable"] == 10 - len(train) == 8
    assert counts.dropped["missing field"].example == f"{path} row 2: missing field 'output'"
    assert counts.dropped["empty text"].example == f"{path} row 5: field 'output' is empty"
    assert counts.dropped["malformed JSON"].example.startswith(f"{path}:9: malformed JSON line")
    assert counts.dropped_summary().startswith("dropped 8 rows: missing field 3 (e.g. ")


def test_identical_and_over_long_pairs_count_as_kinds_too(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    pair = {"prompt": "Reverse: stone river", "chosen": "river stone", "rejected": "stone stone"}
    write_jsonl(path, [pair, {**pair, "rejected": "river stone"}, {**pair, "chosen": " ".join(["river"] * 300)}])
    cfg = data_cfg(sources=[{"path": str(path), "format": "pairwise_strings"}], truncation="drop", max_length=64,
                   max_prompt_length=32)
    train, _, counts = build_datasets(cfg, tok, "pairs", 0)
    assert len(train) == 1
    assert {k: d.count for k, d in counts.dropped.items()} == {"identical responses": 1,
                                                              "too long (data.truncation=drop)": 1}
    assert counts.dropped["identical responses"].example == f"{path} row 2"
    assert counts.dropped["too long (data.truncation=drop)"].example.startswith(f"{path} row 3: ")


# ---- max_rows and the short form ----------------------------------------------------------------------------------
def test_max_rows_keeps_a_sources_first_rows_before_the_eval_split(tok, tmp_path):
    path = tmp_path / "many.jsonl"
    write_jsonl(path, [{"instruction": f"row {i}", "input": "", "output": "x"} for i in range(1, 41)])
    cfg = data_cfg(sources=[{"path": str(path), "format": "alpaca", "max_rows": 10}], eval_fraction=0.2)
    train, evaluation, _ = build_datasets(cfg, tok, "sft", 0)
    assert sorted(list(train["_row"]) + list(evaluation["_row"])) == list(range(1, 11)) and len(evaluation) == 2
    bundled = data_cfg(sources=[{"path": "bundled:instructions", "format": "alpaca", "max_rows": 7}])
    assert len(build_datasets(bundled, tok, "sft", 0)[0]) == 7
    with pytest.raises(ValueError, match=r"many\.jsonl.*max_rows=0 is invalid: valid values are null .* or an "
                                         r"integer > 0"):
        build_datasets(data_cfg(sources=[{"path": str(path), "format": "alpaca", "max_rows": 0}]), tok, "sft", 0)


def test_short_form_is_a_one_source_list(tok, tmp_path):
    from conftest import make_cfg

    path = tmp_path / "mine.jsonl"
    write_jsonl(path, [{"prompt": f"q{i}", "completion": "a"} for i in range(1, 21)])
    cfg = make_cfg([f"data.path={path}", "data.max_rows=5", "data.eval_fraction=0"], fast=False)
    expand_short_form(cfg.data)
    assert OmegaConf.to_container(cfg.data.sources) == [{"path": str(path), "format": "auto", "max_rows": 5}]
    assert (cfg.data.path, cfg.data.max_rows, cfg.data.max_length) == (None, None, 256)  # the rest stays
    train, _, _ = build_datasets(cfg.data, tok, "sft", 0)
    assert list(train["_row"]) == [1, 2, 3, 4, 5]
    # build_datasets expands it too (scripts and the Python API), and the long form's data is replaced
    cfg = make_cfg([f"data.path={path}", "data.format=prompt_completion", "data.eval_fraction=0"], fast=False)
    assert len(build_datasets(cfg.data, tok, "sft", 0)[0]) == 20


def test_short_form_with_sources_or_without_a_path_is_an_error_naming_the_keys(tmp_path):
    from conftest import make_cfg

    assert sources_overridden(["data.path=a.jsonl", "data.sources=[{path:b}]"])
    assert sources_overridden(["+data.sources.0.max_rows=3"]) and not sources_overridden(["data.path=a.jsonl"])
    cfg = make_cfg(["data.path=a.jsonl"], fast=False)
    with pytest.raises(ValueError, match=r"data.path=a.jsonl and data.sources are both given: give one"):
        expand_short_form(cfg.data, sources_given=True)
    with pytest.raises(ValueError, match=r"data.format, data.max_rows given without data.path"):
        expand_short_form(make_cfg(["data.format=alpaca", "data.max_rows=3"], fast=False).data)


def test_train_py_refuses_data_path_with_data_sources(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "train.py"), "data.path=mine.jsonl",
                           "data.sources=[{path:other.jsonl}]", f"output_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "data.path=mine.jsonl and data.sources are both given" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()
