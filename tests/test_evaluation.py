"""Evaluation entry point on tiny models saved to tmp: batched generation and judging, report, AlpacaEval file."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.evaluation import (
    _chat,
    compare,
    generate_greedy,
    read_prompts,
    read_responses,
)
from tunelab.trainers.models import tiny_tokenizer

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "evaluate.py")
_spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
evaluate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_script)

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello to the reader in one short line.", "Why?"]


def _config(tok):
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id, num_labels=1,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = tiny_tokenizer()
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    policy = LlamaForCausalLM(_config(tok)).eval()
    judge = LlamaForSequenceClassification(_config(tok)).eval()
    for name, model in (("policy", policy), ("judge", judge)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return tok, policy, judge, root


def test_batched_generation_equals_one_prompt_at_a_time(models):
    tok, policy, _, _ = models
    batched = generate_greedy(policy, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    alone = [generate_greedy(policy, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == alone
    assert all(isinstance(a, str) and a for a in batched)


def test_compare_counts_and_lengths_by_hand():
    # a judge that scores by length: the model wins 2, ties 1, loses 1
    report = compare(["a", "b", "c", "d"], ["xxxx", "xxx", "x", "xx"], ["x", "x", "xxx", "xx"],
                     lambda prompts, outs: [float(len(o)) for o in outs], bootstrap=0)
    assert (report["wins"], report["ties"], report["losses"]) == (2, 1, 1)
    assert report["win_rate"] == pytest.approx(0.625)
    # preferences [1, 1, 0, .5]: sample std sqrt(0.229166...), standard error its half
    assert report["standard_error"] == pytest.approx(math.sqrt(0.6875 / 3) / 2)
    assert report["avg_length_model"] == 2.5 and report["avg_length_baseline"] == 1.75


def test_readers_name_the_file_and_row(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(KeyError, match=r"p.jsonl: row 2 has none of the keys prompt, instruction"):
        read_prompts(str(bad))
    generated = tmp_path / "g.jsonl"
    generated.write_text('{"prompt": "x", "responses": ["first", "second"]}\n')
    assert read_responses(str(generated)) == {"x": "first"}


def test_script_writes_alpaca_eval_outputs_and_report(models, tmp_path):
    tok, policy, judge, root = models
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    baseline = tmp_path / "baseline.jsonl"
    baseline_texts = ["blue", "4", "hi", "because"]
    baseline.write_text("".join(json.dumps({"prompt": p, "responses": [r]}) + "\n"
                                for p, r in zip(PROMPTS, baseline_texts, strict=True)))
    out = tmp_path / "eval"
    report = evaluate_script.main([
        "--model", str(root / "policy"), "--baseline-outputs", str(baseline), "--judge", str(root / "judge"),
        "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "5", "--bootstrap", "10",
        "--generator", "tiny-policy",
    ])
    rows = json.loads((out / "model_outputs.json").read_text())
    assert [sorted(r) for r in rows] == [["generator", "instruction", "output"]] * len(PROMPTS)
    assert [r["instruction"] for r in rows] == PROMPTS and {r["generator"] for r in rows} == {"tiny-policy"}
    assert [r["output"] for r in rows] == generate_greedy(policy, tok, PROMPTS, max_new_tokens=5)

    def single(prompt, response):
        ids = tok(_chat(tok, prompt, response), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            return judge(**ids).logits[0, 0].item()

    expected = [
        1.0 if single(p, r["output"]) > single(p, b) else 0.0 if single(p, r["output"]) < single(p, b) else 0.5
        for p, r, b in zip(PROMPTS, rows, baseline_texts, strict=True)
    ]
    assert report["win_rate"] == pytest.approx(sum(expected) / len(expected))
    assert json.loads((out / "report.json").read_text()) == report


class _RecordingWandb:
    name = "wandb"

    def __init__(self):
        self.tables = []

    def log_table(self, table_name, columns, data, step):
        self.tables.append((table_name, columns, data, step))


def test_in_loop_samples_reach_the_samples_file_tensorboard_and_wandb(tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from conftest import make_cfg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tunelab.trainers.tracking import RunTracker

    tensorboard = TensorBoardTracker("run", str(tmp_path / "tb"))
    tensorboard.start()  # accelerate starts its trackers in init_trackers
    wandb = _RecordingWandb()
    accelerator = SimpleNamespace(is_main_process=True, trackers=[tensorboard, wandb])
    train_cfg = make_cfg(["train.progress_bar=false"]).train
    tracker = RunTracker(accelerator, str(tmp_path), 10, 0, train_cfg, {})
    tracker.log_samples(2, [{"prompt": "Name a colour.", "output": "red"}, {"prompt": "Why?", "output": "because"}])
    tracker.log_samples(4, [{"prompt": "Name a colour.", "output": "blue"}])
    tensorboard.writer.flush()

    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows == [{"step": 2, "prompt": "Name a colour.", "output": "red"},
                    {"step": 2, "prompt": "Why?", "output": "because"},
                    {"step": 4, "prompt": "Name a colour.", "output": "blue"}]
    assert wandb.tables[0] == ("eval/samples", ["step", "prompt", "output"],
                               [[2, "Name a colour.", "red"], [2, "Why?", "because"]], 2)
    events = EventAccumulator(tensorboard.logging_dir, size_guidance={"tensors": 0})
    events.Reload()
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("eval/samples/text_summary")]
    assert [step for step, _ in texts] == [2, 4]
    assert "**output:** because" in texts[0][1] and "**output:** blue" in texts[1][1]

    # a run resumed from step 2 logs step 4 again: the later row goes, step 2's stay
    RunTracker(SimpleNamespace(is_main_process=True, trackers=[]), str(tmp_path), 10, 2, train_cfg, {})
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2, 2]


def test_model_against_itself_as_generating_baseline_ties_everywhere(models, tmp_path):
    _, _, _, root = models
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": p} for p in PROMPTS]))
    report = evaluate_script.main([
        "--model", str(root / "policy"), "--baseline", str(root / "policy"), "--judge", str(root / "judge"),
        "--prompts", str(prompts), "--out", str(tmp_path / "eval"), "--max-new-tokens", "4", "--bootstrap", "5",
    ])
    # greedy answers are identical, so every judgement is a tie: win rate and LC win rate exactly one half
    assert report["ties"] == len(PROMPTS)
    assert report["win_rate"] == 0.5 and report["lc_win_rate"] == pytest.approx(0.5, abs=1e-12)
    assert report["lc_win_rate_ci"] == pytest.approx([0.5, 0.5], abs=1e-12)


def test_training_logs_greedy_samples_of_the_first_eval_prompts_at_each_evaluation(tmp_path):
    """train.eval_samples=2, evaluations at steps 0, 2 and 4: six rows; the last ones are the trained model's own
    greedy answers (the export, generating from the same prompt ids, reproduces them)."""
    from conftest import make_cfg
    from transformers import AutoModelForCausalLM

    from tunelab.trainers.evaluation import greedy_answers
    from tunelab.trainers.trainer import Trainer, prompt_ids

    run = tmp_path / "run"
    cfg = make_cfg([f"output_dir={run}", "train.max_steps=4", "train.eval_every=2", "train.eval_samples=2",
                    "train.eval_sample_tokens=8"])
    try:
        trainer = Trainer(cfg, recipe_name="samples")
        trainer.fit()
    finally:
        reset_accelerate()
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 0, 2, 2, 4, 4]
    prompts = [prompt_ids(trainer.eval_ds[i]) for i in range(2)]
    assert [r["prompt"] for r in rows[:2]] == [trainer.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    exported = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    assert [r["output"] for r in rows[4:]] == greedy_answers(exported, trainer.tokenizer, prompts, 8)
    assert rows[0]["output"] != rows[4]["output"] or rows[1]["output"] != rows[5]["output"]  # training changed them


def test_eval_samples_are_refused_for_a_reward_model(tmp_path):
    from conftest import make_cfg

    from tunelab.trainers.trainer import Trainer

    with pytest.raises(ValueError, match="train.eval_samples: this run trains a score head"):
        Trainer(make_cfg(["recipe=reward", f"output_dir={tmp_path}", "train.eval_samples=1"]), recipe_name="rm")
