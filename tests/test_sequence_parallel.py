"""Sequence parallelism (train.sequence_parallel, trainers/sequence_parallel.py): the sharding of a micro-batch's
positions and targets, the refusals, a sharded forward on two gloo processes against the unsharded one (log-probs
and gradients, every layout), and whole runs: SP=2 under ZeRO-2 and ZeRO-3 (2 processes, and 4 as two
data-parallel groups) against one process with the same global batch, and their resumption."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, make_cfg
from tests.test_attention import layouts, model_pair
from tunelab.data.collate import attention_mask
from tunelab.data.contract import Needs
from tunelab.trainers.config_check import ConfigError, check_config
from tunelab.trainers.distributed import free_port
from tunelab.trainers.sequence_parallel import enable_sequence_parallel, one_row, shard


# ---- sharding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(layouts()))
@pytest.mark.parametrize("size", [2, 3])
def test_shards_split_the_rows_laid_end_to_end_and_their_targets(name, size):
    batch = layouts()[name]
    flat_ids = batch.input_ids.reshape(-1)
    parts = [shard(batch, rank, size) for rank in range(size)]
    joined = torch.cat([p.input_ids for p in parts], dim=1)[0]
    pad = -flat_ids.numel() % size
    assert joined.numel() == flat_ids.numel() + pad
    assert torch.equal(joined[:flat_ids.numel()], flat_ids) and not joined[flat_ids.numel():].any()
    assert torch.equal(torch.cat([p.position_ids for p in parts], dim=1)[0, :flat_ids.numel()],
                       batch.position_ids.reshape(-1))
    # every target on exactly one rank, read there at the same token as in the whole batch
    owned = torch.cat([p.targets for p in parts]).sort().values
    assert torch.equal(owned, torch.arange(batch.target_ids.numel()))
    for p in parts:
        assert torch.equal(p.input_ids[0, p.target_index], flat_ids[batch.target_index[p.targets]])
        assert p.doc_ids.shape == (1, joined.numel())  # the whole row's layout on every rank


def test_rows_laid_end_to_end_keep_the_layout_of_each_row():
    """One row made of all rows: its mask is the block diagonal of the rows' masks (documents never meet)."""
    batch = layouts()["packed_sft"]
    rows, length = batch.doc_ids.shape
    assert rows > 1
    whole = attention_mask(one_row(batch.doc_ids), batch.branch_ids.reshape(1, -1))[0, 0]
    expected = torch.block_diag(*attention_mask(batch.doc_ids, batch.branch_ids)[:, 0])
    assert torch.equal(whole, expected)
    assert whole.shape == (rows * length, rows * length)


# ---- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("model.attn_implementation=sdpa", "only tiled_sdpa"),
    ("train.neftune_alpha=5", "train.neftune_alpha: its noise is drawn per rank"),
    ("train.symnoise_alpha=5", "train.symnoise_alpha: its noise is drawn per rank"),
    ("train.sequence_parallel=0", "an integer > 0"),
    ("model.lora.enabled=true", "adapter_disabled"),
])
def test_config_check_refuses_what_sharding_cannot_serve(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(make_cfg(["train.sequence_parallel=2", override]))


def test_start_refuses_without_deepspeed_an_odd_process_count_or_heads_and_needs_it_cannot_serve():
    _, model = model_pair(2)  # 4 heads, 2 key/value heads
    with pytest.raises(ValueError) as refused:
        enable_sequence_parallel(model, 3, 4, False, Needs(hidden_states=True))
    text = str(refused.value)
    for part in ("train.sequence_parallel=3", "under DeepSpeed only", "process count 4 is not a multiple",
                 "4 attention heads and 2 key/value heads", "hidden states"):
        assert part in text


# ---- a sharded forward on two gloo processes ---------------------------------------------------------------------
def _forward_worker(rank: int, port: int, out_dir: str) -> None:
    """Each of two processes runs the sharded training forward of every layout and writes its outputs and gradients."""
    import deepspeed

    from tunelab.trainers.forward import CausalLMWithLogProbs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    _, model = model_pair(2)
    policy = CausalLMWithLogProbs(model, chunk_size=16, attention_tile=16)
    policy.sequence_parallel = enable_sequence_parallel(model, 2, 2, True, Needs())
    policy.train()
    results = {}
    for name, batch in layouts().items():
        policy.zero_grad(set_to_none=True)
        out = policy(batch, Needs())
        (out.seq_logps * torch.linspace(0.5, 1.5, out.seq_logps.numel())).sum().backward()
        results[name] = {"token_logps": out.token_logps.detach(), "seq_logps": out.seq_logps.detach(),
                         "grads": [p.grad.clone() for p in policy.parameters()]}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sharded_forward_on_two_gloo_processes_equals_the_unsharded_one_on_every_layout(tmp_path):
    """Both ranks get every target's log-prob as the unsharded forward computes it, and their gradients (each its
    positions' share) sum to the unsharded gradient of the same loss, for packed multi-row SFT, pairs with and
    without a shared prompt, the unpaired layout and padded rows."""
    import torch.multiprocessing as mp

    from tunelab.trainers.forward import CausalLMWithLogProbs

    mp.spawn(_forward_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    dense, _ = model_pair(2)
    policy = CausalLMWithLogProbs(dense, chunk_size=16)
    policy.train()
    for name, batch in layouts().items():
        policy.zero_grad(set_to_none=True)
        out = policy(batch, Needs())
        (out.seq_logps * torch.linspace(0.5, 1.5, out.seq_logps.numel())).sum().backward()
        for r in ranks:
            torch.testing.assert_close(r[name]["token_logps"], out.token_logps.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(r[name]["seq_logps"], out.seq_logps.detach(), atol=1e-4, rtol=1e-5)
        for p, a, b in zip(policy.parameters(), ranks[0][name]["grads"], ranks[1][name]["grads"]):
            torch.testing.assert_close(a + b, p.grad, atol=1e-4, rtol=1e-4, msg=name)
            assert not torch.equal(a, p.grad)  # a share, not the whole: each rank saw only its positions


# ---- whole runs: SP=2 under ZeRO-2/3 against one process ------------------------------------------------------------
RUN = ["train.progress_bar=false", "train.plot=false", "data.sources.0.num_rows=400", "train.log_every=1",
       "train.eval_every=2", "train.max_steps=4"]


def _run(out, *overrides, sequence_parallel: int = 1, config: str = "zero2", processes: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if sequence_parallel > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(ROOT, "recipes", "accelerate", f"{config}.yaml"), "--num_processes",
                   str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port())]
        overrides = (*overrides, f"train.sequence_parallel={sequence_parallel}")
    else:
        command = [sys.executable]
    proc = subprocess.run([*command, os.path.join(ROOT, "train.py"), f"output_dir={out}", *RUN, *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _records(out) -> dict[tuple[int, str], dict]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return {(r["step"], r["split"]): r for r in map(json.loads, handle)}


def _exported(out) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "export"), dtype=torch.float32)
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("recipe, metric, config, processes", [
    ("sft", "ntp/nll", "zero2", 2),  # packed SFT rows (recipes/data/bundled_sft.yaml: packing)
    ("dpo", "rewards/margins", "zero2", 2),  # shared-prompt pairs (bundled_pref.yaml), precomputed reference
    ("sft", "ntp/nll", "zero3", 2),  # parameters sharded too: both ranks of the group gather each layer in lockstep
    ("sft", "ntp/nll", "zero2", 4),  # two data-parallel groups of two: each group its own micro-batches
])
def test_sequence_parallel_run_equals_one_process_with_the_same_global_batch(tmp_path, recipe, metric, config,
                                                                             processes):
    """The processes of a group (SP=2) hold the same micro-batches and each runs half their positions: each step's
    loss and metrics, the evaluations and the exported weights equal a one-process run's. Tolerance 1e-5 as for DDP
    vs one process (tests/test_distributed.py): the sharded forward computes the same products; only the order of
    float sums in the gradient all-reduce differs."""
    overrides = [f"recipe={recipe}", f"reference.cache_dir={tmp_path / 'cache'}"]
    _run(tmp_path / "one", *overrides)
    _run(tmp_path / "sp", *overrides, sequence_parallel=2, config=config, processes=processes)
    one, sp = _records(tmp_path / "one"), _records(tmp_path / "sp")
    assert sorted(one) == sorted(sp) and (4, "train") in one
    for key, record in one.items():
        assert sp[key]["loss"] == pytest.approx(record["loss"], abs=1e-5), key
        if key[1] == "train":
            assert sp[key][metric] == pytest.approx(record[metric], abs=1e-5), key
            assert sp[key]["grad_norm"] == pytest.approx(record["grad_norm"], abs=1e-5), key
    assert one[(4, "train")]["loss"] < one[(1, "train")]["loss"]  # it trained: the comparison is not of initial weights
    mine, theirs = _exported(tmp_path / "sp"), _exported(tmp_path / "one")
    assert mine.keys() == theirs.keys()
    for name, weight in theirs.items():
        torch.testing.assert_close(mine[name], weight, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_a_sequence_parallel_run_resumes_from_its_checkpoint_to_the_same_losses(tmp_path):
    """Restart an SP=2 ZeRO-2 run from its step-2 checkpoint: steps 3 and 4 give the uninterrupted run's losses."""
    _run(tmp_path / "whole", "train.save_every=2", sequence_parallel=2)
    _run(tmp_path / "resumed", "train.save_every=2", f"resume={tmp_path / 'whole' / 'checkpoints' / 'step_0000002'}",
         sequence_parallel=2)
    whole, resumed = _records(tmp_path / "whole"), _records(tmp_path / "resumed")
    assert sorted(step for step, split in resumed if split == "train") == [3, 4]
    for step in (3, 4):
        assert resumed[(step, "train")]["loss"] == pytest.approx(whole[(step, "train")]["loss"], abs=1e-5), step
