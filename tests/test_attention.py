"""tiled_sdpa (trainers/attention.py) equals dense masked SDPA: tiles, values, gradients, and its fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.data.collate import Collator, attention_mask
from tunelab.data.contract import Needs
from tunelab.trainers import attention
from tunelab.trainers.attention import query_tiles
from tunelab.trainers.forward import CausalLMWithLogProbs


def test_query_tiles_start_at_the_first_key_any_query_of_the_tile_sees():
    # row 0: documents [0, 5) and [5, 9), then padding; row 1: documents [0, 3) and [3, 10)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [-1] * 3, [2] * 3 + [3] * 7 + [-1] * 2])
    # tile [0,4): key 0; tile [4,8): row 0 query 4 sees key 0; tile [8,12): row 0 query 8 sees 5, row 1 sees 3
    assert query_tiles(doc_ids, 4) == [(0, 4, 0), (4, 8, 0), (8, 12, 3)]
    assert query_tiles(doc_ids, 5) == [(0, 5, 0), (5, 10, 3), (10, 12, 10)]  # last tile: padding sees itself
    dense = attention_mask(doc_ids, torch.zeros_like(doc_ids))  # the tiles' first keys are the mask's
    for tile in (1, 3, 4, 5, 12):
        for q0, q1, k0 in query_tiles(doc_ids, tile):
            assert not dense[:, :, q0:q1, :k0].any() and dense[:, :, q0:q1, k0].any()


def test_a_block_of_the_mask_built_from_ids_is_that_block_of_the_dense_mask():
    batch = batches()[1]  # shared-prompt pairs: branches 0, 1, 2
    dense = attention_mask(batch.doc_ids, batch.branch_ids)
    length = dense.shape[-1]
    for q0, q1, k0 in [(0, length, 0), (5, 9, 2), (17, 30, 11), (length - 3, length, 0)]:
        block = attention_mask(batch.doc_ids, batch.branch_ids, slice(q0, q1), slice(k0, q1))
        assert torch.equal(block, dense[:, :, q0:q1, k0:q1])
    # the rejected branch never sees the chosen one, and sees the prompt
    chosen, rejected = batch.branch_ids == 1, batch.branch_ids == 2
    row = int(chosen.any(1).nonzero()[0])
    assert not dense[row, 0][rejected[row]][:, chosen[row]].any()
    assert dense[row, 0][rejected[row]][:, (batch.branch_ids[row] == 0) & (batch.doc_ids[row] >= 0)].any()


def model_pair(num_kv_heads, other="tiled_sdpa"):
    """The same weights under dense SDPA and under the ``other`` attention implementation."""
    torch.manual_seed(0)
    kwargs = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=num_kv_heads, intermediate_size=64)
    dense = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **kwargs))
    twin = LlamaForCausalLM(LlamaConfig(attn_implementation=other, **kwargs))
    twin.load_state_dict(dense.state_dict())
    return dense, twin


def batches():
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()  # noqa: E731
    sft = [{"input_ids": rand(n), "target_mask": [0] * p + [1] * (n - p)}
           for n, p in [(12, 5), (7, 3), (20, 9), (5, 2)]]
    pairs = [{"prompt_ids": rand(p), "chosen_ids": rand(c), "rejected_ids": rand(r)}
             for p, c, r in [(6, 4, 9), (3, 8, 2), (10, 5, 5), (2, 3, 3)]]
    return [Collator("sft", packing=True, shared_prompt=True, row_length=24)(sft),
            Collator("pairs", packing=True, shared_prompt=True, row_length=40)(pairs)]


@pytest.mark.parametrize("tile", [1, 5, 16, 128])
@pytest.mark.parametrize("num_kv_heads", [4, 2])  # 2: grouped-query attention (keys repeated per tile)
def test_tiled_sdpa_equals_dense_sdpa_in_values_and_gradients(tile, num_kv_heads, monkeypatch):
    dense, tiled = model_pair(num_kv_heads)
    calls = []
    sdpa = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape) or sdpa(*a, **k))
    for batch in batches():
        n_tiles = len(query_tiles(batch.doc_ids, tile))
        assert n_tiles > 1 or tile == 128
        results = []
        for model in (dense, tiled):
            model.zero_grad()
            out = CausalLMWithLogProbs(model, chunk_size=7, attention_tile=tile)(batch, Needs())
            (out.seq_logps * torch.linspace(1, 2, len(out.seq_logps))).sum().backward()
            results.append((out.token_logps.detach(), [p.grad.clone() for p in model.parameters()]))
        (dense_logps, dense_grads), (tiled_logps, tiled_grads) = results
        assert len(calls) == 2 * n_tiles  # the tiled model really ran tile by tile, in both layers
        calls.clear()
        torch.testing.assert_close(tiled_logps, dense_logps, atol=1e-5, rtol=1e-5)
        for a, b in zip(tiled_grads, dense_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_tiles_skip_keys_the_mask_hides():
    batch = batches()[0]
    mask = attention_mask(batch.doc_ids, batch.branch_ids)
    tiles = query_tiles(batch.doc_ids, 8)
    computed = sum((q1 - q0) * (q1 - k0) for q0, q1, k0 in tiles)
    assert computed <= 2 * mask.shape[-1] ** 2 / 3  # dense SDPA computes all L x L scores
    for q0, q1, k0 in tiles:  # and no visible key left out
        assert not mask[:, :, q0:q1, :k0].any()


def test_generation_and_untiled_calls_fall_back_to_plain_sdpa():
    dense, tiled = model_pair(2)
    prompt = torch.tensor([[5, 9, 11, 3], [0, 0, 7, 8]])
    attn = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # left padding: a 2D mask through SDPA's mask builder
    kwargs = dict(attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tiled.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))
    torch.testing.assert_close(tiled(prompt, attention_mask=attn).logits, dense(prompt, attention_mask=attn).logits)


def test_tiled_sdpa_is_not_written_into_exported_configs(tmp_path):
    _, tiled = model_pair(4)
    copy.deepcopy(tiled).save_pretrained(tmp_path)
    assert "tiled_sdpa" not in (tmp_path / "config.json").read_text()


def test_attention_that_cannot_take_the_document_mask_is_refused_by_name():
    from conftest import make_cfg

    from tunelab.trainers.models import build_model, tiny_tokenizer

    cfg = make_cfg(["model.attn_implementation=flash_attention_2"]).model
    with pytest.raises(ValueError, match="model.attn_implementation='flash_attention_2'.*tiled_sdpa, sdpa, eager"):
        build_model(cfg, tiny_tokenizer(), seed=0)


def test_tiles_reach_the_attention_under_gradient_checkpointing(monkeypatch):
    dense, tiled = model_pair(2)
    calls = []
    sdpa = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    batch = batches()[1]
    grads = []
    for model in (dense, tiled):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        CausalLMWithLogProbs(model, chunk_size=7, attention_tile=4)(batch, Needs()).seq_logps.sum().backward()
        grads.append([p.grad for p in model.parameters()])
    n_tiles = len(query_tiles(batch.doc_ids, 4))
    assert len(calls) == 2 * 2 * n_tiles  # two layers, forward and the checkpointed recompute
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_eager_attention_gets_the_layout_mask_in_its_additive_form():
    dense, eager = model_pair(2, "eager")
    for batch in batches():  # a boolean mask added to the scores would shift them by 0/1 instead of hiding keys
        with torch.no_grad():
            expected = CausalLMWithLogProbs(dense, chunk_size=7)(batch, Needs()).token_logps
            got = CausalLMWithLogProbs(eager, chunk_size=7)(batch, Needs()).token_logps
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
