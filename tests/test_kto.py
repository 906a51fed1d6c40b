"""KTO: the unpaired formats and the conversion of pairs, the mismatched completions, the unpaired layout, the loss
against hand-computed values and TRL 1.16's KTOTrainer, and short runs of recipe=kto."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_cfg, read_metrics
from test_preference_data import data_cfg, string_row, write_jsonl

from tunelab.data.collate import Collator
from tunelab.data.contract import (
    ROLE_DESIRABLE,
    ROLE_MISMATCHED,
    ROLE_UNDESIRABLE,
    UNIT_UNPAIRED,
    ForwardOutputs,
    Needs,
)
from tunelab.data.pipeline import build_datasets
from tunelab.data.unpaired import label_balance_note, mismatched_partners
from tunelab.losses import build_loss
from tunelab.losses.kto import KTOLoss
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.models import build_model, build_tokenizer
from tunelab.trainers.trainer import Trainer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(make_cfg([]).model)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def unpaired_string_row(i: int, label: bool) -> dict:
    return {"prompt": f"Name the capital city of country {i}.", "completion": f"The capital is city {i}.",
            "label": label}


# ---- the unpaired formats and the conversion of pairs -------------------------------------------------------------

def test_unpaired_rows_are_read_with_their_labels_and_detected(tmp_path, tok):
    rows = [unpaired_string_row(i, i % 3 == 0) for i in range(6)]
    train, _, _ = build_datasets(data_cfg(write_jsonl(tmp_path / "u.jsonl", rows), "auto"), tok, "unpaired", 0)
    assert train["label"] == [r["label"] for r in rows]
    assert [tok.decode(ids, skip_special_tokens=True).strip() for ids in train["completion_ids"]] == [
        r["completion"] for r in rows]
    messages = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]} for r in rows]
    as_messages, _, _ = build_datasets(data_cfg(write_jsonl(tmp_path / "m.jsonl", messages), "auto"), tok,
                                       "unpaired", 0)
    for key in ("prompt_ids", "completion_ids", "label", "mismatched_ids"):
        assert as_messages[key] == train[key]  # one user turn: the same tokens in either schema


@pytest.mark.parametrize("bad, fmt, reason", [
    ({"prompt": "Say hi.", "completion": "hi"}, "unpaired_strings", "row 3: missing field 'label'"),
    ({"prompt": "Say hi.", "completion": "hi", "label": None}, "unpaired_strings", "row 3: missing field 'label'"),
    ({"prompt": "Say hi.", "completion": "hi", "label": "yes"}, "unpaired_strings",
     "row 3: field 'label' must be a boolean"),
    ({"prompt": "Say hi.", "completion": "  ", "label": True}, "unpaired_strings",
     "row 3: field 'completion' is empty"),
    ({"prompt": [{"role": "user", "content": "Say hi."}], "completion": [
        {"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "hi"}], "label": True},
     "unpaired_messages", "row 3: field 'completion' must hold exactly one assistant turn"),
])
def test_bad_unpaired_rows_name_the_file_and_row(tmp_path, tok, bad, fmt, reason):
    rows = [unpaired_string_row(0, True), unpaired_string_row(1, False), bad]
    if fmt == "unpaired_messages":
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
                for r in rows[:2]] + [bad]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=f"{path} {reason}"):
        build_datasets(data_cfg(path, fmt), tok, "unpaired", 0)


def test_an_integer_label_is_refused_not_read_as_a_boolean(tmp_path, tok):
    rows = [{**unpaired_string_row(i, True), "label": i % 2} for i in range(3)]
    path = write_jsonl(tmp_path / "ints.jsonl", rows)
    with pytest.raises(ValueError, match=f"{path} row 1: field 'label' must be a boolean.*got int 0"):
        build_datasets(data_cfg(path, "unpaired_strings"), tok, "unpaired", 0)


def test_pairs_become_a_desirable_and_an_undesirable_example_on_the_pairs_tokens(tmp_path, tok):
    rows = [string_row(i, prompt=f"Name the capital of country {i}.") for i in range(4)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, _, _ = build_datasets(data_cfg(path, "pairwise_strings"), tok, "pairs", 0)
    unpaired, _, _ = build_datasets(data_cfg(path, "auto"), tok, "unpaired", 0)
    assert len(unpaired) == 2 * len(pairs)
    for i, pair in enumerate(pairs):
        chosen, rejected = unpaired[2 * i], unpaired[2 * i + 1]
        assert chosen["prompt_ids"] == rejected["prompt_ids"] == pair["prompt_ids"]
        assert (chosen["completion_ids"], chosen["label"]) == (pair["chosen_ids"], True)
        assert (rejected["completion_ids"], rejected["label"]) == (pair["rejected_ids"], False)
        assert chosen["_row"] == rejected["_row"] == pair["_row"]  # both name their source row


# ---- the mismatched completions ----------------------------------------------------------------------------------

def test_each_example_gets_the_completion_of_an_example_with_another_prompt(tmp_path, tok):
    rows = [string_row(i, prompt=f"Name the capital of country {i}.") for i in range(10)]
    cfg = data_cfg(write_jsonl(tmp_path / "pairs.jsonl", rows), "pairwise_strings")
    train, _, _ = build_datasets(cfg, tok, "unpaired", 0)
    completions = train["completion_ids"]
    for ex in train:
        partners = [j for j, c in enumerate(completions) if c == ex["mismatched_ids"]]
        assert partners and all(train[j]["prompt_ids"] != ex["prompt_ids"] for j in partners)
    again, _, _ = build_datasets(cfg, tok, "unpaired", 0)
    assert again["mismatched_ids"] == train["mismatched_ids"]  # deterministic for the seed
    other_seed, _, _ = build_datasets(cfg, tok, "unpaired", 1)
    assert other_seed["mismatched_ids"] != train["mismatched_ids"]


def test_distinct_prompts_form_one_cycle_and_shared_prompts_are_skipped():
    partner = mismatched_partners([(i,) for i in range(7)], seed=3)
    seen, i = [], 0
    for _ in range(7):  # following the partners from 0 visits every example once: a rotation of a permutation
        seen.append(i)
        i = partner[i]
    assert sorted(seen) == list(range(7)) and i == 0
    prompts = [(0,), (0,), (1,), (1,), (2,)]
    partner = mismatched_partners(prompts, seed=0)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partner))
    with pytest.raises(ValueError, match="at least two different prompts"):
        mismatched_partners([(5,), (5,), (5,)], seed=0)


def test_a_mismatched_completion_is_cut_to_fit_beside_its_prompt(tmp_path, tok):
    rows = [{"prompt": f"Say {i}.", "completion": "word " * (3 + 20 * i), "label": bool(i % 2)} for i in range(4)]
    train, _, _ = build_datasets(data_cfg(write_jsonl(tmp_path / "u.jsonl", rows), "unpaired_strings",
                                          max_length=64, max_prompt_length=32), tok, "unpaired", 0)
    completions = train["completion_ids"]
    for ex in train:
        assert len(ex["prompt_ids"]) + len(ex["mismatched_ids"]) <= 64
        assert any(c[:len(ex["mismatched_ids"])] == ex["mismatched_ids"] for c in completions)
    assert any(len(ex["prompt_ids"]) + len(ex["mismatched_ids"]) == 64 for ex in train)  # one was cut


def test_the_label_balance_note_gives_the_papers_weight_ranges():
    assert label_balance_note(50, 50) is None
    note = label_balance_note(100, 300)  # w_d * 100 / (1 * 300) in [1, 4/3]  <=>  w_d in [3, 4]
    assert "desirable_weight in [3, 4]" in note and "undesirable_weight in [0.25, 0.333]" in note


# ---- the layout ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled(tok):
    cfg = make_cfg(["recipe=kto", "data.sources.0.num_rows=40"])
    train, _, _ = build_datasets(cfg.data, tok, "unpaired", cfg.seed)
    return cfg, [train[i] for i in range(8)]


def test_the_unpaired_layout_scores_both_branches_as_separate_sequences(tok, bundled):
    cfg, examples = bundled
    model = build_model(cfg.model, tok, cfg.seed).eval()
    scorer = CausalLMWithLogProbs(model, chunk_size=16)
    shared = Collator("unpaired", packing=True, shared_prompt=True, row_length=256)(examples)
    assert shared.seq_role.tolist() == [r for ex in examples for r in (
        ROLE_DESIRABLE if ex["label"] else ROLE_UNDESIRABLE, ROLE_MISMATCHED)]
    assert shared.counts[UNIT_UNPAIRED] == len(examples) and shared.chosen.numel() == 0
    assert shared.counts["target_tokens"] == sum(len(ex["completion_ids"]) for ex in examples if ex["label"])
    with torch.no_grad():
        packed = scorer(shared, Needs()).seq_logps
        alone = scorer(Collator("unpaired", packing=False, shared_prompt=False, row_length=256)(examples),
                       Needs()).seq_logps
        one = torch.stack([scorer(Collator("sft", packing=False, shared_prompt=False, row_length=256)([{
            "input_ids": ex["prompt_ids"] + completion,
            "target_mask": [0] * len(ex["prompt_ids"]) + [1] * len(completion)}]), Needs()).seq_logps[0]
            for ex in examples for completion in (ex["completion_ids"], ex["mismatched_ids"])])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(packed, one, atol=1e-5, rtol=1e-6)


# ---- the loss on hand-made log-probs ---------------------------------------------------------------------------

def outputs(roles, ratios) -> ForwardOutputs:
    """Outputs whose policy log-probs sit ``ratios`` above reference log-probs of -10 each."""
    n = len(roles)
    policy = torch.tensor([-10.0 + r for r in ratios], dtype=torch.float64, requires_grad=True)
    return ForwardOutputs(
        token_logps=policy, token_seq=torch.arange(n), token_pos=torch.zeros(n, dtype=torch.long),
        token_targets=torch.zeros(n, dtype=torch.long), seq_logps=policy,
        seq_tokens=torch.ones(n, dtype=torch.float64), seq_role=torch.tensor(roles),
        chosen=torch.zeros(0, dtype=torch.long), rejected=torch.zeros(0, dtype=torch.long),
        ref_seq_logps=torch.full((n,), -10.0, dtype=torch.float64))


D, U, M = ROLE_DESIRABLE, ROLE_UNDESIRABLE, ROLE_MISMATCHED
ROLES = [D, M, U, M, D, M]


def test_the_loss_matches_hand_computed_values_with_weights():
    # log-ratios: desirable 2 and -1.5, undesirable -1; mismatched 1, 3, -1 -> z0 = 1
    out = outputs(ROLES, [2.0, 1.0, -1.0, 3.0, -1.5, -1.0])
    result = KTOLoss(beta=0.1, desirable_weight=2.0, undesirable_weight=1.0)(out)
    expected = 2 * (1 - sigmoid(0.1 * (2 - 1))) + (1 - sigmoid(0.1 * (1 + 1))) + 2 * (1 - sigmoid(0.1 * (-1.5 - 1)))
    assert result.unit == UNIT_UNPAIRED
    assert float(result.total.detach()) == pytest.approx(expected, abs=1e-12)
    m = {key: float(metric.value) / metric.count for key, metric in result.metrics.items()}
    assert m["kl"] == pytest.approx(1.0)
    assert m["rewards/chosen"] == pytest.approx(0.1 * (2 - 1.5) / 2)
    assert m["rewards/rejected"] == pytest.approx(-0.1)
    # the desirable/undesirable couples: 0.2 > -0.1 ranked right, -0.15 < -0.1 wrong
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["rewards/margins"] == pytest.approx((0.3 - 0.05) / 2)


def test_the_reference_point_is_clamped_at_zero():
    out = outputs(ROLES, [0.5, -1.0, 0.5, -3.0, -0.5, -2.0])  # mismatched mean -2 -> z0 = max(0, -2) = 0
    result = KTOLoss(beta=0.5)(out)
    expected = (1 - sigmoid(0.25)) + (1 - sigmoid(-0.25)) + (1 - sigmoid(-0.25))
    assert float(result.total.detach()) == pytest.approx(expected, abs=1e-12)
    assert float(result.metrics["kl"].value) == 0.0


def test_only_the_labelled_completions_get_gradient_and_z0_gets_none():
    ratios = [2.0, 1.0, -1.0, 3.0, -0.5, -1.0]
    out = outputs(ROLES, ratios)
    beta, z0 = 0.1, 1.0
    KTOLoss(beta=beta, desirable_weight=2.0)(out).total.backward()

    def slope(x):  # d/dx (1 - sigmoid(x)) = -sigmoid(x) (1 - sigmoid(x))
        return -sigmoid(x) * (1 - sigmoid(x))

    expected = [2 * beta * slope(beta * (2 - z0)), 0.0, -beta * slope(beta * (z0 + 1)), 0.0,
                2 * beta * slope(beta * (-0.5 - z0)), 0.0]
    torch.testing.assert_close(out.seq_logps.grad, torch.tensor(expected, dtype=torch.float64))


def test_options_are_checked():
    with pytest.raises(ValueError, match="beta must be > 0"):
        KTOLoss(beta=0.0)
    with pytest.raises(ValueError, match="undesirable_weight must be > 0"):
        KTOLoss(undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="both preference pairs and unpaired"):
        _ = build_loss({"kto": {}, "dpo": {}}).needs.layout


# ---- parity with TRL 1.16's KTOTrainer ------------------------------------------------------------------------

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def moved_policy(tok, bundled):
    """The bundled examples, a reference and a policy moved away from it by a few NLL steps on the completions."""
    cfg, examples = bundled
    reference = build_model(cfg.model, tok, cfg.seed).eval()
    policy = copy.deepcopy(reference).train()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    batch = Collator("unpaired", packing=True, shared_prompt=True, row_length=256)(examples)
    for _ in range(10):
        loss = -CausalLMWithLogProbs(policy, chunk_size=16)(batch, Needs()).seq_logps.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    with torch.no_grad():
        batch = batch.with_reference(CausalLMWithLogProbs(reference, chunk_size=16)(batch, Needs()).seq_logps)
    yield policy, batch
    reset_accelerate()


@pytest.mark.parametrize("beta, desirable_weight, undesirable_weight", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_loss_kl_and_rewards_match_trl(tmp_path, tok, bundled, moved_policy, beta, desirable_weight,
                                       undesirable_weight):
    from trl import KTOConfig, KTOTrainer

    _, examples = bundled
    policy, batch = moved_policy
    args = KTOConfig(output_dir=str(tmp_path), precompute_ref_log_probs=True, report_to="none", use_cpu=True,
                     bf16=False, per_device_train_batch_size=2, beta=beta, desirable_weight=desirable_weight,
                     undesirable_weight=undesirable_weight)
    dummy = __import__("datasets").Dataset.from_list(
        [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": False}])
    trainer = KTOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=dummy, processing_class=tok)
    ref = batch.ref_seq_logps.view(-1, 2)
    trl_examples = [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["completion_ids"],
                     "KL_completion_ids": ex["mismatched_ids"], "label": ex["label"],
                     "ref_logps": float(ref[i, 0]), "ref_KL_logps": float(ref[i, 1])} for i, ex in enumerate(examples)]
    trainer.model.train()
    with torch.no_grad():
        trl_loss = float(trainer._compute_loss(trainer.model, trainer.data_collator(trl_examples), False))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    loss_set = build_loss({"kto": {"beta": beta, "desirable_weight": desirable_weight,
                                   "undesirable_weight": undesirable_weight}})
    with torch.no_grad():
        sums, metrics = loss_set(CausalLMWithLogProbs(policy, chunk_size=16)(batch, loss_set.needs))
    assert trl_metrics["kl"] > 0  # the reference point is not clamped: z0 itself is compared
    assert float(sums[UNIT_UNPAIRED]) / batch.counts[UNIT_UNPAIRED] == pytest.approx(trl_loss, abs=1e-5)
    assert float(metrics["kto/kl"].value) == pytest.approx(trl_metrics["kl"], abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert float(metrics[key].value) / metrics[key].count == pytest.approx(trl_metrics[key], abs=1e-4), key


# ---- short runs of recipe=kto ----------------------------------------------------------------------------------

def kto_run(tmp_path, name, *overrides, steps=3):
    cfg = make_cfg([
        "recipe=kto", f"output_dir={tmp_path / name}", f"train.max_steps={steps}", "data.sources.0.num_rows=100",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=1", "train.eval_every=0",
        "train.eval_at_start=false", "export.enabled=false", f"reference.cache_dir={tmp_path / 'ref_cache'}",
        *overrides,
    ])
    Trainer(cfg, recipe_name=name).fit()
    return read_metrics(str(tmp_path / name))


def test_kto_trains_with_the_same_losses_for_every_reference_and_layout(tmp_path):
    precomputed = kto_run(tmp_path, "pre", "reference.strategy=precomputed")
    losses = [r["loss"] for r in precomputed]
    assert losses[0] == pytest.approx(0.5, abs=1e-6)  # policy == reference: every r and z0 are 0, 1 - sigmoid(0)
    assert precomputed[0]["kto/kl"] == pytest.approx(0.0, abs=1e-6)
    assert losses[-1] != pytest.approx(0.5, abs=1e-5)  # it moved
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logits/chosen"):
        assert key in precomputed[-1], key
    frozen = [r["loss"] for r in kto_run(tmp_path, "frozen", "reference.strategy=frozen_copy")]
    unpacked = [r["loss"] for r in kto_run(tmp_path, "unpacked", "reference.strategy=frozen_copy",
                                           "data.packing=false", "data.shared_prompt=false")]
    assert frozen == pytest.approx(losses, abs=1e-5)
    assert unpacked == pytest.approx(losses, abs=1e-5)



@pytest.mark.slow
def test_kto_with_lora_and_the_adapter_disabled_reference_equals_precomputed(tmp_path):
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.0",
            "train.lr=1e-2"]
    adapter = [r["loss"] for r in kto_run(tmp_path, "adapter", "reference.strategy=adapter_disabled", *lora)]
    precomputed = [r["loss"] for r in kto_run(tmp_path, "lora_pre", "reference.strategy=precomputed", *lora)]
    assert adapter[0] == pytest.approx(0.5, abs=1e-6) and adapter[-1] != pytest.approx(0.5, abs=1e-5)
    assert adapter == pytest.approx(precomputed, abs=1e-5)

def test_the_trl_example_recipe_carries_its_numbers():
    cfg = make_cfg(["recipe=kto_qwen15_18b_kto_mix"], fast=False)
    assert cfg.model.name_or_path == "trl-lib/qwen1.5-1.8b-sft" and cfg.train.mixed_precision == "bf16"
    assert dict(cfg.loss.kto) == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    train = cfg.train
    assert (train.lr, train.epochs, train.max_steps, train.global_batch_size, train.micro_batch_size) == (
        5e-7, 1, None, 16, 16)
    assert (train.scheduler, train.warmup_ratio) == ("cosine", 0.1)
    [source] = cfg.data.sources
    assert (source.path, source.format, source.split, source.eval_split) == (
        "trl-lib/kto-mix-14k", "unpaired_messages", "train", "test")
    assert cfg.data.max_length == 1024 and build_loss(cfg.loss).needs.layout == "unpaired"


@pytest.mark.slow
def test_kto_on_the_bundled_pairs_learns_to_rank_each_chosen_answer_above_its_rejected_one(tmp_path):
    """The bundled pairs read as unpaired completions: after training, the implicit reward ranks the desirable
    completions above the undesirable ones of the micro-batch (rewards/accuracies, chance 0.5) and, pair by pair on
    the eval split (each pair's two examples sit side by side), the chosen answer above its own rejected one. KTO
    learns this more slowly than DPO on the same pairs (0.64 of the eval pairs after 150 steps, where DPO passes
    0.7: tests/test_preference_train.py), having no contrast within a pair to follow."""
    cfg = make_cfg(["recipe=kto", f"output_dir={tmp_path / 'kto'}", "train.max_steps=150", "train.eval_every=0",
                    "export.enabled=false", "train.save_every=100000", f"reference.cache_dir={tmp_path / 'cache'}"],
                   fast=False)
    trainer = Trainer(cfg, recipe_name="kto")
    summary = trainer.fit()
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["rewards/accuracies"] == 0.0 and after["rewards/accuracies"] > 0.6, after
    assert after["loss"] < before["loss"] == pytest.approx(0.5)
    examples = [trainer.eval_ds[i] for i in range(len(trainer.eval_ds))]
    assert [ex["label"] for ex in examples] == [True, False] * (len(examples) // 2)
    collate = Collator("unpaired", packing=True, shared_prompt=True, row_length=cfg.data.max_length)
    policy = trainer.accelerator.unwrap_model(trainer.policy).eval()
    ratios = []
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch = collate(examples[start:start + 16])
            ratios.append((policy(batch, Needs()).seq_logps - batch.ref_seq_logps)[0::2])  # the labelled completions
    ratios = torch.cat(ratios)
    paired_accuracy = float((ratios[0::2] > ratios[1::2]).float().mean())
    assert paired_accuracy > 0.6, paired_accuracy
