"""Reward models: the Bradley-Terry loss against hand-computed values and TRL 1.16's RewardTrainer.compute_loss; the
score head read at each response's last token in every layout, equal to transformers' sequence classifier; a
reward model trained by the Trainer learns the bundled preferences and exports as a sequence classifier that scores
exactly as in training (full and LoRA)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import make_cfg, read_metrics
from transformers import AutoModelForSequenceClassification

from tunelab.data.collate import Collator
from tunelab.data.contract import ForwardOutputs, Needs
from tunelab.data.pipeline import build_datasets
from tunelab.data.templates import build_template
from tunelab.data.tokenize import response_ids
from tunelab.losses import build_loss
from tunelab.losses.reward import bradley_terry_pair_losses
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.models import build_model, build_tokenizer
from tunelab.trainers.reward_scoring import RewardScorer, load_reward_model
from tunelab.trainers.trainer import Trainer

trl = pytest.importorskip("trl")

CHOSEN = torch.tensor([1.0, 0.0, 2.0])
REJECTED = torch.tensor([0.0, 0.5, -1.0])


def softplus(x):
    return math.log1p(math.exp(x))


def test_hand_values_plain_margin_and_centering():
    losses, metrics = bradley_terry_pair_losses(CHOSEN, REJECTED)
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -0.5, 3
    assert losses.tolist() == pytest.approx([softplus(-1.0), softplus(0.5), softplus(-3.0)], abs=1e-6)
    assert float(metrics["rewards/accuracies"].value) / metrics["rewards/accuracies"].count == pytest.approx(2 / 3)
    assert float(metrics["rewards/margins"].value) / metrics["rewards/margins"].count == pytest.approx(3.5 / 3)

    margin = torch.tensor([0.5, 0.0, 4.0])
    losses, _ = bradley_terry_pair_losses(CHOSEN, REJECTED, margin=margin)
    assert losses.tolist() == pytest.approx([softplus(-0.5), softplus(0.5), softplus(1.0)], abs=1e-6)

    losses, _ = bradley_terry_pair_losses(CHOSEN, REJECTED, center_coefficient=0.1)
    # + 0.1 * (c + r)^2 with sums 1, 0.5, 1
    assert losses.tolist() == pytest.approx([softplus(-1.0) + 0.1, softplus(0.5) + 0.025, softplus(-3.0) + 0.1],
                                            abs=1e-6)


class _FixedRewards(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


def _trl_loss(chosen, rejected, margin, center):
    """TRL's own compute_loss on a stand-in model whose logits are the given rewards ([chosen; rejected] rows)."""
    logits = torch.cat([chosen, rejected]).unsqueeze(-1)
    model = _FixedRewards(logits).train()
    identity = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=identity, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(center_rewards_coefficient=center), _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    loss = trl.RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("margin,center", [(None, None), (torch.tensor([0.5, 0.0, 4.0]), None), (None, 0.01)])
def test_parity_with_trl_reward_trainer(margin, center):
    torch.manual_seed(0)
    chosen, rejected = torch.randn(5), torch.randn(5)
    if margin is not None:
        margin = torch.rand(5)
    theirs, their_metrics = _trl_loss(chosen, rejected, margin, center)
    losses, metrics = bradley_terry_pair_losses(chosen, rejected, margin=margin, center_coefficient=center or 0.0)
    assert losses.mean().item() == pytest.approx(theirs.item(), abs=1e-6)
    for ours, name in (("rewards/accuracies", "accuracy"), ("rewards/margins", "margin")):
        assert float(metrics[ours].value) / metrics[ours].count == pytest.approx(their_metrics[name][0], abs=1e-6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"two \[P\] tensors"):
        bradley_terry_pair_losses(CHOSEN, REJECTED[:2])


# ---- the score head as a forward kind ------------------------------------------------------------------------------
SCORES = Needs(pairs=True, sequence_scores=True, token_logps=False)
RESPONSES = ("chosen_ids", "rejected_ids")  # the collator's sequence order within a pair


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def classifier_and_pairs():
    cfg = make_cfg(["recipe=reward"])
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer, cfg.seed, sequence_scores=True).eval()
    train, _, _ = build_datasets(cfg.data, tokenizer, "pairs", cfg.seed)
    return model, tokenizer, [train[i] for i in range(6)]


def direct_score(model, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


@pytest.mark.parametrize("packing, shared_prompt", [(True, True), (False, False), (True, False)])
def test_scores_are_transformers_classifier_scores_of_prompt_and_response(packing, shared_prompt):
    model, tokenizer, examples = classifier_and_pairs()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    collator = Collator("pairs", packing=packing, shared_prompt=shared_prompt, row_length=512)
    with torch.no_grad():
        out = CausalLMWithLogProbs(model)(collator(examples), SCORES)
    want = [direct_score(model, ex["prompt_ids"] + ex[key]) for ex in examples for key in RESPONSES]
    assert out.seq_scores.tolist() == pytest.approx(want, abs=1e-5)
    assert len(set(round(v, 4) for v in want)) == len(want)  # distinct: a wrong token would not match by chance
    assert not out.token_logps.any()  # no LM-head work for a loss that declined token log-probs


def test_a_response_ending_in_the_pad_token_is_scored_where_transformers_scores_it():
    """transformers scores the rightmost token that is not pad; with pad = EOS (SmolLM2) that is the token before."""
    model, tokenizer, examples = classifier_and_pairs()
    pad = tokenizer.pad_token_id
    ex = dict(examples[0], chosen_ids=examples[0]["chosen_ids"] + [pad])
    with torch.no_grad():
        out = CausalLMWithLogProbs(model)(Collator("pairs", True, True, 512)([ex]), SCORES)
    assert float(out.seq_scores[0]) == pytest.approx(direct_score(model, ex["prompt_ids"] + ex["chosen_ids"]), abs=1e-5)
    assert float(out.seq_scores[0]) == pytest.approx(
        direct_score(model, ex["prompt_ids"] + examples[0]["chosen_ids"]), abs=1e-5)


def test_reward_loss_reads_scores_and_an_optional_margin_column():
    out = ForwardOutputs(
        token_logps=torch.zeros(4), token_seq=torch.tensor([0, 1, 2, 3]), token_pos=torch.zeros(4, dtype=torch.long),
        token_targets=torch.zeros(4, dtype=torch.long), seq_logps=torch.zeros(4), seq_tokens=torch.ones(4),
        seq_role=torch.tensor([1, 2, 1, 2]), chosen=torch.tensor([0, 2]), rejected=torch.tensor([1, 3]),
        seq_scores=torch.tensor([1.0, 0.0, 0.0, 0.5]), seq_columns={"gap": torch.tensor([0.5, 0.5, 0.0, 0.0])},
    )
    loss_set = build_loss({"reward": {"margin_column": "gap", "center_rewards_coefficient": 0.1}})
    assert loss_set.needs.sequence_scores and not loss_set.needs.token_logps and loss_set.needs.columns == {"gap"}
    sums, _ = loss_set(out)
    # pair 1: d = 1, margin 0.5, centre 0.1 * 1^2; pair 2: d = -0.5, no margin, centre 0.1 * 0.5^2
    assert float(sums["pairs"]) == pytest.approx(softplus(-0.5) + 0.1 + softplus(0.5) + 0.025, abs=1e-6)
    with_ntp = build_loss({"reward": {}, "ntp": {}}).needs
    assert with_ntp.token_logps and with_ntp.sequence_scores  # a term that needs log-probs still gets them


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_reward_model_learns_and_its_export_scores_as_in_training(tmp_path, lora):
    run = tmp_path / "rm"
    cfg = make_cfg(["recipe=reward", f"output_dir={run}", "train.max_steps=60", "train.eval_every=0",
                    f"model.lora.enabled={str(lora).lower()}", *(["train.lr=1e-2"] if lora else [])])
    trainer = Trainer(cfg, recipe_name="reward")
    summary = trainer.fit()
    evals = read_metrics(str(run), split="eval")
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05, evals  # from ~log 2 at the random score head
    if not lora:  # the random-init tiny body is only fitted by full training
        assert evals[0]["rewards/accuracies"] < 0.6 < evals[-1]["rewards/accuracies"], evals
    assert summary["export"] == str(run / "export")
    exported = AutoModelForSequenceClassification.from_pretrained(run / "export").eval()
    examples = [trainer.eval_ds[i] for i in range(4)]
    policy = trainer.accelerator.unwrap_model(trainer.policy).eval()
    with torch.no_grad():
        trained = policy(trainer.collator(examples), SCORES).seq_scores
    want = [direct_score(exported, ex["prompt_ids"] + ex[key]) for ex in examples for key in RESPONSES]
    assert trained.tolist() == pytest.approx(want, abs=1e-5)
    # the pipeline's scorer feeds a tunelab reward model the training tokenization: same scores from text
    judge, tokenizer = load_reward_model(str(run / "export"))
    assert judge.config.tunelab_scores == "training_layout"
    turns = [[{"role": "user", "content": q}] for q in ("What colour is snow?", "Name a capital city.")]
    replies = ["Snow is white.", "Paris is the capital of France."]
    scored = RewardScorer(judge, tokenizer, "rm", batch_size=2).score(turns, replies)
    template = build_template("chat", tokenizer)
    pairs = []
    for turn, reply in zip(turns, replies):
        prompt, ids = response_ids(template, tokenizer, turn, {"role": "assistant", "content": reply})
        pairs.append({"prompt_ids": prompt, "chosen_ids": ids, "rejected_ids": ids})
    with torch.no_grad():
        direct = policy(trainer.collator(pairs), SCORES).seq_scores[0::2]
    assert scored == pytest.approx(direct.tolist(), abs=1e-5)
