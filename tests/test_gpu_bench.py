"""scripts/gpu_bench.py's CPU-runnable parts: the required-FLOPs and MFU arithmetic by hand, the examples it trains
on, and a quick CPU run's table (columns, skipped GPU-only paths, the loss agreement with the fp32 forward, TRL's
path computing the same objective on the same examples), so the GPU run is unlikely to fail on a bug."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "scripts", "gpu_bench.py"))
gpu_bench = importlib.util.module_from_spec(spec)
sys.modules["gpu_bench"] = gpu_bench  # its dataclass looks its module up by name
spec.loader.exec_module(gpu_bench)


def test_required_flops_and_mfu_by_hand():
    dims = {"body": 100, "d": 8, "V": 50, "layers": 2}
    sft = [{"input_ids": [5, 6, 7, 8], "target_mask": [0, 0, 1, 1]}]
    # 4 tokens, 2 labelled, 4 * 5 / 2 = 10 causal (query, key) pairs
    work = gpu_bench.required_flops(sft, dims, "sft")
    assert (work["tokens"], work["labelled"], work["pairs"]) == (4, 2, 10)
    assert work["flops"] == 6 * 100 * 4 + 6 * 8 * 50 * 2 + 12 * 2 * 8 * 10 == 9120
    # a pair: prompt 2, chosen 1, rejected 3; pairs: prompt 3, chosen 1 * 2 + 1, rejected 3 * 2 + 6
    dpo = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}]
    work = gpu_bench.required_flops(dpo, dims, "dpo")
    assert (work["tokens"], work["labelled"], work["pairs"]) == (6, 4, 18)
    train = 6 * 100 * 6 + 6 * 8 * 50 * 4 + 12 * 2 * 8 * 18
    assert work["flops"] == train + train // 3 == 22208  # plus the reference's forward
    assert gpu_bench.mfu(9120, 2.0, 1000.0) == pytest.approx(4.56)
    assert gpu_bench.mfu(9120, 2.0, None) is None


def test_examples_fill_one_row_and_repeat_with_the_seed():
    for task in ("sft", "dpo"):
        examples = gpu_bench.make_examples(task, 4096, seed=1, vocab=1000, quick=False)
        size = gpu_bench.required_flops(examples, {"body": 0, "d": 0, "V": 0, "layers": 0}, task)["tokens"]
        assert 2048 < size <= 4096 and len(examples) > 1
        assert examples == gpu_bench.make_examples(task, 4096, seed=1, vocab=1000, quick=False)
        assert all(3 <= t < 1000 for ex in examples for k, v in ex.items() if k.endswith("ids") for t in v)


def test_peak_is_read_from_the_device_name(monkeypatch):
    monkeypatch.setattr(gpu_bench.torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    assert gpu_bench.device_peak("cuda", None) == 989.4e12
    monkeypatch.setattr(gpu_bench.torch.cuda, "get_device_name", lambda: "NVIDIA H100 PCIe")
    assert gpu_bench.device_peak("cuda", None) == 756e12
    assert gpu_bench.device_peak("cpu", None) is None and gpu_bench.device_peak("cpu", 2.0) == 2e12


def quick_args(tmp_path, paths: str) -> list[str]:
    return ["--device", "cpu", "--quick", "--paths", paths, "--steps", "1", "--peak-tflops", "0.5",
            "--out", str(tmp_path / "check.md")]


def test_quick_cpu_run_writes_the_table_with_mfu_and_loss_agreement(tmp_path):
    assert gpu_bench.main(quick_args(tmp_path, "tiled_sdpa,flex")) == 0
    lines = (tmp_path / "check.md").read_text().splitlines()
    assert lines[2] == "| " + " | ".join(gpu_bench.COLUMNS) + " |"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]
    by_path = {(r[1], r[3]): dict(zip(gpu_bench.COLUMNS, r)) for r in rows}
    assert set(by_path) == {(t, p) for t in ("sft", "dpo") for p in ("tiled_sdpa", "flex")}
    for task in ("sft", "dpo"):
        measured = by_path[task, "tiled_sdpa"]
        assert float(measured["tokens/s"]) > 0 and measured["MFU"].endswith("%") and measured["note"] == ""
        assert float(measured["vs fp32"]) == 0.0  # CPU runs fp32: the first step's loss is the fp32 forward's
        assert "no flex attention backward on CPU" in by_path[task, "flex"]["note"]


def test_mfu_is_the_required_work_over_time_against_the_peak(tmp_path):
    args = argparse.Namespace(
        device="cpu", quick=True, models=["tiny"], tasks=["sft", "dpo"], lengths=[256], paths=["tiled_sdpa"],
        warmup=1, steps=1, seed=0, budget_s=600.0, peak_tflops=0.5, out=str(tmp_path / "x.md"))
    rows = gpu_bench.run(args)
    vocab = gpu_bench.SHAPES["tiny"][5]
    _, dims = gpu_bench.build("tiny", "cpu", 0)
    for r in rows:
        examples = gpu_bench.make_examples(r["task"], 256, 1, vocab, True)  # the measured step: seed + 1
        work = gpu_bench.required_flops(examples, dims, r["task"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * work["flops"] / work["tokens"] / 0.5e12, rel=1e-9)


@pytest.mark.slow
def test_trl_path_computes_the_same_objective_on_the_same_examples(tmp_path):
    """TRL's SFT and DPO losses on TRL's collation of the examples equal tunelab's fp32 losses (CPU: both fp32)."""
    pytest.importorskip("trl")
    assert gpu_bench.main(quick_args(tmp_path, "trl")) == 0
    lines = (tmp_path / "check.md").read_text().splitlines()[4:]
    rows = [dict(zip(gpu_bench.COLUMNS, [c.strip() for c in line.strip("|").split("|")])) for line in lines]
    assert {r["task"] for r in rows} == {"sft", "dpo"}
    for r in rows:
        assert r["note"] == "" and float(r["vs fp32"]) < 1e-5 and float(r["loss"]) > 0


def test_flash_path_trains_unshared_rows_to_the_fp32_loss(tmp_path, monkeypatch):
    """The FlashAttention path's DPO pairs go unshared, over more than one row; with test_attention's reference
    varlen function standing in for the kernel (CPU, fp32), its first losses equal the fp32 shared-prompt forward."""
    import transformers.modeling_flash_attention_utils as fa
    from test_attention import reference_varlen

    process = fa._lazy_define_process_function(reference_varlen)
    monkeypatch.setattr(fa, "lazy_import_flash_attention",
                        lambda *a, **k: ((None, reference_varlen, None, None, None), (process, dict)))
    monkeypatch.setattr(gpu_bench, "_flash_available", lambda: True)
    args = argparse.Namespace(
        device="cpu", quick=True, models=["tiny"], tasks=["sft", "dpo"], lengths=[256], paths=["flash_attention_2"],
        warmup=1, steps=1, seed=0, budget_s=600.0, peak_tflops=None, out=str(tmp_path / "x.md"))
    rows = gpu_bench.run(args)
    assert [r["task"] for r in rows] == ["sft", "dpo"]
    for r in rows:
        assert r["note"] == "" and r["loss_vs_fp32"] < 1e-5 and r["tokens_per_s"] > 0
