"""The fused LM head (trainers/forward.py) against a naive full log-softmax, and against the generic path.

Per-token log-probs, token statistics and gradients (hidden and weight) must equal the naive computation in
float64 within 1e-5: for several chunk sizes, with the probabilities kept from the forward or recomputed in the
backward, for tied and untied heads inside a real model, and with a frozen head (LoRA) where no weight gradient
is formed. Heads the fused path cannot handle exactly fall back to the generic path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.data.collate import Collator
from tunelab.data.contract import STAT_LOG_SUM_P2, STAT_LOGIT_MEAN, STAT_MAX_LOGP, Needs
from tunelab.trainers import forward as fwd
from tunelab.trainers.forward import CausalLMWithLogProbs, fused_head_supported, target_logps

TOL = 1e-5
TOKEN_STATS = (STAT_LOGIT_MEAN, STAT_LOG_SUM_P2, STAT_MAX_LOGP)  # the built-in statistics


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    logits = hidden.double() @ weight.double().t()
    logp = torch.log_softmax(logits, -1)
    stats = {
        STAT_LOGIT_MEAN: logits.mean(-1),
        STAT_LOG_SUM_P2: torch.logsumexp(2 * logp, -1),
        STAT_MAX_LOGP: logp.max(-1).values,
    }
    return logp.gather(1, targets[:, None]).squeeze(1), stats


def problem(n=37, d=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    return hidden, weight, targets, upstream


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])
@pytest.mark.parametrize("keep_bytes", [0, 10 ** 9, 8 * 101 * 4 * 2])  # recompute all / keep all / keep some
def test_fused_matches_naive_values_and_gradients(chunk_size, keep_bytes):
    hidden, weight, targets, upstream = problem()
    head = nn.Linear(16, 101, bias=False)
    head.weight.data.copy_(weight)
    assert fused_head_supported(head)
    h = hidden.clone().requires_grad_(True)
    logps, stats = target_logps(head, h, targets, chunk_size, TOKEN_STATS, keep_bytes=keep_bytes)
    (logps * upstream).sum().backward()

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref, ref_stats = naive(h64, w64, targets)
    (ref * upstream.double()).sum().backward()

    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), ref.detach(), rtol=0, atol=TOL)
    for name in TOKEN_STATS:
        assert not stats[name].requires_grad
        torch.testing.assert_close(stats[name].double(), ref_stats[name].detach(), rtol=0, atol=TOL)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=0, atol=TOL)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=0, atol=TOL)


def test_fused_equals_generic_and_no_grad_path():
    hidden, weight, targets, _ = problem(seed=1)
    head = nn.Linear(16, 101, bias=False)
    head.weight.data.copy_(weight)
    fused, fused_stats = target_logps(head, hidden, targets, 8, TOKEN_STATS)
    generic, generic_stats = target_logps(head, hidden, targets, 8, TOKEN_STATS, fused=False)
    with torch.no_grad():
        nograd, _ = target_logps(head, hidden, targets, 8)
    torch.testing.assert_close(fused, generic, rtol=0, atol=TOL)
    torch.testing.assert_close(nograd, fused, rtol=0, atol=0)
    for name in TOKEN_STATS:
        torch.testing.assert_close(fused_stats[name], generic_stats[name], rtol=0, atol=TOL)


def test_frozen_head_gets_no_weight_gradient():
    hidden, weight, targets, upstream = problem(seed=2)
    head = nn.Linear(16, 101, bias=False).requires_grad_(False)
    head.weight.data.copy_(weight)
    h = hidden.clone().requires_grad_(True)
    logps, _ = target_logps(head, h, targets, 8)
    (logps * upstream).sum().backward()
    assert head.weight.grad is None
    h64 = hidden.double().requires_grad_(True)
    ref, _ = naive(h64, weight, targets)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=0, atol=TOL)


def test_unsupported_heads_take_the_generic_path():
    assert not fused_head_supported(nn.Linear(4, 9, bias=True))
    zero3 = nn.Linear(4, 9, bias=False)
    zero3.weight.ds_id = 7  # DeepSpeed ZeRO-3 marks its partitioned parameters
    assert not fused_head_supported(zero3)
    empty = nn.Linear(4, 9, bias=False)
    empty.weight = nn.Parameter(torch.empty(0))  # a partition not gathered: the weight is empty
    assert not fused_head_supported(empty)
    hooked = nn.Linear(4, 9, bias=False)
    hooked.register_forward_hook(lambda *a: None)
    assert not fused_head_supported(hooked)

    class Scaled(nn.Linear):
        pass

    assert not fused_head_supported(Scaled(4, 9, bias=False))
    # the generic path on a biased head still matches the naive computation
    head = nn.Linear(16, 101, bias=True)
    hidden, _, targets, _ = problem(seed=3)
    logps, _ = target_logps(head, hidden, targets, 8)
    ref = torch.log_softmax(head(hidden).double(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(logps.double(), ref.detach(), rtol=0, atol=TOL)


def test_block_pool_keeps_only_blocks_a_call_can_use():
    """Idle pooled blocks are resident memory: a need that no free block fits releases the smaller ones, and a
    smaller need reuses a larger block instead of allocating."""
    pool, cpu = fwd._BlockPool(), torch.device("cpu")
    pool.give(pool.take(10, 8, cpu))
    large = pool.take(20, 8, cpu)
    pool.give(large)
    assert [b.numel() for b in pool.free] == [160]  # the 80-element block was released, not kept beside it
    small = pool.take(5, 8, cpu)
    assert small.shape == (5, 8) and small.data_ptr() == large.data_ptr() and not pool.free
    second = pool.take(5, 8, cpu)  # two blocks in use at once (kept probabilities and a chunk buffer)
    pool.give(small)
    pool.give(second)
    assert sorted(b.numel() for b in pool.free) == [40, 160]


def _model(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=tied, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _pair_batch():
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(5 + i), "chosen_ids": ids(3 + 2 * i), "rejected_ids": ids(4 + i)} for i in range(4)]
    return Collator("pairs", packing=True, shared_prompt=True, row_length=64)(examples)


@pytest.mark.parametrize("tied", [True, False])
def test_model_gradients_fused_equal_generic(tied, monkeypatch):
    """All parameter gradients of a real model: fused head vs the generic checkpointed head."""
    batch = _pair_batch()
    needs = Needs(token_stats=frozenset({STAT_LOGIT_MEAN}))
    model = _model(tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    grads, values = [], []
    for fused in (True, False):
        m = copy.deepcopy(model)
        monkeypatch.setattr(fwd, "fused_head_supported", lambda head, fused=fused: fused)
        out = CausalLMWithLogProbs(m, chunk_size=7)(batch, needs)
        (out.seq_logps * torch.linspace(-1, 1, out.seq_logps.numel())).sum().backward()
        values.append((out.token_logps.detach(), out.token_stats[STAT_LOGIT_MEAN]))
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(values[0][0], values[1][0], rtol=0, atol=TOL)
    torch.testing.assert_close(values[0][1], values[1][1], rtol=0, atol=TOL)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=TOL, msg=name)


def test_lora_frozen_head_uses_fused_path():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(tied=False), peft.LoraConfig(r=4, target_modules="all-linear"))
    head = model.get_output_embeddings()
    assert fused_head_supported(head) and not head.weight.requires_grad
    batch = _pair_batch()
    out = CausalLMWithLogProbs(model, chunk_size=5)(batch, Needs())
    out.seq_logps.sum().backward()
    assert head.weight.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
