"""Iterative rounds (trainers/rounds.py): the run directory's bookkeeping, resume after a kill mid-generation,
mid-training and between rounds equal to the uninterrupted run, each round's reference model, SPIN's gold pairs and
OPTune's prompt selection, on the tiny model with a tiny random reward model built here."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch
import yaml
from conftest import make_cfg, read_metrics
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from tunelab.data.formats import RowError
from tunelab.data.onpolicy import NO_GENERATION, SAME_AS_GOLD, gold_pairs, gold_response, read_jsonl
from tunelab.data.prompt_selection import lowest_reward, select_prompts
from tunelab.trainers import rounds as rounds_module
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.interrupt import TrainingInterrupted
from tunelab.trainers.models import build_model, build_tokenizer, tiny_tokenizer
from tunelab.trainers.reference import resolve_strategy
from tunelab.trainers.rounds import RoundsRunner
from tunelab.trainers.scoring import NO_STATS
from tunelab.trainers.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A random tiny reward model, saved like any sequence-classification model."""
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, num_labels=1)
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("judge")
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def overrides(judge: str, out, *extra: str) -> list[str]:
    return ["recipe=iterative_dpo", f"output_dir={out}", f"rounds.reward_model={judge}", "rounds.count=2",
            "rounds.prompts.num_rows=6", "rounds.samples=3", "rounds.max_new_tokens=6", "train.max_steps=3",
            "train.global_batch_size=2", "train.micro_batch_size=2", "train.log_every=1", "train.save_every=1",
            "train.progress_bar=false", "train.plot=false", *extra]


def run(judge, out, *extra) -> RoundsRunner:
    runner = RoundsRunner(make_cfg(overrides(judge, out, *extra), fast=False), recipe_name="test")
    runner.run()
    return runner


def losses(out, k: int) -> list[float]:
    return [row["loss"] for row in read_metrics(os.path.join(out, f"round_{k}", "train"))]


def same_rounds(a, b, count: int = 2) -> None:
    for k in range(count):
        for name in ("generations.jsonl", "scored.jsonl", "pairs.jsonl"):
            with open(os.path.join(a, f"round_{k}", name)) as x, open(os.path.join(b, f"round_{k}", name)) as y:
                assert x.read() == y.read(), (k, name)
        assert losses(a, k) == losses(b, k)


@pytest.fixture(scope="module")
def uninterrupted(judge, tmp_path_factory, cache_dir_module):
    out = tmp_path_factory.mktemp("runs") / "whole"
    run(judge, out)
    reset_accelerate()
    return out


@pytest.fixture(scope="module")
def cache_dir_module(tmp_path_factory):
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


# ---- bookkeeping ------------------------------------------------------------------------------------------------

def test_each_round_writes_its_files_and_starts_from_the_previous_export(uninterrupted):
    out = str(uninterrupted)
    state = json.load(open(os.path.join(out, "rounds.json")))["rounds"]
    assert [entry["round"] for entry in state] == [0, 1]
    for k, entry in enumerate(state):
        assert {"generations", "scored", "pairs", "trained"} <= set(entry)
        assert entry["trained"]["steps"] == 3 and entry["trained"]["regenerated"] == 6
        assert entry["trained"]["export"] == os.path.join(out, f"round_{k}", "train", "export")
        scored, _ = read_jsonl(os.path.join(out, f"round_{k}", "scored.jsonl"))
        pairs, _ = read_jsonl(os.path.join(out, f"round_{k}", "pairs.jsonl"))
        assert len(scored) == 6 and all(len(row["scores"]) == 3 for row in scored)
        for pair in pairs:  # best vs worst of the prompt's samples, the rewards under both names
            row = scored[pair["prompt_index"]]
            assert pair["chosen_reward"] == pair["score_chosen"] == max(row["scores"])
            assert pair["rejected_reward"] == pair["score_rejected"] == min(row["scores"])
            assert pair["chosen"][-1]["content"] == row["responses"][row["scores"].index(max(row["scores"]))]
    round1 = yaml.safe_load(open(os.path.join(out, "round_1", "train", "config.yaml")))
    assert round1["model"]["source"] == "hf"
    assert round1["model"]["name_or_path"] == os.path.join(out, "round_0", "train", "export")
    assert round1["data"]["sources"] == [{"path": os.path.join(out, "round_1", "pairs.jsonl"),
                                          "format": "pairwise_messages"}]
    first = read_jsonl(os.path.join(out, "round_0", "generations.jsonl"))[0]
    second = read_jsonl(os.path.join(out, "round_1", "generations.jsonl"))[0]
    assert [r["responses"] for r in first] != [r["responses"] for r in second]  # a new policy and a new draw


def test_a_non_empty_output_dir_is_refused_without_resume(judge, uninterrupted):
    with pytest.raises(FileExistsError, match="not empty"):
        RoundsRunner(make_cfg(overrides(judge, uninterrupted), fast=False))


# ---- resume -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_mid_generation_and_between_rounds_equals_the_uninterrupted_run(judge, uninterrupted, tmp_path,
                                                                               monkeypatch):
    # between rounds: killed right after round 0 was recorded
    between = tmp_path / "between"
    shutil.copytree(uninterrupted, between)
    shutil.rmtree(between / "round_1")
    state = json.load(open(between / "rounds.json"))
    json.dump({"rounds": state["rounds"][:1]}, open(between / "rounds.json", "w"))
    run(judge, between, "resume=auto")
    reset_accelerate()
    same_rounds(uninterrupted, between)

    # mid-generation in round 1: two prompts written, a third torn mid-line, nothing after it
    mid = tmp_path / "mid"
    shutil.copytree(uninterrupted, mid)
    lines = open(mid / "round_1" / "generations.jsonl").read().splitlines(keepends=True)
    for name in ("scored.jsonl", "pairs.jsonl"):
        os.remove(mid / "round_1" / name)
    shutil.rmtree(mid / "round_1" / "train")
    with open(mid / "round_1" / "generations.jsonl", "w") as handle:
        handle.write("".join(lines[:2]) + lines[2][:15])
    json.dump({"rounds": state["rounds"][:1]}, open(mid / "rounds.json", "w"))
    generated = []
    original = rounds_module.TransformersBackend.generate
    monkeypatch.setattr(rounds_module.TransformersBackend, "generate",
                        lambda self, items, settings: generated.extend(i for i, _ in items) or
                        original(self, items, settings))
    run(judge, mid, "resume=auto")
    assert sorted(generated) == [2, 3, 4, 5]  # finished prompts are not regenerated
    same_rounds(uninterrupted, mid)


@pytest.mark.slow
def test_resume_after_a_signal_mid_training_equals_the_uninterrupted_run(judge, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    original = Trainer.train_step

    def step_then_signal(self):
        result = original(self)
        if self.output_dir.endswith(os.path.join("round_1", "train")) and self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the step ends, a checkpoint is written
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted, match=r"round 1: .*resume=auto"):
        run(judge, out)
    reset_accelerate()
    assert "trained" not in json.load(open(out / "rounds.json"))["rounds"][1]
    monkeypatch.setattr(Trainer, "train_step", original)
    run(judge, out, "resume=auto")
    same_rounds(uninterrupted, out)


# ---- the reference of each round --------------------------------------------------------------------------------

def round_trainer(runner: RoundsRunner, k: int, out) -> Trainer:
    """Round ``k``'s Trainer (built, not run) on round 0's pairs, in a fresh directory ``out``."""
    cfg = runner.train_config(k, os.path.join(runner.round_dir(0), "pairs.jsonl"))
    cfg.output_dir, cfg.resume = str(out), None
    return Trainer(cfg, recipe_name="t")


def reference_and_direct(runner: RoundsRunner, k: int, direct_model, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(the round-k Trainer's reference log-probs of a batch, the same computed directly with ``direct_model``)."""
    trainer = round_trainer(runner, k, out)
    batch = trainer.collator([trainer.train_ds[i] for i in range(2)])
    served = trainer.reference.with_logps(batch, trainer.policy).ref_seq_logps
    wrapper = CausalLMWithLogProbs(direct_model.eval(), 1024, attention_tile=trainer.cfg.train.attention_tile)
    with torch.no_grad():
        direct = wrapper(batch, NO_STATS).seq_logps
    reset_accelerate()
    return served, direct


def test_round_start_reference_is_the_previous_rounds_export(judge, uninterrupted, tmp_path):
    runner = RoundsRunner(make_cfg(overrides(judge, uninterrupted, "resume=auto"), fast=False))
    export = AutoModelForCausalLM.from_pretrained(os.path.join(runner.round_dir(0), "train", "export"))
    served, direct = reference_and_direct(runner, 1, export, tmp_path / "r")
    torch.testing.assert_close(served, direct, rtol=1e-5, atol=1e-4)


def test_initial_reference_is_the_runs_initial_model_from_round_one_on(judge, uninterrupted, tmp_path):
    runner = RoundsRunner(make_cfg(overrides(judge, uninterrupted, "resume=auto", "rounds.reference=initial"),
                                   fast=False))
    assert runner.train_config(0, "p").reference.model_path is None  # round 0 starts from the initial model
    cfg = runner.cfg
    initial = build_model(cfg.model, build_tokenizer(cfg.model), cfg.seed)
    served, direct = reference_and_direct(runner, 1, initial, tmp_path / "a")
    torch.testing.assert_close(served, direct, rtol=1e-5, atol=1e-4)
    export = AutoModelForCausalLM.from_pretrained(os.path.join(runner.round_dir(0), "train", "export"))
    _, trained = reference_and_direct(runner, 1, export, tmp_path / "b")
    assert not torch.allclose(served, trained, atol=1e-3)  # round 0 trained: another model


def test_no_reference_for_a_reference_free_loss_and_refused_for_dpo(judge, uninterrupted, tmp_path):
    with pytest.raises(ValueError, match="rounds.reference=none: the loss dpo needs a reference"):
        RoundsRunner(make_cfg(overrides(judge, uninterrupted, "resume=auto", "rounds.reference=none"), fast=False))
    simpo = overrides(judge, uninterrupted, "resume=auto", "recipe=iterative_simpo")
    runner = RoundsRunner(make_cfg(simpo, fast=False))
    assert round_trainer(runner, 1, tmp_path / "s").reference is None


def test_a_reference_model_path_is_a_frozen_copy_and_refuses_strategies_that_score_the_policy():
    cfg = make_cfg(["recipe=dpo", "reference.model_path=/somewhere"])
    assert resolve_strategy(cfg)[0] == "frozen_copy"
    cfg.reference.strategy = "precomputed"
    with pytest.raises(ValueError, match="reference.model_path=/somewhere needs reference.strategy=frozen_copy"):
        resolve_strategy(cfg)


# ---- SPIN pairs and OPTune's selection --------------------------------------------------------------------------

def test_spin_pairs_put_the_gold_response_against_the_generation():
    user = [{"role": "user", "content": "Count to three."}]
    rows = [{"messages": user, "responses": ["1 2"]}, {"messages": user, "responses": ["  "]},
            {"messages": user, "responses": ["1 2 3"]}]
    pairs, stats = gold_pairs(rows, ["1 2 3", "1 2 3", "1 2 3"])
    assert pairs == [{"prompt": "Count to three.", "chosen": [*user, {"role": "assistant", "content": "1 2 3"}],
                      "rejected": [*user, {"role": "assistant", "content": "1 2"}], "score_chosen": None,
                      "score_rejected": None}]
    assert (stats.prompts, stats.pairs, stats.dropped[NO_GENERATION], stats.dropped[SAME_AS_GOLD]) == (3, 1, 1, 1)
    assert gold_response({"instruction": "a", "input": "", "output": "b"}) == "b"
    assert gold_response({"messages": [*user, {"role": "assistant", "content": "c"}]}) == "c"
    with pytest.raises(RowError, match="no gold response"):
        gold_response({"prompt": "a"})


def test_spin_round_trains_gold_against_the_previous_iterates_answer(tmp_path):
    out = tmp_path / "spin"
    runner = RoundsRunner(make_cfg(["recipe=spin", f"output_dir={out}", "rounds.count=1", "rounds.prompts.num_rows=4",
                                    "rounds.max_new_tokens=6", "train.max_steps=1", "train.global_batch_size=2",
                                    "train.micro_batch_size=2", "train.progress_bar=false", "train.plot=false"],
                                   fast=False))
    runner.run()
    generations = read_jsonl(os.path.join(out, "round_0", "generations.jsonl"))[0]
    for pair in read_jsonl(os.path.join(out, "round_0", "pairs.jsonl"))[0]:
        i = pair["prompt_index"]
        assert pair["chosen"][-1]["content"] == runner.rows[i]["output"]  # the bundled SFT answer
        assert pair["rejected"][-1]["content"] == generations[i]["responses"][0]


def test_optune_selection_regenerates_the_lowest_rewarded_prompts_by_hand():
    previous = {0: 1.0, 1: -2.0, 2: None, 3: 0.5, 4: -2.0}
    # ceil(0.6 x 5) = 3: the prompt without a pair, then the two at -2.0 (lower index first on the tie)
    assert lowest_reward(previous, fraction=0.6) == [1, 2, 4]
    assert lowest_reward(previous, fraction=0.2) == [2]
    assert lowest_reward(previous, fraction=1.0) == [0, 1, 2, 3, 4]
    assert select_prompts(None, previous) == [0, 1, 2, 3, 4]
    assert select_prompts({"name": "optune_lowest_reward", "fraction": 0.4}, previous) == [1, 2]
    with pytest.raises(KeyError, match="unknown rounds.selection.name 'best'"):
        select_prompts({"name": "best"}, previous)
    with pytest.raises(ValueError, match="fraction=0"):
        lowest_reward(previous, fraction=0)


def test_a_selective_round_regenerates_only_the_selected_prompts_and_keeps_the_other_pairs(judge, tmp_path):
    out = tmp_path / "optune"
    runner = run(judge, out, "rounds.selection={name: optune_lowest_reward, fraction: 0.5}")
    before = {p["prompt_index"]: p for p in read_jsonl(os.path.join(out, "round_0", "pairs.jsonl"))[0]}
    after = {p["prompt_index"]: p for p in read_jsonl(os.path.join(out, "round_1", "pairs.jsonl"))[0]}
    rewards = {i: before[i]["chosen_reward"] if i in before else None for i in range(6)}
    chosen = lowest_reward(rewards, 0.5)
    assert len(chosen) == math.ceil(0.5 * 6) and runner.selected_prompts(1) == chosen
    assert len(read_jsonl(os.path.join(out, "round_1", "generations.jsonl"))[0]) == len(chosen)
    for i, pair in after.items():
        assert (pair["round"] == 1) == (i in chosen)
        if i not in chosen:
            assert pair == before[i]
