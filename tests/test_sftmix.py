"""SFTMix: mixing maths, confidence split, pairing order, confidence scoring, and the three-step chain."""

from __future__ import annotations

import json
import math
import os

import datasets
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, make_cfg, read_metrics

from tunelab.data.collate import Collator
from tunelab.data.contract import ROLE_SFT, ForwardOutputs
from tunelab.data.fingerprint import dataset_fingerprint
from tunelab.data.pipeline import build_datasets
from tunelab.data.sampler import ORDERINGS, micro_batches
from tunelab.data.sftmix import CONFIDENCE_FILE, sftmix_split, split_groups
from tunelab.losses import build_loss
from tunelab.losses.sftmix import SFTMixLoss, mixed_token_nll, pair_sequences
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.forward import CausalLMWithLogProbs, target_logps
from tunelab.trainers.models import build_model, build_tokenizer
from tunelab.trainers.scoring import rank_batches, score_examples
from tunelab.trainers.sftmix_scores import (
    confidence,
    perplexities,
    response_token_counts,
    score_run,
    select_checkpoints,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---- mixing maths on hand-made tensors ----------------------------------------------------------------------
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # LM head: 2-d hidden -> 3-token vocabulary
HEAD = torch.nn.Linear(2, 3, bias=False)
HEAD.weight.data.copy_(W)
HEAD.requires_grad_(False)


def head(h):
    return h @ W.T


def outputs(hidden_per_seq, targets_per_seq, groups):
    """ForwardOutputs of SFT sequences given per-sequence hidden states [len, 2] and target ids."""
    hidden = torch.cat(hidden_per_seq).requires_grad_(True)
    seq = torch.cat([torch.full((len(t),), s) for s, t in enumerate(targets_per_seq)])
    pos = torch.cat([torch.arange(len(t)) for t in targets_per_seq])
    targets = torch.cat([torch.tensor(t) for t in targets_per_seq])
    logps = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    n = len(targets_per_seq)
    out = ForwardOutputs(
        token_logps=logps, token_seq=seq, token_pos=pos, token_targets=targets,
        seq_logps=torch.zeros(n).index_add(0, seq, logps), seq_tokens=torch.bincount(seq, minlength=n).float(),
        seq_role=torch.full((n,), ROLE_SFT), chosen=torch.zeros(0, dtype=torch.long),
        rejected=torch.zeros(0, dtype=torch.long), seq_columns={"group": torch.tensor(groups, dtype=torch.float32)},
    )
    out.hidden = hidden
    out.score_hidden = lambda h, y: target_logps(HEAD, h, y, chunk_size=2)[0]
    return out


def log_softmax_at(h, y):
    """By hand: log softmax(W h)[y] for a 2-d hidden state."""
    logits = [W[v, 0].item() * h[0] + W[v, 1].item() * h[1] for v in range(3)]
    return logits[y] - math.log(sum(math.exp(z) for z in logits))


H_C = [[1.0, 2.0], [0.5, -1.0]]
H_U = [[-1.0, 0.0], [2.0, 1.0], [0.0, 3.0]]
Y_C, Y_U = [0, 2], [1, 1, 0]


def test_lambda_one_is_ntp_on_the_confident_example():
    out = outputs([torch.tensor(H_C), torch.tensor(H_U)], [Y_C, Y_U], [1, 0])
    result = SFTMixLoss()(out, lam=torch.tensor([1.0]))
    ntp_confident = -out.token_logps[out.token_seq == 0].sum()
    # "tokens" normalisation: 2 x sum over mixed positions (both tokens of the confident response here)
    torch.testing.assert_close(result.total, 2 * ntp_confident)
    # and lambda = 0 is NTP on the unconfident one over the overlapping positions
    result = SFTMixLoss()(out, lam=torch.tensor([0.0]))
    torch.testing.assert_close(result.total, -2 * out.token_logps[(out.token_seq == 1) & (out.token_pos < 2)].sum())


@pytest.mark.parametrize("alignment", ["overlap", "pad"])
def test_loss_equals_hand_computed_value(alignment):
    lam = 0.25
    out = outputs([torch.tensor(H_U), torch.tensor(H_C)], [Y_U, Y_C], [0, 1])  # unconfident first: still paired
    expected = 0.0
    for k in range(3 if alignment == "pad" else 2):
        hc = H_C[k] if k < len(H_C) else [0.0, 0.0]
        mixed = [lam * hc[i] + (1 - lam) * H_U[k][i] for i in range(2)]
        if k < len(Y_C):
            expected += lam * -log_softmax_at(mixed, Y_C[k])
        expected += (1 - lam) * -log_softmax_at(mixed, Y_U[k])
    result = SFTMixLoss(alignment=alignment)(out, lam=torch.tensor([lam]))
    assert result.unit == "target_tokens"
    assert result.total.item() == pytest.approx(2 * expected, rel=1e-6)
    result.total.backward()  # gradient reaches both sequences' hidden states
    grad = out.hidden.grad.abs().sum(-1)
    assert (grad[:2] > 0).all() and (grad[3:] > 0).all()
    assert (grad[2] > 0).item() == (alignment == "pad")  # 3rd unconfident token is mixed only when padding


def test_pairs_normalisation_and_composition_with_ntp():
    out = outputs([torch.tensor(H_C), torch.tensor(H_U)], [Y_C, Y_U], [1, 0])
    lam = torch.tensor([0.3])
    pair, nll_c, nll_u, _, _ = mixed_token_nll(out, *pair_sequences(out, strict=True), lam)
    per_position = 0.3 * nll_c + 0.7 * nll_u
    result = SFTMixLoss(normalize="pairs")(out, lam=lam)
    assert result.unit == "sequences"
    torch.testing.assert_close(result.total, 2 * per_position.mean())
    # L = L_NTP + mu L_mix: both terms in target tokens, so the core adds them before dividing
    loss_set = build_loss({"ntp": {}, "sftmix": {"weight": 0.2, "alpha": 0.5}})
    assert loss_set.needs.hidden_states
    sums, metrics = loss_set(out)
    assert set(sums) == {"target_tokens"} and "sftmix/lambda" in metrics and "sftmix/mixed_fraction" in metrics


def test_training_batches_must_hold_pairs_but_eval_batches_need_not():
    out = outputs([torch.tensor(H_C), torch.tensor(H_U)], [Y_C, Y_U], [1, 1])
    with pytest.raises(ValueError, match="do not alternate"):
        SFTMixLoss()(out)
    odd = outputs([torch.tensor(H_C), torch.tensor(H_U), torch.tensor(H_C)], [Y_C, Y_U, Y_C], [1, 0, 1])
    with pytest.raises(ValueError, match="even"):
        SFTMixLoss()(odd)
    with torch.no_grad():  # evaluation: data without groups is simply not mixed
        assert SFTMixLoss()(outputs([torch.tensor(H_C), torch.tensor(H_U)], [Y_C, Y_U], [0, 0])).total.item() == 0
        assert SFTMixLoss()(odd).total.item() > 0  # the one whole pair is mixed


def test_lambda_follows_the_torch_rng():
    loss = SFTMixLoss(alpha=0.5)
    torch.manual_seed(3)
    first = loss.sample_lambda(4)
    torch.manual_seed(3)
    assert torch.equal(first, loss.sample_lambda(4)) and ((first >= 0) & (first <= 1)).all()
    assert SFTMixLoss(lambda_per="batch").sample_lambda(3).unique().numel() == 1


# ---- split and pairing order --------------------------------------------------------------------------------
def test_split_is_balanced_deterministic_and_breaks_ties_by_index():
    conf = [-3.0, -1.0, -2.0, -1.0, -5.0, -2.0]
    assert split_groups(conf) == [0, 1, 1, 1, 0, 0]  # -1, -1, then of the two -2 the lower index (2, not 5)
    assert split_groups(conf) == split_groups(list(conf))
    assert split_groups(conf, 1 / 3) == [0, 1, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="split_ratio"):
        split_groups(conf, 1.0)
    groups = split_groups([float(i % 7) for i in range(101)])
    assert sum(groups) == 50  # round(0.5 * 101)


def tiny_sft_dataset(n=8):
    return datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3 + i, 4] for i in range(n)], "target_mask": [[0, 0, 1, 1]] * n,
    })


def test_split_stage_reads_scores_by_fingerprint(tmp_path):
    ds = tiny_sft_dataset()
    with pytest.raises(FileNotFoundError, match="sftmix_score.py"):
        sftmix_split(ds, split="train", seed=0, scores=str(tmp_path))
    conf = [-float(i) for i in range(8)]
    (tmp_path / CONFIDENCE_FILE).write_text(json.dumps({dataset_fingerprint(ds): {"confidence": conf}}))
    out = sftmix_split(ds, split="train", seed=0, context={}, scores=str(tmp_path), split_ratio=0.5)
    assert out["group"] == [1, 1, 1, 1, 0, 0, 0, 0] and out["confidence"] == conf
    assert sftmix_split(ds, split="eval", seed=0, scores=str(tmp_path)) is ds  # eval data keeps no groups
    with pytest.raises(ValueError, match="fingerprint"):
        sftmix_split(tiny_sft_dataset(6), split="train", seed=0, scores=str(tmp_path / CONFIDENCE_FILE))


def grouped(groups):
    return datasets.Dataset.from_dict({"group": groups})


def test_pairing_order_alternates_and_is_deterministic_per_seed_and_epoch():
    ds = grouped([1, 0, 0, 1, 1, 0, 0, 1, 1, 0])
    order = ORDERINGS["sftmix_pairs"](ds, 7, 0)
    assert sorted(order) == list(range(10))  # balanced halves: every example once per epoch
    assert [ds["group"][i] for i in order] == [1, 0] * 5
    assert order == ORDERINGS["sftmix_pairs"](ds, 7, 0)
    assert order != ORDERINGS["sftmix_pairs"](ds, 7, 1) and order != ORDERINGS["sftmix_pairs"](ds, 8, 0)
    for micro in micro_batches(order, 0, global_batch_size=8, rank=0, world_size=2, micro_batch_size=2):
        assert sorted(ds["group"][i] for i in micro) == [0, 1]  # whole pairs in every micro-batch


def test_pairing_order_with_unequal_halves_repeats_the_smaller_one():
    ds = grouped([1] * 7 + [0] * 3)  # split_ratio 0.7
    order = ORDERINGS["sftmix_pairs"](ds, 0, 0)
    assert len(order) == 10 and [ds["group"][i] for i in order] == [1, 0] * 5
    confident, unconfident = order[0::2], order[1::2]
    assert len(set(confident)) == 5 and set(unconfident) == {7, 8, 9}
    with pytest.raises(KeyError, match="sftmix_split"):
        ORDERINGS["sftmix_pairs"](tiny_sft_dataset(), 0, 0)


def imported_modules(path: str) -> set[str]:
    """Every module a source file imports, at module level or inside functions."""
    import ast

    with open(path) as handle:
        tree = ast.parse(handle.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_data_side_imports_no_trainer_code_and_not_the_pipeline():
    sftmix_imports = imported_modules(os.path.join(ROOT, "data", "sftmix.py"))
    assert not [m for m in sftmix_imports if m.split(".")[0] == "trainers"], sftmix_imports
    assert "tunelab.data.pipeline" not in sftmix_imports
    stages_imports = imported_modules(os.path.join(ROOT, "data", "stages.py"))
    assert not [m for m in stages_imports if m.startswith(("data.", "trainers"))], stages_imports
    from tunelab.data.sftmix import sftmix_pairs

    assert ORDERINGS["sftmix_pairs"] is sftmix_pairs


# ---- confidence scoring --------------------------------------------------------------------------------------
def test_perplexity_scoring_equals_naive_full_logits_computation():
    cfg = make_cfg(["data.sources.0.num_rows=40", "data.eval_fraction=0"])
    tokenizer = build_tokenizer(cfg.model)
    train, _, _ = build_datasets(cfg.data, tokenizer, "sft", cfg.seed)
    train = train.select(range(12))
    model = build_model(cfg.model, tokenizer, cfg.seed).eval()
    wrapper = CausalLMWithLogProbs(model, chunk_size=7)  # several head chunks
    collator = Collator("sft", packing=True, shared_prompt=True, row_length=256)
    logps = score_examples(Accelerator(cpu=True), wrapper, train, collator, batch_size=5)
    ppl = perplexities([sum(v) for v in logps], response_token_counts(train))
    naive = []
    with torch.no_grad():
        for ex in train:
            ids = torch.tensor(ex["input_ids"])[None]
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            labels = ids[0, 1:]
            mask = torch.tensor(ex["target_mask"][1:], dtype=torch.bool)
            nll = -logprobs[torch.arange(len(labels)), labels][mask]
            naive.append(math.exp(nll.mean().item()))
    assert ppl == pytest.approx(naive, rel=1e-4)
    assert confidence([ppl, [2 * p for p in ppl]]) == pytest.approx([-1.5 * p for p in ppl])


def test_rank_batches_split_items_in_blocks_and_keep_ranks_in_lockstep():
    assert [rank_batches(10, 3, r, 4) for r in range(4)] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]], [[9]]]
    assert [rank_batches(5, 2, r, 2) for r in range(2)] == [[[0, 1], [2]], [[3, 4], []]]  # rank 1: a dummy pass
    assert rank_batches(3, 8, 0, 1) == [[0, 1, 2]]


# ---- the chain on the tiny model ----------------------------------------------------------------------------
class Killed(Exception):
    pass


@pytest.mark.slow
def test_reference_then_scores_then_sftmix_training_and_resume(tmp_path, monkeypatch):
    from tunelab.trainers import checkpoint
    from tunelab.trainers.trainer import Trainer

    small = ["train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0", "export.enabled=false",
             "data.sources.0.num_rows=120"]
    ref_dir = tmp_path / "ref"
    Trainer(make_cfg(["recipe=sftmix_reference", f"output_dir={ref_dir}", "train.max_steps=2",
                      "train.save_every=1", *small]), recipe_name="sftmix_reference").fit()
    reset_accelerate()
    assert [os.path.basename(p) for p in select_checkpoints(str(ref_dir), "last_1")] == ["step_0000002"]
    scores = score_run(str(ref_dir), checkpoints="all")
    with open(scores) as handle:
        entry = next(iter(json.load(handle).values()))
    assert entry["checkpoints"] == ["step_0000001", "step_0000002"] and entry["num_examples"] == 114
    reset_accelerate()

    def mix(name, *extra):
        return Trainer(make_cfg(["recipe=sftmix", f"sftmix.reference_run={ref_dir}", f"output_dir={tmp_path / name}",
                                 "train.max_steps=2", "train.log_every=1", "train.save_every=1", *small, *extra]),
                       recipe_name="sftmix")

    trainer = mix("mix")
    assert sum(trainer.train_ds["group"]) == 57
    for batch in trainer._step_batches(0):
        assert batch.seq_columns["group"].tolist() == [1, 0, 1, 0]
    summary = trainer.fit()
    logged = read_metrics(str(tmp_path / "mix"))
    assert len(logged) == 2 and all(r["sftmix/loss"] > 0 and 0 < r["sftmix/lambda"] < 1 for r in logged)
    assert logged[0]["loss"] == pytest.approx(logged[0]["ntp/loss"] + 0.2 * logged[0]["sftmix/loss"], rel=1e-5)
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]

    # killed after the step-1 checkpoint and resumed: the same batches and the same lambdas
    save = checkpoint.save

    def save_then_die(accelerator, output_dir, step, state, keep_last):
        save(accelerator, output_dir, step, state, keep_last)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    reset_accelerate()
    with pytest.raises(Killed):
        mix("resumed").fit()
    monkeypatch.setattr(checkpoint, "save", save)
    reset_accelerate()
    mix("resumed", "resume=latest").fit()
    resumed = read_metrics(str(tmp_path / "resumed"))
    for key in ("loss", "sftmix/lambda", "sftmix/loss"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in logged], abs=1e-6)

    # a run on other data is refused, naming the cause
    reset_accelerate()
    with pytest.raises(ValueError, match="fingerprint"):
        mix("other", "data.sources.0.num_rows=60")


def test_chain_script_routes_overrides_to_the_right_steps():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sftmix_chain", os.path.join(ROOT, "scripts", "sftmix.py"))
    chain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain)
    options, ref, mix = chain.parse(["--out", "/tmp/o", "--launcher", "accelerate launch", "train.max_steps=5",
                                     "--ref", "train.save_every=1", "--mix", "sftmix.mu=0.5",
                                     "--checkpoints", "last_2"])
    (_, reference), (_, scoring), (_, sftmix) = chain.commands(options, ref, mix)
    assert reference[:3] == ["accelerate", "launch", "train.py"] and "train.save_every=1" in reference
    assert "train.max_steps=5" in reference and "sftmix.mu=0.5" not in reference
    assert scoring[-4:] == ["--run-dir", "/tmp/o/reference", "--checkpoints", "last_2"]
    assert "sftmix.reference_run=/tmp/o/reference" in sftmix and "sftmix.mu=0.5" in sftmix
    assert "train.max_steps=5" in sftmix and "train.save_every=1" not in sftmix
