"""The packed, shared-prompt layout gives exactly the log-probs of the plain layout; logits only at labels."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.data.collate import Collator
from tunelab.data.contract import Needs
from tunelab.trainers.forward import CausalLMWithLogProbs


def tiny_model(vocab=64, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, attn_implementation="sdpa")
    return CausalLMWithLogProbs(LlamaForCausalLM(config).eval(), chunk_size=7)


def sft_examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, p in [(12, 5), (7, 3), (20, 9), (5, 2)]:
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "target_mask": [0] * p + [1] * (n - p)})
    return out


def naive_token_logps(model, ids, mask):
    """Reference: full logits of one unpadded sequence, full log-softmax, shift by one."""
    logits = model.model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return logps[torch.tensor(mask[1:]).bool()]


def test_packed_rows_give_the_same_per_token_logps_as_separate_sequences():
    model, examples = tiny_model(), sft_examples()
    packed = Collator("sft", packing=True, shared_prompt=True, row_length=32)(examples)
    assert packed.input_ids.shape[0] < len(examples)  # documents really share rows
    out = model(packed, Needs())
    for i, ex in enumerate(examples):
        expected = naive_token_logps(model, ex["input_ids"], ex["target_mask"])
        torch.testing.assert_close(out.token_logps[out.token_seq == i], expected, atol=1e-5, rtol=1e-5)
    padded = Collator("sft", packing=False, shared_prompt=True, row_length=32)(examples)
    assert padded.input_ids.shape[0] == len(examples)
    torch.testing.assert_close(model(padded, Needs()).seq_logps, out.seq_logps, atol=1e-5, rtol=1e-5)


def test_packing_resets_positions_and_never_labels_a_documents_first_token():
    examples = sft_examples()
    batch = Collator("sft", packing=True, shared_prompt=True, row_length=64)(examples)
    width = batch.input_ids.shape[1]
    starts = (batch.position_ids == 0).nonzero().tolist()
    predicted = batch.target_index + 1  # flat index of each target token
    first_tokens = {r * width + c for r, c in starts}
    assert not first_tokens & set(predicted.tolist())
    assert len(starts) >= len(examples)
    # one target per response token, none for prompts
    assert batch.counts["target_tokens"] == sum(sum(ex["target_mask"]) for ex in examples)


def pair_examples():
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()
    return [{"prompt_ids": rand(p), "chosen_ids": rand(c), "rejected_ids": rand(r)}
            for p, c, r in [(6, 4, 9), (3, 8, 2), (10, 5, 5)]]


def test_shared_prompt_pairs_equal_separate_prompt_response_sequences():
    model, examples = tiny_model(), pair_examples()
    shared = model(Collator("pairs", packing=True, shared_prompt=True, row_length=64)(examples), Needs())
    separate = model(Collator("pairs", packing=False, shared_prompt=False, row_length=64)(examples), Needs())
    for i, ex in enumerate(examples):
        for seq, key in ((2 * i, "chosen_ids"), (2 * i + 1, "rejected_ids")):
            ids = ex["prompt_ids"] + ex[key]
            mask = [0] * len(ex["prompt_ids"]) + [1] * len(ex[key])
            expected = naive_token_logps(model, ids, mask)
            torch.testing.assert_close(shared.token_logps[shared.token_seq == seq], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.seq_logps, separate.seq_logps, atol=1e-5, rtol=1e-5)
    assert shared.chosen.tolist() == [0, 2, 4] and shared.rejected.tolist() == [1, 3, 5]


def test_gradients_match_the_naive_full_logits_computation():
    model, examples = tiny_model(), sft_examples()
    batch = Collator("sft", packing=True, shared_prompt=True, row_length=32)(examples)
    model(batch, Needs()).token_logps.sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(naive_token_logps(model, ex["input_ids"], ex["target_mask"]).sum() for ex in examples).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_batch_is_frozen_and_the_reference_arrives_as_a_new_batch():
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "ref_logps": [-1.5, -2.5]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11, 12], "ref_logps": [-3.0, -4.0]}]
    collated = Collator("pairs", packing=True, shared_prompt=True, row_length=16)(examples)
    assert collated.ref_seq_logps.tolist() == [-1.5, -2.5, -3.0, -4.0]  # precomputed: chosen, rejected per pair
    assert collated.chosen.tolist() == [0, 2] and collated.rejected.tolist() == [1, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        collated.ref_seq_logps = torch.zeros(4)
    live = collated.with_reference(torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    assert live.ref_seq_logps.tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert collated.ref_seq_logps.tolist() == [-1.5, -2.5, -3.0, -4.0]  # the original is untouched
    assert live.input_ids is collated.input_ids
