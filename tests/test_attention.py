"""The attention paths of the packed layout equal dense masked SDPA: tiled_sdpa (tiles, values, gradients,
fallbacks), flex (its block table and forward on CPU; gradients on CUDA) and FlashAttention varlen (its boundaries
and transformers' varlen glue, with a reference varlen function in place of the kernel); the config check refuses
the GPU-only kernels (flex training, FlashAttention, Liger) where they cannot run, and model.liger patches the
model with Liger's body kernels only."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.data.collate import Collator, attention_mask
from tunelab.data.contract import Needs
from tunelab.trainers import attention, flex
from tunelab.trainers.attention import causal_rows, query_tiles
from tunelab.trainers.distributed import free_port
from tunelab.trainers.flash_varlen import varlen_boundaries, varlen_inputs
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
        # the tiled model really ran tile by tile in both layers, in the forward and again in the backward
        assert len(calls) == 2 * 2 * n_tiles
        calls.clear()
        torch.testing.assert_close(tiled_logps, dense_logps, atol=1e-5, rtol=1e-5)
        for a, b in zip(tiled_grads, dense_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rows_of_one_document_take_sdpas_causal_kernel_with_the_same_values_and_gradients(monkeypatch):
    dense, tiled = model_pair(2)
    g = torch.Generator().manual_seed(4)
    examples = [{"input_ids": torch.randint(1, 64, (10,), generator=g).tolist(), "target_mask": [0] * 3 + [1] * 7}
                for _ in range(3)]
    batch = Collator("sft", packing=True, shared_prompt=False, row_length=10)(examples)
    assert batch.doc_ids.shape == (3, 10) and causal_rows(batch.doc_ids, batch.branch_ids)
    calls = []
    sdpa = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **k: calls.append((a[4], k.get("is_causal"))) or sdpa(*a, **k))
    results = []
    for model in (dense, tiled):
        out = CausalLMWithLogProbs(model, chunk_size=7, attention_tile=4)(batch, Needs())
        (out.seq_logps * torch.tensor([1.0, 1.5, 2.0])).sum().backward()
        results.append((out.token_logps.detach(), [p.grad.clone() for p in model.parameters()]))
    assert calls == [(None, True)] * 2  # one causal call per layer, no mask, no tiles (the backward is SDPA's)
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # two documents in a row or branches keep the tiles; padding after the document does not
    assert not any(causal_rows(b.doc_ids, b.branch_ids) for b in batches())
    assert not causal_rows(torch.tensor([[0, 0, -1, 1]]), torch.zeros(1, 4, dtype=torch.long))
    short = {"input_ids": examples[0]["input_ids"][:6], "target_mask": examples[0]["target_mask"][:6]}
    padded = Collator("sft", packing=True, shared_prompt=False, row_length=10)([examples[1], short])
    assert (padded.doc_ids < 0).any() and causal_rows(padded.doc_ids, padded.branch_ids)
    calls.clear()
    results = []
    for model in (dense, tiled):
        model.zero_grad()
        out = CausalLMWithLogProbs(model, chunk_size=7, attention_tile=4)(padded, Needs())
        (out.seq_logps * torch.tensor([1.0, 2.0])).sum().backward()
        results.append((out.token_logps.detach(), [p.grad.clone() for p in model.parameters()]))
    assert calls == [(None, True)] * 2
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
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


def test_attention_that_cannot_take_the_document_ids_is_refused_by_name():
    from conftest import make_cfg

    from tunelab.trainers.models import build_model, tiny_tokenizer

    cfg = make_cfg(["model.attn_implementation=flash_attention_3"]).model
    with pytest.raises(ValueError, match="model.attn_implementation='flash_attention_3'.*"
                                         "tiled_sdpa, flex, flash_attention_2, sdpa, eager"):
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
    assert len(calls) == 2 * 3 * n_tiles  # two layers: forward, checkpointed recompute, the backward's own
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_eager_attention_gets_the_layout_mask_in_its_additive_form():
    dense, eager = model_pair(2, "eager")
    for batch in batches():  # a boolean mask added to the scores would shift them by 0/1 instead of hiding keys
        with torch.no_grad():
            expected = CausalLMWithLogProbs(dense, chunk_size=7)(batch, Needs()).token_logps
            got = CausalLMWithLogProbs(eager, chunk_size=7)(batch, Needs()).token_logps
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- flex ------------------------------------------------------------------------------------------------------
def layouts():
    """Every layout the collator builds, with rows longer than a few flex blocks: packed SFT, unshared pairs,
    shared-prompt pairs, the unpaired (KTO) layout, and one document a row (padding)."""
    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()  # noqa: E731
    sft = [{"input_ids": rand(n), "target_mask": [0] * p + [1] * (n - p)}
           for n, p in [(70, 20), (33, 3), (90, 40), (12, 2), (51, 30)]]
    shapes = [(20, 14, 30), (7, 25, 6), (31, 9, 12), (5, 16, 16)]
    pairs = [{"prompt_ids": rand(p), "chosen_ids": rand(c), "rejected_ids": rand(r)} for p, c, r in shapes]
    unpaired = [{"prompt_ids": rand(p), "completion_ids": rand(c), "mismatched_ids": rand(r), "label": i % 2 == 0}
                for i, (p, c, r) in enumerate(shapes)]
    return {
        "packed_sft": Collator("sft", packing=True, shared_prompt=True, row_length=130)(sft),
        "unshared_pairs": Collator("pairs", packing=True, shared_prompt=False, row_length=120)(pairs),
        "shared_prompt_pairs": Collator("pairs", packing=True, shared_prompt=True, row_length=100)(pairs),
        "unpaired": Collator("unpaired", packing=True, shared_prompt=True, row_length=100)(unpaired),
        "padding": Collator("sft", packing=False, shared_prompt=True, row_length=130)(sft),
    }


@pytest.mark.parametrize("block", [4, 16, 64])
@pytest.mark.parametrize("name", list(layouts()))
def test_flex_block_table_covers_every_visible_key_and_its_full_blocks_hide_none(name, block):
    batch = layouts()[name]
    dense = attention_mask(batch.doc_ids, batch.branch_ids)[:, 0]
    length = dense.shape[-1]
    pad = -length % block
    blocks = torch.nn.functional.pad(dense, (0, pad, 0, pad)).unflatten(1, (-1, block)).unflatten(3, (-1, block))
    visible_any = blocks.any(dim=(2, 4))  # [rows, nq, nk]
    visible_all = blocks.all(dim=(2, 4))
    partial, full = flex.block_tables(batch.doc_ids, batch.branch_ids, block)
    assert not (partial & full).any()
    assert not (visible_any & ~(partial | full)).any()  # an empty block holds no visible key
    assert not (full & ~visible_all).any()  # a full block skips the mask: every key in it must be visible
    assert full.any() or block == 64  # the full-block path is exercised
    # blocks are skipped: fewer computed than the causal half (on the packed layouts, where documents are short)
    computed = int((partial | full).sum())
    n = partial.shape[-1]
    assert computed <= partial.shape[0] * n * (n + 1) // 2
    if name == "packed_sft" and block == 4:
        assert computed < 0.6 * partial.shape[0] * n * (n + 1) // 2


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("num_kv_heads", [4, 2])  # 2: grouped-query attention (enable_gqa)
def test_flex_forward_equals_dense_sdpa_on_every_layout(block, num_kv_heads, monkeypatch):
    """CPU: forward only (torch 2.13 has no flex backward on CPU). The tolerance is float32 summation-order noise:
    the same scores and softmax as dense SDPA, accumulated in another order (measured ~5e-7 on these rows)."""
    monkeypatch.setattr(flex, "BLOCK", block)
    dense, flexed = model_pair(num_kv_heads, "flex")
    calls = []
    kernel = flex.flex_attention
    monkeypatch.setattr(flex, "flex_attention", lambda *a, **k: calls.append(k["block_mask"]) or kernel(*a, **k))
    for name, batch in layouts().items():
        with torch.no_grad():
            expected = CausalLMWithLogProbs(dense, chunk_size=7)(batch, Needs())
            got = CausalLMWithLogProbs(flexed, chunk_size=7)(batch, Needs())
        assert len(calls) == 2 and calls[0].BLOCK_SIZE == (block, block), name  # flex ran in both layers
        calls.clear()
        torch.testing.assert_close(got.token_logps, expected.token_logps, atol=2e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(got.seq_logps, expected.seq_logps, atol=1e-4, rtol=1e-5, msg=name)


def test_flex_refuses_a_cpu_training_forward_and_attention_dropout():
    _, flexed = model_pair(2, "flex")
    batch = layouts()["shared_prompt_pairs"]
    with pytest.raises(NotImplementedError, match="flex trains only on CUDA.*tiled_sdpa"):
        CausalLMWithLogProbs(flexed, chunk_size=7)(batch, Needs())
    for layer in flexed.model.layers:
        layer.self_attn.attention_dropout = 0.1
    flexed.train()
    with torch.no_grad(), pytest.raises(ValueError, match="attention dropout 0.1"):
        CausalLMWithLogProbs(flexed, chunk_size=7)(batch, Needs())


def test_flex_generation_falls_back_to_plain_sdpa():
    dense, flexed = model_pair(2, "flex")
    prompt = torch.tensor([[5, 9, 11, 3], [0, 0, 7, 8]])
    kwargs = dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), max_new_tokens=5, do_sample=False,
                  pad_token_id=0)
    assert torch.equal(flexed.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's backward runs only on CUDA (torch 2.13)")
def test_flex_gradients_equal_dense_sdpa_on_cuda():
    dense, flexed = (m.cuda() for m in model_pair(2, "flex"))
    for name, batch in layouts().items():
        batch = batch.to("cuda")
        grads = []
        for model in (dense, flexed):
            model.zero_grad()
            out = CausalLMWithLogProbs(model, chunk_size=7)(batch, Needs())
            (out.seq_logps * torch.linspace(1, 2, len(out.seq_logps), device="cuda")).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)


# ---- FlashAttention varlen -------------------------------------------------------------------------------------
def test_varlen_boundaries_by_hand():
    # row 0: documents of 3 and 2 positions, then 2 padding; row 1: a document of 4, one of 2, 1 padding
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2, 2, 2, 2, 3, 3, -1]])
    cu, longest = varlen_boundaries(doc_ids)
    assert cu.tolist() == [0, 3, 5, 6, 7, 11, 13, 14] and cu.dtype == torch.int32 and longest == 4
    # the same document id continuing into the next row is still a new sequence there
    cu, longest = varlen_boundaries(torch.tensor([[4, 4, 4], [4, 4, 5]]))
    assert cu.tolist() == [0, 3, 5, 6] and longest == 3


@pytest.mark.parametrize("name", ["packed_sft", "unshared_pairs", "padding"])
def test_varlen_sequences_are_the_documents_and_position_ids_restart_in_each(name):
    batch = layouts()[name]
    kwargs = varlen_inputs(batch.doc_ids, batch.branch_ids)
    cu = kwargs["cu_seq_lens_q"].tolist()
    positions, docs = batch.position_ids.reshape(-1), batch.doc_ids.reshape(-1)
    for start, end in zip(cu, cu[1:]):
        assert positions[start:end].tolist() == list(range(end - start))  # what the rotary embedding needs
        assert len(set(docs[start:end].tolist())) == 1
    real = [d for d in docs.tolist() if d >= 0]  # each document is exactly one sequence
    n_docs = sum(1 for i, d in enumerate(real) if i == 0 or d != real[i - 1])
    assert len(cu) - 1 == n_docs + int((docs < 0).sum())
    assert kwargs["attention_mask"] is None and kwargs["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))


@pytest.mark.parametrize("name", ["shared_prompt_pairs", "unpaired"])
def test_varlen_refuses_shared_prompt_layouts_and_points_to_flex(name):
    batch = layouts()[name]
    with pytest.raises(ValueError, match="shared-prompt layout.*attn_implementation=flex.*shared_prompt=false"):
        varlen_inputs(batch.doc_ids, batch.branch_ids)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract on CPU: [tokens, H, D] in, each cu_seqlens segment attended on its own
    (causally), here as one SDPA call under the block-diagonal mask the boundaries alone define."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and causal and dropout_p == 0.0
    assert max_seqlen_q == int(cu_seqlens_q.diff().max())
    segment = torch.repeat_interleave(torch.arange(len(cu_seqlens_q) - 1), cu_seqlens_q.diff().long())
    positions = torch.arange(q.shape[0])
    mask = (segment[:, None] == segment[None, :]) & (positions[:, None] >= positions[None, :])
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale,
                                                           enable_gqa=True)
    return out.transpose(0, 1)


@pytest.mark.parametrize("name", ["packed_sft", "unshared_pairs", "padding"])
def test_flash_varlen_glue_with_a_reference_kernel_equals_dense_sdpa(name, monkeypatch):
    """transformers' own flash_attention_2 path, fed our boundaries, with ``reference_varlen`` standing in for the
    kernel: checks what reaches the kernel and the model's log-probs, not the CUDA kernel itself."""
    import transformers.modeling_flash_attention_utils as fa

    seen = []

    def kernel(*args, **kwargs):
        seen.append(kwargs["cu_seqlens_q"])
        return reference_varlen(*args, **kwargs)

    process = fa._lazy_define_process_function(reference_varlen)
    monkeypatch.setattr(fa, "lazy_import_flash_attention",
                        lambda *a, **k: ((None, kernel, None, None, None), (process, dict)))
    dense, flash = model_pair(2, "sdpa")
    flash.config._attn_implementation = "flash_attention_2"  # flash_attn is not installed: the kernel is patched
    batch = layouts()[name]
    with torch.no_grad():
        expected = CausalLMWithLogProbs(dense, chunk_size=7)(batch, Needs()).token_logps
        got = CausalLMWithLogProbs(flash, chunk_size=7)(batch, Needs()).token_logps
    assert len(seen) == 2 and all(torch.equal(s, varlen_boundaries(batch.doc_ids)[0]) for s in seen)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


# ---- what the config check refuses, and Liger's patching ------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["model.liger=true"], "model.liger=true needs a CUDA GPU"),
    (["model.attn_implementation=flex"], "flex trains only on CUDA"),
    (["model.attn_implementation=flash_attention_2"], "flash_attention_2 needs a CUDA GPU and the flash-attn"),
])
def test_gpu_only_kernels_are_refused_at_config_check_without_cuda(overrides, message, monkeypatch):
    from conftest import make_cfg

    from tunelab.trainers.config_check import ConfigError, check_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_config(make_cfg([]))  # the defaults run anywhere
    with pytest.raises(ConfigError, match=message):
        check_config(make_cfg(overrides))


def test_liger_without_its_package_names_it(monkeypatch):
    import importlib.util

    from tunelab.trainers import liger

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert liger.liger_problem() == "model.liger=true needs the liger-kernel package: pip install liger-kernel"


def test_liger_patches_the_body_kernels_and_not_its_losses(monkeypatch):
    """liger-kernel is not installed here (it needs triton): a stand-in module records what build_model asks of it."""
    import sys
    import types

    from conftest import make_cfg

    from tunelab.trainers.models import build_model, tiny_tokenizer

    calls = []
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None}
    fake._apply_liger_kernel_to_instance = lambda model, **kwargs: calls.append((model.config.model_type, kwargs))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    build_model(make_cfg(["model.liger=true"]).model, tiny_tokenizer(), seed=0)
    assert calls == [("llama", {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                "fused_linear_cross_entropy": False})]
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"qwen2": None}
    with pytest.raises(ValueError, match="no kernels for model type 'llama'"):
        build_model(make_cfg(["model.liger=true"]).model, tiny_tokenizer(), seed=0)


# ---- sequence parallelism: DeepSpeed Ulysses around tiled_sdpa ------------------------------------------------
TILED = "tiled_sdpa"


def _ulysses_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: each runs the body over its half of the row's positions, DeepSpeed's Ulysses
    wrapper exchanges heads for positions around tiled_sdpa (which gets the whole row's layout ids), and the
    process writes its hidden states and its share of the gradients."""
    import os

    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from tunelab.trainers.attention import layout_inputs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    _, model = model_pair(2)
    ids, positions, doc_ids, branch_ids = ulysses_row()
    UlyssesSPAttentionHF.register_with_transformers(model, TILED, sequence_parallel_size=2,
                                                    micro_batch_size=ids.shape[0])
    half = slice(rank * ids.shape[1] // 2, (rank + 1) * ids.shape[1] // 2)
    model.train()
    hidden = model.model(input_ids=ids[:, half], position_ids=positions[:, half], use_cache=False,
                         **layout_inputs(doc_ids, branch_ids, TILED, 16, torch.float32)).last_hidden_state
    hidden.sum().backward()
    torch.save({"hidden": hidden.detach(), "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()



def ulysses_row():
    """(input ids, position ids, doc ids, branch ids) of shared-prompt pairs, padded to an even length."""
    batch = layouts()["shared_prompt_pairs"]  # branches: the rejected response must not see the chosen one
    pad = -batch.doc_ids.shape[1] % 2
    fills = ((batch.input_ids, 0), (batch.position_ids, 0), (batch.doc_ids, -1), (batch.branch_ids, 0))
    return tuple(torch.nn.functional.pad(t, (0, pad), value=v) for t, v in fills)


@pytest.mark.slow
def test_deepspeed_ulysses_around_tiled_sdpa_equals_the_unsharded_forward_on_two_gloo_processes(tmp_path):
    """What sequence parallelism would build on: DeepSpeed 0.19.8's UlyssesSPAttentionHF runs its all-to-all on gloo
    (two CPU processes), passes tiled_sdpa's layout keywords through, and the sharded body's hidden states and
    summed gradients equal the unsharded dense-SDPA body's."""

    import torch.multiprocessing as mp

    port = free_port()
    mp.spawn(_ulysses_worker, args=(port, str(tmp_path)), nprocs=2)
    dense, _ = model_pair(2)
    ids, positions, doc_ids, branch_ids = ulysses_row()
    hidden = dense.model(input_ids=ids, position_ids=positions, use_cache=False,
                         attention_mask=attention_mask(doc_ids, branch_ids)).last_hidden_state
    hidden.sum().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["hidden"] for r in ranks], dim=1), hidden.detach(), atol=1e-5, rtol=1e-5)
    compared = 0
    for p, a, b in zip(dense.parameters(), ranks[0]["grads"], ranks[1]["grads"]):
        if p.grad is None:  # the LM head, outside the body
            assert a is None and b is None
            continue
        torch.testing.assert_close(a + b, p.grad, atol=1e-4, rtol=1e-4)
        compared += 1
    assert compared == len(list(dense.model.parameters()))
