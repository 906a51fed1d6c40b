"""NEFTune's and SymNoise's per-example noise inside packed rows and Masked Thought's input masking, against the
papers' definitions (SymNoise: as docs/methods.md reads it); all leave evaluation untouched."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg, read_metrics
from test_layout import sft_examples, tiny_model

from tunelab.data.collate import Collator
from tunelab.data.masked_thought import draw_generator, mask_rate, mask_responses
from tunelab.trainers.embedding_noise import NEFTune, SymNoise, mirror_positions, per_token_lengths
from tunelab.trainers.trainer import Trainer


@pytest.fixture
def packed():
    """The four SFT examples (12, 7, 20, 5 tokens) in rows of 32: two rows, the second padded."""
    return Collator("sft", packing=True, shared_prompt=False, row_length=32)(sft_examples())


def test_per_token_lengths_are_each_documents_own_length(packed):
    lengths = per_token_lengths(packed.doc_ids)
    for d, n in enumerate([12, 7, 20, 5]):
        assert set(lengths[packed.doc_ids == d].tolist()) == {n}
    assert (lengths[packed.doc_ids < 0] == 0).all() and (packed.doc_ids < 0).any()


def test_neftune_scale_follows_each_packed_example_not_the_row(packed):
    model = tiny_model().model.train()
    embed = model.get_input_embeddings()
    d = embed.weight.shape[1]
    clean = embed(packed.input_ids).detach()
    noise_hook = NEFTune(model, alpha=5.0)
    torch.manual_seed(0)
    with noise_hook.applied(packed):
        noise = embed(packed.input_ids).detach() - clean
    for doc, n in enumerate([12, 7, 20, 5]):
        bound = 5.0 / math.sqrt(n * d)
        values = noise[packed.doc_ids == doc]
        assert values.abs().max() <= bound * (1 + 1e-5)
        assert values.abs().max() > 0.9 * bound  # U(-1, 1) * bound over n * d draws reaches near the bound
        assert abs(values.mean()) < 0.1 * bound and values.std() == pytest.approx(bound / math.sqrt(3), rel=0.2)
    assert (noise[packed.doc_ids < 0] == 0).all()


def test_neftune_is_off_outside_training_forwards(packed):
    model = tiny_model().model
    embed = model.get_input_embeddings()
    clean = embed(packed.input_ids).detach()
    noise_hook = NEFTune(model, alpha=15.0)
    model.train()
    assert torch.equal(embed(packed.input_ids), clean)  # outside applied(): reference scoring, generation
    model.eval()
    with noise_hook.applied(packed):
        assert torch.equal(embed(packed.input_ids), clean)  # evaluation
    with pytest.raises(ValueError, match="neftune_alpha must be > 0"):
        NEFTune(model, alpha=0)


def symnoise_of(packed, antithetic):
    model = tiny_model().model.train()
    embed = model.get_input_embeddings()
    clean = embed(packed.input_ids).detach()
    noise_hook = SymNoise(model, alpha=5.0, antithetic=antithetic)
    torch.manual_seed(0)
    with noise_hook.applied(packed):
        return embed(packed.input_ids).detach() - clean, embed.weight.shape[1]


def test_mirror_positions_pair_each_examples_halves():
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 3, -1, -1, -1]])
    # doc 0 (5 tokens, flat 0-4): 3 -> 0, 4 -> 1, the middle (2) draws its own; doc 1 (5-6): 6 -> 5;
    # doc 2 (8-11): 10 -> 8, 11 -> 9; doc 3 (1 token) and padding draw their own
    mirrors = mirror_positions(doc_ids, per_token_lengths(doc_ids))
    assert mirrors.tolist() == [[-1, -1, -1, 0, 1, -1, 5, -1], [-1, -1, 8, 9, -1, -1, -1, -1]]


def test_symnoise_is_plus_minus_neftunes_scale_antithetic_within_each_packed_example(packed):
    noise, d = symnoise_of(packed, antithetic=True)
    for doc, n in enumerate([12, 7, 20, 5]):
        bound = 5.0 / math.sqrt(n * d)
        values = noise[packed.doc_ids == doc]  # the document's positions in order (one row each)
        assert torch.allclose(values.abs(), torch.full_like(values, bound), rtol=1e-5)  # every coordinate +-scale
        h = n // 2
        assert torch.allclose(values[n - h:], -values[:h], rtol=1e-4)  # the second half negates the first
        assert values.sum(0).abs().max() <= (bound * 1.001 if n % 2 else bound * 1e-4)  # sums to 0 (odd: the middle)
        assert 0.3 < (values[:h] > 0).float().mean() < 0.7  # fair signs
    assert (noise[packed.doc_ids < 0] == 0).all()
    independent, _ = symnoise_of(packed, antithetic=False)
    first = independent[packed.doc_ids == 2]
    assert torch.allclose(first.abs(), torch.full_like(first, 5.0 / math.sqrt(20 * d)), rtol=1e-5)
    assert not torch.allclose(first[10:], -first[:10], rtol=1e-4)


def test_masked_thought_masks_only_response_inputs_and_keeps_labels(packed):
    rate, mask_id = 0.5, 0
    masked = mask_responses(packed, rate, mask_id, draw_generator(42, 3, 0, 0))
    changed = (masked.input_ids != packed.input_ids).view(-1)
    response_positions = packed.target_index + 1
    assert set(changed.nonzero().flatten().tolist()) <= set(response_positions.tolist())
    assert 0.3 < changed.sum() / response_positions.numel() < 0.7
    for key in ("target_ids", "target_index", "doc_ids", "branch_ids", "position_ids"):
        assert torch.equal(getattr(masked, key), getattr(packed, key))
    flat = packed.input_ids.view(-1)
    assert torch.equal(flat[response_positions], packed.target_ids)  # the positions are the response tokens
    again = mask_responses(packed, rate, mask_id, draw_generator(42, 3, 0, 0))
    assert torch.equal(again.input_ids, masked.input_ids)  # same (seed, step, rank, micro-batch): same mask
    other = mask_responses(packed, rate, mask_id, draw_generator(42, 4, 0, 0))
    assert not torch.equal(other.input_ids, masked.input_ids)


def test_masked_thought_rate_ramps_as_the_authors_trainer():
    total = 300  # ramp over 0.66 * 300 + 1 = 199 steps, then flat at the maximum
    assert mask_rate(0, total, 0.4, 0.66) == 0.0
    assert mask_rate(99, total, 0.4, 0.66) == pytest.approx(0.4 * 99 / 199)
    assert mask_rate(250, total, 0.4, 0.66) == 0.4
    assert mask_rate(0, total, 0.3, 0.0) == 0.3


# ---- in training runs ----------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def sft_run(tmp_path, name, *overrides, steps=3):
    cfg = make_cfg([f"output_dir={tmp_path / name}", "export.enabled=false", f"train.max_steps={steps}",
                    "train.eval_every=0", "train.log_every=1", "train.global_batch_size=8",
                    "train.micro_batch_size=4", *overrides])
    summary = Trainer(cfg, recipe_name=name).fit()
    return summary, [r["loss"] for r in read_metrics(str(tmp_path / name))]


@pytest.mark.parametrize("option", ["train.neftune_alpha=15", "train.symnoise_alpha=15",
                                    "train.masked_thought={max_rate:0.5,warmup_ratio:0}"])
def test_perturbations_change_training_but_not_evaluation(tmp_path, option):
    plain, plain_losses = sft_run(tmp_path, "plain")
    perturbed, losses = sft_run(tmp_path, "perturbed", option)
    again, again_losses = sft_run(tmp_path, "again", option)
    assert perturbed["eval_before"]["loss"] == plain["eval_before"]["loss"]  # evaluation sees clean inputs
    assert losses[0] != pytest.approx(plain_losses[0], abs=1e-4)  # the first training forward is perturbed
    assert again_losses == losses  # the draws are reproducible


def test_perturbations_refuse_pairwise_losses(tmp_path):
    options = ("train.neftune_alpha=5", "train.symnoise_alpha=5", "train.masked_thought={max_rate:0.3}")
    for k, option in enumerate(options):
        with pytest.raises(ValueError, match="defined for SFT data"):
            sft_run(tmp_path, f"pairs{k}", "recipe=dpo", option, "data.sources.0.num_rows=100")
    with pytest.raises(ValueError, match="set one"):
        sft_run(tmp_path, "both", "train.neftune_alpha=5", "train.symnoise_alpha=5")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        sft_run(tmp_path, "token", "train.masked_thought={mask_token:'<nope>'}")


def test_paper_recipes_carry_the_authors_numbers():
    neftune = make_cfg(["recipe=sft_neftune_llama2_7b_alpaca"], fast=False)
    assert (neftune.train.neftune_alpha, neftune.train.lr, neftune.train.global_batch_size,
            neftune.train.micro_batch_size) == (5, 5e-5, 128, 4)  # neelsjain/NEFTune experiment_code/README.md
    assert (neftune.model.name_or_path, neftune.data.template, neftune.data.final_eos) == (
        "meta-llama/Llama-2-7b-hf", "alpaca", "ensure")  # experiment_code/dataset.py: Alpaca prompts, EOS appended
    masked = make_cfg(["recipe=sft_masked_thought_llama2_7b_gsm8k"], fast=False)
    assert dict(masked.train.masked_thought) == {"max_rate": 0.4, "warmup_ratio": 0.66, "mask_token": None}
    assert (masked.train.lr, masked.train.epochs, masked.train.global_batch_size, masked.train.scheduler,
            masked.train.warmup_ratio, masked.data.max_length, masked.seed) == (1e-5, 10, 64, "cosine", 0.01, 512, 1)
