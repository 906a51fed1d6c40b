"""Parity with TRL's DPOTrainer (trl 1.16) on the same tiny model and the same tokenized pairs.

TRL 1.16 has no standalone DPO loss function: the loss is computed inline in ``DPOTrainer._compute_loss`` from
its own (fused-LM-head) forward. So the parity runs TRL's whole path — its collator (padded [chosen; rejected]
rows), its forward, its loss and its metrics — on the token ids our pipeline produced, with the reference
log-probs given to both as precomputed values, and compares loss and rewards with ours (packed rows, shared
prompt, chunked LM head). Our per-sequence log-probs are also checked against a naive computation over the
full [B, T, V] logits of a padded batch.

Deliberate difference (docs/methods_preference.md): WPO weights. TRL's ``use_weighting`` does not clamp the
weight at 1; tunelab follows the WPO authors and does. The last test pins exactly that relation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_cfg

from tunelab.data.collate import Collator
from tunelab.data.contract import STAT_LOG_SUM_P2, UNIT_PAIRS, Needs
from tunelab.data.pipeline import build_datasets
from tunelab.losses import build_loss
from tunelab.trainers.distributed import reset_accelerate
from tunelab.trainers.forward import CausalLMWithLogProbs
from tunelab.trainers.models import build_model, build_tokenizer

trl = pytest.importorskip("trl")
N_PAIRS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = make_cfg(["recipe=dpo", "data.sources.0.num_rows=40"])
    tokenizer = build_tokenizer(cfg.model)
    train, _, _ = build_datasets(cfg.data, tokenizer, "pairs", cfg.seed)
    examples = [{k: train[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(N_PAIRS)]
    reference = build_model(cfg.model, tokenizer, cfg.seed).eval()
    collate = Collator("pairs", packing=True, shared_prompt=True, row_length=256)
    # The policy moves away from the reference (so rewards and margins are not zero): a few steps of NLL on both
    # responses of the first half of the pairs make those likely enough that their WPO weight exceeds 1.
    policy = copy.deepcopy(reference).train()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    seen = collate(examples[: N_PAIRS // 2])
    for _ in range(15):
        loss = -CausalLMWithLogProbs(policy, chunk_size=16)(seen, Needs()).seq_logps.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    batch = collate(examples)
    with torch.no_grad():
        batch = batch.with_reference(CausalLMWithLogProbs(reference, chunk_size=16)(batch, Needs()).seq_logps)
    ref = batch.ref_seq_logps.view(-1, 2)
    trl_examples = [{**ex, "ref_chosen_logps": float(ref[i, 0]), "ref_rejected_logps": float(ref[i, 1])}
                    for i, ex in enumerate(examples)]
    yield {"cfg": cfg, "tokenizer": tokenizer, "examples": examples, "policy": policy, "batch": batch,
           "trl_examples": trl_examples, "tmp": tmp_path_factory.mktemp("trl")}
    reset_accelerate()


def naive_logps(model, examples, pad_id: int):
    """Per-sequence sum log-probs and per-token log sum p^2 from the full logits of a right-padded batch."""
    rows = [(ex["prompt_ids"], ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = torch.log_softmax(logits, -1)
    sums, sq = [], []
    for i, (p, r) in enumerate(rows):
        positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        targets = ids[i, len(p):len(p) + len(r)]
        sums.append(float(logp[i, positions, targets].sum()))
        sq.append(torch.logsumexp(2 * logp[i, positions], -1))
    n = len(examples)
    # reorder [chosen..., rejected...] -> [c0, r0, c1, r1, ...] (our sequence order)
    order = [j for i in range(n) for j in (i, n + i)]
    return torch.tensor([sums[j] for j in order], dtype=torch.float64), torch.cat([sq[j] for j in order])


def test_chunked_packed_logps_match_full_logits(setup):
    policy = CausalLMWithLogProbs(setup["policy"], chunk_size=16)
    with torch.no_grad():
        out = policy(setup["batch"], Needs(token_stats=frozenset({STAT_LOG_SUM_P2})))
    expected, log_sum_p2 = naive_logps(setup["policy"], setup["examples"], setup["tokenizer"].pad_token_id)
    torch.testing.assert_close(out.seq_logps.double(), expected, atol=1e-5, rtol=1e-6)
    order = torch.argsort(out.token_seq * 10_000 + out.token_pos)  # packed rows interleave the sequences' tokens
    torch.testing.assert_close(out.token_stats[STAT_LOG_SUM_P2][order].double(), log_sum_p2, atol=1e-5, rtol=1e-6)


def make_trl_trainer(setup, name: str, use_weighting: bool = False):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(setup["tmp"] / name), precompute_ref_log_probs=True, report_to="none",
                     use_cpu=True, bf16=False, use_weighting=use_weighting, per_device_train_batch_size=2)
    dummy = __import__("datasets").Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    return DPOTrainer(model=copy.deepcopy(setup["policy"]), args=args, train_dataset=dummy,
                      processing_class=setup["tokenizer"])


@pytest.fixture(scope="module")
def trl_trainer(setup):
    return make_trl_trainer(setup, "plain")


def trl_run(trainer, examples, loss_type: str, beta: float, eps: float, f_divergence: str = "reverse_kl",
            f_alpha: float = 0.5, discopop_tau: float = 0.05):
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, eps
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = f_divergence, f_alpha
    trainer.args.discopop_tau = discopop_tau
    trainer._metrics["train"].clear()
    trainer.model.train()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours(setup, options: dict, weighting=None):
    loss_set = build_loss({"dpo": options}, weighting)
    policy = CausalLMWithLogProbs(setup["policy"], chunk_size=16)
    with torch.no_grad():
        sums, metrics = loss_set(policy(setup["batch"], loss_set.needs))
    values = {k: float(m.value) / m.count for k, m in metrics.items() if m.unit is None and m.reduce == "mean"}
    return float(sums[UNIT_PAIRS]) / setup["batch"].counts[UNIT_PAIRS], values


@pytest.mark.parametrize("loss_type, beta, eps", [
    ("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("hinge", 0.1, 0.0), ("hinge", 1.0, 0.0), ("robust", 0.1, 0.2),
])
def test_dpo_losses_and_rewards_match_trl(setup, trl_trainer, loss_type, beta, eps):
    trl_loss, trl_metrics = trl_run(trl_trainer, setup["trl_examples"], loss_type, beta, eps)
    loss, metrics = ours(setup, {"beta": beta, "loss_type": loss_type, "label_smoothing": eps})
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    for key in ("logps/chosen", "logps/rejected"):  # sums over ~20 tokens: compare relatively
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-4), key
    assert 0 < metrics["rewards/accuracies"] < 1 and abs(metrics["rewards/margins"]) > 1e-3  # a non-trivial batch


@pytest.mark.parametrize("options", [
    {"loss_type": "sigmoid_norm", "beta": 0.5}, {"loss_type": "exo_pair", "beta": 0.1, "label_smoothing": 1e-3},
    {"loss_type": "nca_pair", "beta": 0.1}, {"loss_type": "bco_pair", "beta": 0.1, "bco_running_shift": False},
    {"loss_type": "sppo_hard", "beta": 1.0}, {"loss_type": "aot", "beta": 0.1},
    {"loss_type": "aot_unpaired", "beta": 0.1}, {"loss_type": "aot", "beta": 0.1, "label_smoothing": 0.2},
    {"loss_type": "apo_zero", "beta": 0.1}, {"loss_type": "apo_down", "beta": 0.1},
    {"loss_type": "discopop", "beta": 0.1, "discopop_tau": 0.05},
    {"loss_type": "sigmoid", "beta": 0.1, "f_divergence": "forward_kl"},
    {"loss_type": "sigmoid", "beta": 0.1, "f_divergence": "js_divergence"},
    {"loss_type": "sigmoid", "beta": 0.1, "f_divergence": "alpha_divergence", "f_alpha": 0.3},
    {"loss_type": "ipo", "beta": 0.1, "f_divergence": "js_divergence"},
    {"loss_type": "hinge", "beta": 1.0, "f_divergence": "forward_kl"},
])
def test_dpo_family_matches_trl(setup, trl_trainer, options):
    trl_loss, trl_metrics = trl_run(trl_trainer, setup["trl_examples"], options["loss_type"], options["beta"],
                                    options.get("label_smoothing", 0.0), options.get("f_divergence", "reverse_kl"),
                                    options.get("f_alpha", 0.5), options.get("discopop_tau", 0.05))
    loss, metrics = ours(setup, options)
    # TRL computes in float32: sppo_hard and forward_kl reach 1e4..1e8 on this batch's log-ratios
    assert loss == pytest.approx(trl_loss, rel=1e-6, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key


def test_wpo_weights_are_trl_weights_clamped_at_one(setup):
    """TRL: loss_i = w_i * dpo_i with w_i unclamped; tunelab (the WPO authors): min(1, w_i) * dpo_i."""
    trainer = make_trl_trainer(setup, "wpo", use_weighting=True)
    examples = setup["trl_examples"]
    unweighted_trainer_loss = []
    weighted = []
    for ex in examples:
        trainer.use_weighting = False
        unweighted_trainer_loss.append(trl_run(trainer, [ex], "sigmoid", 0.1, 0.0)[0])
        trainer.use_weighting = True
        weighted.append(trl_run(trainer, [ex], "sigmoid", 0.1, 0.0)[0])
    trl_weights = [w / d for w, d in zip(weighted, unweighted_trainer_loss)]
    clamped = [min(1.0, w) for w in trl_weights]
    assert max(trl_weights) > 1 > min(trl_weights)  # the clamp binds for some pairs and not for others
    loss_set = build_loss({"dpo": {"beta": 0.1}}, {"name": "wpo", "alignment": "sampled"})
    policy = CausalLMWithLogProbs(setup["policy"], chunk_size=16)
    with torch.no_grad():
        out = policy(setup["batch"], loss_set.needs)
        weights, _ = loss_set.pair_weighting(out)
    assert weights.tolist() == pytest.approx(clamped, abs=1e-5)
    loss, _ = ours(setup, {"beta": 0.1}, {"name": "wpo", "alignment": "sampled"})
    assert loss == pytest.approx(sum(c * d for c, d in zip(clamped, unweighted_trainer_loss)) / len(examples), abs=1e-5)


def naive_ld_logps(model, examples, alpha: float) -> list[tuple[float, float]]:
    """LD-DPO's (chosen, rejected) log-probs from the full logits of each unpadded prompt + response: the sum over
    the first min(|y_w|, |y_l|) response tokens plus alpha times the sum over the rest."""
    values = []
    for ex in examples:
        shared = min(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
        pair = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = ex["prompt_ids"] + ex[key]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            p = len(ex["prompt_ids"])
            tokens = logp[torch.arange(p - 1, len(ids) - 1), torch.tensor(ex[key])]
            pair.append(float(tokens[:shared].sum() + alpha * tokens[shared:].sum()))
        values.append(tuple(pair))
    return values


@pytest.mark.parametrize("loss_type, alpha", [("sigmoid", 0.5), ("sigmoid", 0.0), ("ipo", 0.3), ("hinge", 1.0)])
def test_ld_dpo_matches_trl(setup, trl_trainer, loss_type, alpha):
    """TRL splits the policy's log-probs itself; the reference's LD log-probs it is given are computed here from
    full logits, independently of tunelab's common-prefix sums, which ours take from a live reference forward."""
    cfg, tokenizer = setup["cfg"], setup["tokenizer"]
    reference = build_model(cfg.model, tokenizer, cfg.seed).eval()
    examples = [{**ex, "ref_chosen_logps": c, "ref_rejected_logps": r}
                for ex, (c, r) in zip(setup["examples"], naive_ld_logps(reference, setup["examples"], alpha))]
    lengths = [(len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in examples]
    assert any(c != r for c, r in lengths)  # some pairs have a tail to reweight
    trl_trainer.ld_alpha = alpha
    try:
        trl_loss, trl_metrics = trl_run(trl_trainer, examples, loss_type, 0.1, 0.0)
    finally:
        trl_trainer.ld_alpha = None
    loss_set = build_loss({"dpo": {"beta": 0.1, "loss_type": loss_type, "ld_alpha": alpha}})
    assert loss_set.needs.reference_prefix
    with torch.no_grad():
        ref_out = CausalLMWithLogProbs(reference, chunk_size=16)(setup["batch"], Needs())
        batch = setup["batch"].with_reference(ref_out.seq_logps, ref_out.seq_prefix_logps)
        sums, metrics = loss_set(CausalLMWithLogProbs(setup["policy"], chunk_size=16)(batch, loss_set.needs))
    assert float(sums[UNIT_PAIRS]) / batch.counts[UNIT_PAIRS] == pytest.approx(trl_loss, rel=1e-6, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        ours_value = float(metrics[key].value) / metrics[key].count
        assert ours_value == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-4), key
    plain, _ = ours(setup, {"beta": 0.1, "loss_type": loss_type})
    if alpha < 1:
        assert trl_loss != pytest.approx(plain, abs=1e-4)  # the reweighting changes the loss on this batch
