"""Preference recipes: every recipe composes and builds its loss; each tiny preference recipe trains; the
reference strategies agree; SimPO and DPO learn the bundled preferences."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import RECIPES, make_cfg, read_metrics

from tunelab.losses import build_loss
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.trainer import Trainer

PREFERENCE_RECIPES = ["dpo", "ipo", "simpo", "rpo", "rpo_average", "wpo", "orpo", "cpo", "mpo"]
ALL_RECIPES = sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES, "recipe")) if f.endswith(".yaml"))


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---- composition ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_recipe_composes_and_builds_its_loss(name):
    cfg = make_cfg([f"recipe={name}"], fast=False)
    loss_set = build_loss(cfg.loss, cfg.get("pair_weighting"))
    assert loss_set.terms
    if name in PREFERENCE_RECIPES:
        assert loss_set.needs.pairs and cfg.model.source == "tiny"
        assert cfg.data.sources[0].path == "bundled:preferences"


def test_command_line_data_and_model_win_over_a_recipes_defaults():
    cfg = make_cfg(["recipe=simpo_llama3_instruct_v02"], fast=False)
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.data.sources[0].path == "princeton-nlp/llama3-ultrafeedback-armorm"
    cfg = make_cfg(["recipe=simpo_llama3_instruct_v02", "data=bundled_pref", "model=tiny"], fast=False)
    assert cfg.model.source == "tiny" and cfg.data.sources[0].path == "bundled:preferences"
    assert cfg.loss.simpo.beta == 10.0  # the recipe's method settings stay
    cfg = make_cfg(["recipe=simpo", "data=ultrafeedback_binarized"], fast=False)
    assert cfg.data.sources[0].path == "HuggingFaceH4/ultrafeedback_binarized"
    cfg = make_cfg(["recipe=simpo", "+loss.ntp.weight=0.5"], fast=False)  # SimPO's sft_weight by composition
    assert [name for name, _, _ in build_loss(cfg.loss).terms] == ["simpo", "ntp"]


# (recipe, loss name, {option: value}, lr, global batch, epochs, data path, max length, max prompt length)
PAPER = [
    ("dpo_zephyr_7b_beta", "dpo", {"beta": 0.01}, 5e-7, 128, 1, "HuggingFaceH4/ultrafeedback_binarized", 1024, 512),
    ("simpo_mistral_base", "simpo", {"beta": 2.0, "gamma_beta_ratio": 0.8}, 3e-7, 128, 1,
     "HuggingFaceH4/ultrafeedback_binarized", 1024, 512),
    ("simpo_mistral_instruct", "simpo", {"beta": 2.5, "gamma_beta_ratio": 0.1}, 5e-7, 128, 1,
     "princeton-nlp/mistral-instruct-ultrafeedback", 2048, 1800),
    ("simpo_llama3_base", "simpo", {"beta": 2.0, "gamma_beta_ratio": 0.5}, 6e-7, 128, 1,
     "HuggingFaceH4/ultrafeedback_binarized", 2048, 1800),
    ("simpo_llama3_instruct", "simpo", {"beta": 2.5, "gamma_beta_ratio": 0.55}, 1e-6, 128, 1,
     "princeton-nlp/llama3-ultrafeedback", 2048, 1800),
    ("simpo_llama3_instruct_v02", "simpo", {"beta": 10.0, "gamma_beta_ratio": 0.3}, 1e-6, 128, 1,
     "princeton-nlp/llama3-ultrafeedback-armorm", 2048, 1800),
    ("simpo_gemma2_9b_it", "simpo", {"beta": 10.0, "gamma_beta_ratio": 0.5}, 8e-7, 128, 1,
     "princeton-nlp/gemma2-ultrafeedback-armorm", 2048, 1800),
    ("rpo_zephyr_7b_beta", "rpo", {"beta": 0.01, "eta": 0.005, "variant": "cumulative"}, 5e-7, 128, 1,
     "HuggingFaceH4/ultrafeedback_binarized", 1024, 512),
    ("rpo_zephyr_7b_gemma", "rpo", {"beta": 0.05, "eta": 0.005, "variant": "cumulative"}, 5e-7, 128, 2,
     "argilla/dpo-mix-7k", 1024, 512),
    ("rpo_average_zephyr_7b_gemma", "rpo", {"beta": 0.5, "eta": 0.2, "variant": "average"}, 5e-7, 128, 2,
     "argilla/dpo-mix-7k", 1024, 512),
    ("wpo_mistral_sft_beta", "dpo", {"beta": 0.01}, 5e-7, 128, 1, "HuggingFaceH4/ultrafeedback_binarized", 1024, 512),
    ("wpo_llama3_instruct", "dpo", {"beta": 0.01}, 1e-6, 128, 2, "HuggingFaceH4/ultrafeedback_binarized", 2048, 1800),
    ("orpo_mistral_7b_beta", "orpo", {"lambda": 0.1}, 5e-6, 32, 5,
     "argilla/ultrafeedback-binarized-preferences-cleaned", 2048, 1792),
]


@pytest.mark.parametrize("recipe, loss, options, lr, batch, epochs, data, max_length, max_prompt", PAPER,
                         ids=[p[0] for p in PAPER])
def test_paper_recipes_carry_the_published_numbers(recipe, loss, options, lr, batch, epochs, data, max_length,
                                                   max_prompt):
    cfg = make_cfg([f"recipe={recipe}"], fast=False)
    assert cfg.model.source == "hf" and cfg.model.name_or_path
    for key, value in options.items():
        assert cfg.loss[loss][key] == value, key
    train = cfg.train
    assert (train.lr, train.global_batch_size, train.epochs, train.max_steps) == (lr, batch, epochs, None)
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.data.sources[0].path == data and cfg.data.sources[0].format == "pairwise_messages"
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (max_length, max_prompt)
    if recipe.startswith("wpo"):
        assert cfg.pair_weighting.name == "wpo" and cfg.pair_weighting.alignment == "sampled"
    if recipe.startswith("orpo"):
        assert "ntp" in cfg.loss  # ORPO = NLL (ntp) + lambda * odds-ratio term


# ---- a few steps of every tiny preference recipe ------------------------------------------------------------------

def short_run(tmp_path, name, *overrides, steps=3):
    cfg = make_cfg([
        f"output_dir={tmp_path / name}", f"train.max_steps={steps}", "data.sources.0.num_rows=200",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0",
        "export.enabled=false", f"reference.cache_dir={tmp_path / 'ref_cache'}", *overrides,
    ])
    summary = Trainer(cfg, recipe_name=name).fit()
    return summary, read_metrics(str(tmp_path / name))


EXPECTED_METRICS = {
    "wpo": ["wpo/weight_mean", "wpo/weight_min", "wpo/weight_max"],
    "orpo": ["ntp/nll", "orpo/log_odds_ratio", "orpo/log_sigmoid_odds_ratio"],
    "rpo": ["rpo/sft"], "rpo_average": ["rpo/sft"], "cpo": ["cpo/loss", "ntp/loss"],
    "mpo": ["dpo/loss", "bco/loss", "ntp/loss"],
}


@pytest.mark.parametrize("recipe", PREFERENCE_RECIPES)
def test_preference_recipe_runs_a_few_steps(tmp_path, recipe):
    summary, train_log = short_run(tmp_path, recipe, f"recipe={recipe}")
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert len(train_log) == 3 and all(math.isfinite(r["loss"]) for r in train_log)
    for split in ("eval_before", "eval_after"):
        assert all(math.isfinite(v) for v in summary[split].values())
    for key in ["rewards/accuracies", "rewards/margins", "logps/chosen", "logits/chosen", "logits/rejected",
                *EXPECTED_METRICS.get(recipe, [])]:
        assert key in train_log[-1], key
    if recipe in ("dpo", "ipo", "rpo", "rpo_average", "wpo", "mpo"):  # step 1: policy == reference
        assert train_log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    if recipe == "dpo":
        assert train_log[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
    first = train_log[0]
    if recipe == "simpo":
        # no reference, so no exact value: the mean of softplus(gamma - beta u_i) lies above softplus(gamma - mean
        # margin) (Jensen) by the spread of the untrained margins (0.05 here); gamma = 0.25 x beta 2 = 0.5, so
        # a lost gamma lands ~0.4 below the band and a doubled one ~0.4 above it
        assert 0 <= first["loss"] - softplus(0.5 - first["rewards/margins"]) < 0.1
    else:
        assert first["loss"] == pytest.approx(STEP_ONE_LOSS[recipe](first), abs=1e-5)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# The objective of step 1 from the recipe's numbers. With a reference, policy == reference, so every pair's margin
# is 0: a sigmoid DPO term is log 2, IPO's (0 - 1/(2 beta))^2 = 1 at beta 0.5, BCO's pair term 2 log 2. A recipe
# that lost a term, a weight or a hyperparameter on the way to its loss misses its value.
STEP_ONE_LOSS = {
    "dpo": lambda m: math.log(2),
    "ipo": lambda m: 1.0,
    "wpo": lambda m: math.log(2) * m["wpo/weight_mean"],  # each pair's log 2 times its weight, averaged over pairs
    "rpo": lambda m: math.log(2) + 0.005 * m["rpo/sft"],  # eta 0.005
    "rpo_average": lambda m: math.log(2) + 0.2 * m["rpo/sft"],  # eta 0.2
    "mpo": lambda m: 0.8 * math.log(2) + 0.2 * 2 * math.log(2) + m["ntp/loss"],  # weights 0.8, 0.2, 1
    "cpo": lambda m: m["cpo/loss"] + m["ntp/loss"],  # CPO term plus the chosen NLL at weight 1
    "orpo": lambda m: m["ntp/loss"] - 0.1 * m["orpo/log_sigmoid_odds_ratio"],  # NLL - lambda log sigma(log OR)
}


# ---- reference strategies ------------------------------------------------------------------------------------------

def step_losses(tmp_path, name, *overrides):
    _, log = short_run(tmp_path, name, "recipe=dpo", *overrides)
    return [r["loss"] for r in log]


def test_precomputed_reference_gives_the_losses_of_a_live_frozen_copy(tmp_path):
    precomputed = step_losses(tmp_path, "pre", "reference.strategy=precomputed")
    frozen = step_losses(tmp_path, "frozen", "reference.strategy=frozen_copy")
    assert precomputed[0] == pytest.approx(math.log(2), abs=1e-5)
    assert precomputed[-1] != pytest.approx(math.log(2), abs=1e-4)  # the reference matters after step 1
    assert precomputed == pytest.approx(frozen, abs=1e-5)
    assert os.listdir(tmp_path / "ref_cache")  # the precomputed log-probs were cached
    again = step_losses(tmp_path, "pre_again", "reference.strategy=precomputed")  # cache hit, same numbers
    assert again == pytest.approx(precomputed, abs=1e-6)


def test_adapter_disabled_reference_with_lora(tmp_path):
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0",
            "train.lr=1e-2"]
    adapter = step_losses(tmp_path, "adapter", "reference.strategy=adapter_disabled", *lora)
    precomputed = step_losses(tmp_path, "lora_pre", "reference.strategy=precomputed", *lora)
    assert adapter[0] == pytest.approx(math.log(2), abs=1e-5)
    assert adapter[-1] != pytest.approx(math.log(2), abs=1e-4)
    assert adapter == pytest.approx(precomputed, abs=1e-5)
    with pytest.raises(ValueError, match="needs model.lora.enabled=true"):
        short_run(tmp_path, "no_lora", "recipe=dpo", "reference.strategy=adapter_disabled")


def read_cache(cache_dir) -> list[dict]:
    """The cached log-probs by example index, one dict per cache file, largest first."""
    import json

    files = [json.loads(path.read_text()) for path in cache_dir.glob("*.json")]
    return sorted(files, key=len, reverse=True)


def test_drawn_examples_are_the_union_of_every_ranks_micro_batches():
    import datasets

    from tunelab.data.sampler import drawn_examples, micro_batches, random_order

    ds = datasets.Dataset.from_dict({"x": list(range(10))})  # 10 examples, batch 4: 2 steps per epoch
    order0, order1 = random_order(ds, 3, 0), random_order(ds, 3, 1)
    assert drawn_examples(random_order, ds, 3, 4, range(1, 3)) == sorted(set(order0[4:8]) | set(order1[0:4]))
    by_ranks = {i for step, order in ((1, order0), (0, order1)) for rank in range(2)
                for micro in micro_batches(order, step, 4, rank, 2, 1) for i in micro}
    assert drawn_examples(random_order, ds, 3, 4, range(1, 3)) == sorted(by_ranks)
    assert drawn_examples(random_order, ds, 3, 4, range(0, 0)) == []


def test_precomputed_reference_scores_only_the_drawn_examples(tmp_path, monkeypatch, caplog):
    """3 steps of 8 pairs score 24 train pairs (and all eval pairs), with the losses of a run that scored every
    pair; 6 steps on that cache score only the 24 pairs steps 4-6 add."""
    import logging

    import tunelab.trainers.reference as reference_module
    import tunelab.trainers.trainer as trainer_module
    from tunelab.data.sampler import drawn_examples

    scored = []

    def counting(*args, **kwargs):
        scored.append(len(kwargs["indices"]))
        return score_examples(*args, **kwargs)

    score_examples = reference_module.score_examples
    monkeypatch.setattr(reference_module, "score_examples", counting)
    with caplog.at_level(logging.INFO, logger="tunelab.trainers.reference"):
        few = step_losses(tmp_path, "few", "reference.strategy=precomputed")
    (train_cache, eval_cache) = read_cache(tmp_path / "ref_cache")
    assert scored == [24, len(eval_cache)] and len(train_cache) == 24
    assert "scoring 24 of 190 train pairs (steps 1-3 draw 24 of them; 0 cached)" in caplog.text

    monkeypatch.setattr(trainer_module, "drawn_examples",  # every train pair, as before this change
                        lambda ordering, ds, *rest: list(range(len(ds))))
    every = step_losses(tmp_path, "every", "reference.strategy=precomputed", f"reference.cache_dir={tmp_path / 'all'}")
    assert len(read_cache(tmp_path / "all")[0]) == 190
    assert every == few  # exact: a pair's score does not depend on which others are scored
    monkeypatch.setattr(trainer_module, "drawn_examples", drawn_examples)

    scored.clear()
    step_losses(tmp_path, "more", "reference.strategy=precomputed", "train.max_steps=6")
    assert scored == [24] and len(read_cache(tmp_path / "ref_cache")[0]) == 48


def test_auto_reference_is_adapter_disabled_for_lora_and_precomputed_without(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="tunelab.trainers.reference"):
        summary, log = short_run(tmp_path, "auto_lora", "recipe=dpo", "model.lora.enabled=true", "train.lr=1e-2")
    assert "reference: adapter_disabled (auto, LoRA run" in caplog.text
    assert not (tmp_path / "ref_cache").exists()  # no pass before training
    assert log[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6) and log[-1]["loss"] != log[0]["loss"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunelab.trainers.reference"):
        short_run(tmp_path, "auto_full", "recipe=dpo")
    assert "reference: precomputed (auto, no LoRA adapter" in caplog.text and os.listdir(tmp_path / "ref_cache")


def test_adapter_disabled_reference_pass_ignores_dropout(tmp_path):
    """The policy trains in train mode; the reference pass must not take the base model's dropout with it."""
    from tunelab.data.sampler import micro_batches

    cfg = make_cfg([f"output_dir={tmp_path / 'run'}", "recipe=dpo", "data.sources.0.num_rows=40",
                    "model.lora.enabled=true", "reference.strategy=adapter_disabled"])
    trainer = Trainer(cfg, recipe_name="dropout")
    for module in trainer.policy.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    idx = micro_batches(trainer.ordering(trainer.train_ds, 0, 0), 0, 4, 0, 1, 4)[0]
    batch = trainer.collator([trainer.train_ds[i] for i in idx])
    trainer.policy.train()
    first = trainer.reference.with_logps(batch, trainer.policy)
    second = trainer.reference.with_logps(batch, trainer.policy)
    assert trainer.policy.training
    assert torch.equal(first.ref_seq_logps, second.ref_seq_logps)
    trainer.policy.eval()
    with torch.no_grad(), trainer.policy.model.disable_adapter():
        base = trainer.policy(batch, trainer.needs).seq_logps
    assert torch.equal(first.ref_seq_logps, base)


# ---- learning ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("recipe, steps", [("simpo", 150), ("dpo", 150)])
def test_preference_training_raises_eval_reward_accuracy(tmp_path, recipe, steps):
    cfg = make_cfg([
        f"recipe={recipe}", f"output_dir={tmp_path / recipe}", f"train.max_steps={steps}", "train.eval_every=0",
        "export.enabled=false", "train.save_every=100000", f"reference.cache_dir={tmp_path / 'ref_cache'}",
    ], fast=False)
    summary = Trainer(cfg, recipe_name=recipe).fit()
    before = summary["eval_before"]["rewards/accuracies"]
    after = summary["eval_after"]["rewards/accuracies"]
    assert after > before + 0.2 and after > 0.7, (before, after)
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]


# ---- reproducibility across processes --------------------------------------------------------------------------

@pytest.mark.slow
def test_dpo_is_bit_identical_across_hash_seeds_and_a_resume_in_a_new_process(tmp_path):
    """Three processes with different hash seeds: a straight 4-step DPO run, and a run that stops after its
    step-2 checkpoint and is resumed in a third process. Every step's loss is the same float."""
    import subprocess
    import sys

    from conftest import ROOT

    common = ["recipe=dpo", "data.sources.0.num_rows=200", "train.global_batch_size=8", "train.micro_batch_size=4",
              "train.log_every=1", "train.eval_every=0", "train.save_every=2", "train.scheduler=constant",
              "train.warmup_ratio=0", "train.progress_bar=false", "train.plot=false", "export.enabled=false",
              f"reference.cache_dir={tmp_path / 'ref_cache'}"]

    def train(hash_seed: str, name: str, *overrides):
        proc = subprocess.run([sys.executable, "train.py", *common, f"output_dir={tmp_path / name}", *overrides],
                              cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        return [r["loss"] for r in read_metrics(str(tmp_path / name))]

    straight = train("1", "straight", "train.max_steps=4")
    train("2", "stopped", "train.max_steps=2")  # ends after its step-2 checkpoint, as a killed run would
    resumed = train("3", "stopped", "train.max_steps=4", "resume=latest")
    assert len(straight) == 4 and resumed == straight
    assert straight[0] == pytest.approx(math.log(2), abs=1e-6) and straight[-1] != straight[0]


# ---- TR-DPO: a reference that follows the policy --------------------------------------------------------------
def test_tr_dpo_moves_the_reference_toward_the_policy_at_its_steps_only(tmp_path):
    """After step 2 of update_every=2, alpha=0.25: each reference weight is 0.25 * policy + 0.75 * its old value
    (the copy before the step equals the initial model); after step 1 and 3 it does not move."""
    cfg = make_cfg([f"output_dir={tmp_path / 'run'}", "recipe=dpo", "data.sources.0.num_rows=200",
                    "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0",
                    "export.enabled=false", "reference.strategy=frozen_copy", "reference.update_every=2",
                    "reference.update_alpha=0.25", "train.max_steps=3"])
    trainer = Trainer(cfg, recipe_name="tr_dpo")
    policy = trainer.accelerator.unwrap_model(trainer.policy).model
    reference = trainer.reference.copy.model
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    trainer.train_step()
    assert all(torch.equal(p, initial[n]) for n, p in reference.named_parameters())  # step 1: not due
    trainer.train_step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(p, 0.25 * dict(policy.named_parameters())[name].detach() + 0.75 * initial[name],
                                   rtol=0, atol=1e-7)
    moved = {n: p.detach().clone() for n, p in reference.named_parameters()}
    trainer.train_step()
    assert all(torch.equal(p, moved[n]) for n, p in reference.named_parameters())


def test_tr_dpo_resumes_with_the_moved_reference_and_needs_a_frozen_copy(tmp_path):
    fast = ["train.lr=1e-2", "train.warmup_ratio=0", "train.max_steps=4"]
    tr = ["reference.strategy=frozen_copy", "reference.update_every=1", "reference.update_alpha=0.5",
          "train.save_every=2", *fast]
    straight = step_losses(tmp_path, "straight", *tr)
    fixed = step_losses(tmp_path, "fixed", "reference.strategy=frozen_copy", *fast)
    assert straight[0] == pytest.approx(fixed[0], abs=1e-7)  # the reference moves after step 1...
    assert straight[1] != pytest.approx(fixed[1], abs=1e-4)  # ...and step 2 scores against the moved one
    reset_accelerate()
    resumed = step_losses(tmp_path, "resumed", *tr, f"resume={tmp_path / 'straight' / 'checkpoints' / 'step_0000002'}")
    assert resumed == pytest.approx(straight[2:], abs=1e-6)
    with pytest.raises(ValueError, match="needs reference.strategy=frozen_copy"):
        short_run(tmp_path, "precomputed", "recipe=dpo", "reference.update_every=4")


# ---- BCO: a loss with state across steps --------------------------------------------------------------------------
BCO = ["recipe=dpo", "loss.dpo.loss_type=bco_pair", "loss.dpo.beta=0.5", "train.lr=1e-2", "train.warmup_ratio=0"]


def test_bco_shift_is_the_mean_of_the_past_steps_rewards_whatever_the_micro_batch(tmp_path):
    """delta at step t = mean over steps < t of each step's mean reward; the loss of step t uses it, so step 3's loss
    equals the hand formula on its logged rewards; micro-batches of 4 or 8 pairs give the same shifts."""
    shifts, logs = {}, {}
    for micro in (4, 8):
        _, logs[micro] = short_run(tmp_path, f"micro{micro}", *BCO, f"train.micro_batch_size={micro}", steps=3)
        shifts[micro] = [row["dpo/reward_shift"] for row in logs[micro]]
    rewards = [row["dpo/reward_mean"] for row in logs[4]]
    assert shifts[4] == pytest.approx([0.0, rewards[0], (rewards[0] + rewards[1]) / 2], abs=1e-6)
    assert rewards[1] != pytest.approx(0.0, abs=1e-4)  # the shift is not trivially 0
    assert shifts[8] == pytest.approx(shifts[4], abs=1e-5)
    assert [row["loss"] for row in logs[8]] == pytest.approx([row["loss"] for row in logs[4]], abs=1e-5)


def test_bco_shift_is_checkpointed_and_a_resume_continues_it(tmp_path):
    straight = short_run(tmp_path, "straight", *BCO, "train.save_every=2", steps=4)[1]
    reset_accelerate()
    checkpoint = tmp_path / "straight" / "checkpoints" / "step_0000002"
    resumed = short_run(tmp_path, "resumed", *BCO, f"resume={checkpoint}", steps=4)[1]
    assert [r["dpo/reward_shift"] for r in resumed] == pytest.approx([r["dpo/reward_shift"] for r in straight[2:]],
                                                                      abs=1e-7)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight[2:]], abs=1e-6)
    assert straight[3]["dpo/reward_shift"] != pytest.approx(0.0, abs=1e-4)
    without = short_run(tmp_path, "no_shift", *BCO, "+loss.dpo.bco_running_shift=false", steps=4)[1]
    assert "dpo/reward_shift" not in without[0] and without[0]["loss"] == pytest.approx(straight[0]["loss"], abs=1e-6)
    assert without[2]["loss"] != pytest.approx(straight[2]["loss"], abs=1e-5)  # the shift changes the objective


# ---- LD-DPO: the reference's common-prefix log-probs through every strategy -------------------------------------
def test_ld_dpo_precomputed_reference_gives_the_losses_of_a_live_frozen_copy(tmp_path):
    ld = ["+loss.dpo.ld_alpha=0.3", "train.lr=1e-2", "train.warmup_ratio=0"]
    precomputed = step_losses(tmp_path, "pre", *ld, "reference.strategy=precomputed")
    frozen = step_losses(tmp_path, "frozen", *ld, "reference.strategy=frozen_copy")
    plain = step_losses(tmp_path, "plain", "train.lr=1e-2", "train.warmup_ratio=0", "reference.strategy=frozen_copy")
    assert precomputed[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: any weighting gives log 2
    assert precomputed == pytest.approx(frozen, abs=1e-5)
    assert precomputed[-1] != pytest.approx(plain[-1], abs=1e-4)  # the weighting changes training
    again = step_losses(tmp_path, "pre_again", *ld, "reference.strategy=precomputed")  # from the cache
    assert again == pytest.approx(precomputed, abs=1e-6)
