"""On-policy pairs (data/onpolicy.py): best/worst choice and its edge cases, drop counts, prompts from every row format,
torn JSONL tails, and the written pairs read back by the training data pipeline (format auto and named)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tunelab.data.formats import RowError
from tunelab.data.onpolicy import (
    ALL_TIED,
    BELOW_MARGIN,
    EMPTY,
    FEWER_THAN_TWO,
    best_and_worst,
    build_pairs,
    prompt_turns,
    read_jsonl,
)
from tunelab.data.pipeline import build_datasets
from tunelab.trainers.models import tiny_tokenizer

USER = [{"role": "user", "content": "Name a colour."}]


def test_best_and_worst_pick_the_extremes_first_index_on_ties():
    assert best_and_worst(["a", "b", "c"], [0.1, 0.9, -0.3]) == (1, 2)
    assert best_and_worst(["a", "b", "c", "d"], [2.0, 2.0, -1.0, -1.0]) == (0, 2)


def test_edge_cases_give_their_reason():
    assert best_and_worst(["only one"], [1.0]) == FEWER_THAN_TWO
    assert best_and_worst([], []) == FEWER_THAN_TWO
    assert best_and_worst(["x", "y", "z"], [0.5, 0.5, 0.5]) == ALL_TIED
    assert best_and_worst(["", "  \n", "x"], [3.0, -3.0, 0.0]) == EMPTY
    # an empty sample is never chosen or rejected, whatever its score
    assert best_and_worst(["", "good", "bad"], [9.0, 1.0, 0.0]) == (1, 2)


def test_margin_threshold_keeps_equal_and_drops_smaller():
    assert best_and_worst(["a", "b"], [1.0, 0.5], min_margin=0.5) == (0, 1)
    assert best_and_worst(["a", "b"], [1.0, 0.51], min_margin=0.5) == BELOW_MARGIN
    with pytest.raises(ValueError, match="not a finite number"):
        best_and_worst(["a", "b"], [1.0, float("nan")])
    with pytest.raises(ValueError, match="2 responses but 1 scores"):
        best_and_worst(["a", "b"], [1.0])


def _row(responses, scores, turns=USER):
    return {"messages": turns, "responses": responses, "scores": scores}


def test_build_pairs_counts_each_reason_and_writes_ultrafeedback_rows():
    system = [{"role": "system", "content": "Be brief."}, *USER]
    rows = [
        _row(["Red.", "Blue, like the sky.", "Green."], [0.2, 1.5, -0.4], system),
        _row(["same", "same"], [0.3, 0.3]),
        _row(["lonely"], [1.0]),
        _row(["", "x"], [0.0, 1.0]),
        _row(["a", "b"], [0.0, 0.05]),
        _row(["c", "d"], [2.0, 0.0]),
    ]
    pairs, stats = build_pairs(rows, min_margin=0.1)
    assert (stats.prompts, stats.pairs) == (6, 2)
    assert dict(stats.dropped) == {ALL_TIED: 1, FEWER_THAN_TWO: 1, EMPTY: 1, BELOW_MARGIN: 1}
    assert stats.summary() == ("2 pairs from 6 prompts; dropped: 1 fewer than 2 samples, 1 fewer than 2 non-empty "
                               "samples, 1 all samples tied, 1 best - worst below min_margin")
    assert pairs[0] == {
        "prompt": "Name a colour.",
        "chosen": [*system, {"role": "assistant", "content": "Blue, like the sky."}],
        "rejected": [*system, {"role": "assistant", "content": "Green."}],
        "score_chosen": 1.5, "score_rejected": -0.4,
    }
    assert pairs[1]["chosen"][-1]["content"] == "c" and pairs[1]["rejected"][-1]["content"] == "d"
    with pytest.raises(KeyError, match="row 1 lacks scores"):
        build_pairs([{"messages": USER, "responses": ["a"]}])


@pytest.mark.parametrize("fmt", ["pairwise_messages", "auto"])
def test_written_pairs_train_through_the_data_pipeline(tmp_path, fmt):
    tok = tiny_tokenizer()
    rows = [_row(["Blue.", "Red, I think."], [1.0, 0.0]), _row(["Yes.", "No."], [-1.0, 2.0],
                                                              [{"role": "user", "content": "Is it raining?"}])]
    pairs, _ = build_pairs(rows)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = OmegaConf.create(dict(
        sources=[{"path": str(path), "format": fmt}], template="chat", max_length=256, max_prompt_length=192,
        truncation="shared_budget", packing=True, shared_prompt=True, eval_fraction=0.0, on_error="raise",
        num_proc=None))
    train, _, counts = build_datasets(cfg, tok, "pairs", 0)
    assert counts["train/ok"] == 2
    assert tok.decode(train[0]["prompt_ids"]) == tok.apply_chat_template(USER, tokenize=False,
                                                                         add_generation_prompt=True)
    assert tok.decode(train[0]["chosen_ids"]) == "Blue.<|im_end|>"
    assert tok.decode(train[1]["chosen_ids"]) == "No.<|im_end|>"
    assert tok.decode(train[1]["rejected_ids"]) == "Yes.<|im_end|>"


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Hi?"}, [{"role": "user", "content": "Hi?"}]),
    ({"prompt": USER}, USER),
    ({"messages": [*USER, {"role": "assistant", "content": "Red."}]}, USER),
    ({"instruction": "Add.", "input": "2 3", "output": "5"}, [{"role": "user", "content": "Add.\n\n2 3"}]),
    ({"instruction": "Add 2 and 3."}, [{"role": "user", "content": "Add 2 and 3."}]),
    ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}, [{"role": "user", "content": "Hi?"}]),
    ({"chosen": [*USER, {"role": "assistant", "content": "Red."}],
      "rejected": [*USER, {"role": "assistant", "content": "Rd."}]}, USER),
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."},
     [{"role": "user", "content": "Hi?"}]),
])
def test_prompt_turns_of_every_format(row, expected):
    assert prompt_turns(row) == expected


@pytest.mark.parametrize("row, message", [
    ({"prompt": "  "}, "field 'prompt' is empty"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "must end with a user turn"),
    ({"text": "nothing I know"}, "fit none of the pairs formats"),
])
def test_bad_prompt_rows_say_why(row, message):
    with pytest.raises(RowError, match=message):
        prompt_turns(row)


def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "respo')
    assert read_jsonl(str(path)) == ([{"index": 0}, {"index": 1}], True)
    path.write_text('{"index": 0}\n{"index": 1}\n')
    assert read_jsonl(str(path)) == ([{"index": 0}, {"index": 1}], False)
    path.write_text('{"index": 0}\n{"index": 1')  # a complete object without its newline is still torn
    assert read_jsonl(str(path)) == ([{"index": 0}], True)
    path.write_text('{"index": 0}\n{"ind\n{"index": 2}\n')
    with pytest.raises(ValueError, match=r"g.jsonl:2: not a JSON line"):
        read_jsonl(str(path))
