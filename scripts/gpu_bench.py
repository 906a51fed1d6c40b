"""GPU check: bf16 SFT and DPO steps of tunelab's attention paths and of TRL on the same examples, as a markdown table.

    python scripts/gpu_bench.py --device cuda --out gpu_check.md         # scripts/gpu_check.sh runs this
    python scripts/gpu_bench.py --device cpu --quick --out /tmp/check.md  # tiny shapes (tests/test_gpu_bench.py)

Per model shape (random init, built in code: a SmolLM2-135M-shaped and a ~1B Llama-3.2-1B-shaped Llama), task (SFT:
packed documents, completion-only NLL; DPO: sigmoid loss, beta 0.1, a live reference of another initialisation) and row
length, every path trains the same seeded examples from the same initial weights, fp32 master weights under bf16
autocast (CUDA) with AdamW:

- ``tiled_sdpa``, ``flex``, ``flash_attention_2`` (when flash_attn imports): tunelab's forward (trainers/forward.py)
  over one packed row of the examples; DPO pairs share their prompt, except under FlashAttention, which takes each
  response as its own document (trainers/flash_varlen.py), so it processes the prompt twice.
- ``trl`` and ``trl+liger`` (when trl, resp. liger_kernel, import): TRL's SFTTrainer (padding-free) and DPOTrainer
  ``compute_loss`` on TRL's own collation of the same tokenized examples (its training step without its data
  loader); ``trl+liger`` sets ``use_liger_kernel=True``, which patches the model with Liger's kernels (last, since
  the patch cannot be undone).

Columns: tokens/s counts the examples' tokens once (a shared prompt once); MFU = required FLOPs / step time / the
GPU's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; ``--peak-tflops`` overrides; none on CPU), where the
required FLOPs of a step are 6 N T + 6 d V T_lab + 12 n_layers d P for training, plus a third of that for the
DPO reference forward (N: parameters outside the embedding and LM head, T: tokens, T_lab: labelled tokens, d:
hidden size, V: vocabulary, P: (query, key) pairs the layout lets attend, causal within a document, a response
over its prompt and itself); the same work is charged to every path, so MFU compares useful work. "step GB" is
the peak CUDA memory of the path's steps less what was allocated before them (the models the harness holds), i.e.
gradients, optimizer state, activations and workspace. "loss" is the path's first-step loss (same weights for all),
"vs fp32" its relative difference from the fp32 tiled_sdpa forward of the same examples.

A path that fails (OOM, a missing kernel) gets a row saying so and the run goes on; ``--budget-s`` skips what is
left once the time is spent, so the whole check fits its window.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (hidden, layers, heads, kv heads, intermediate, vocabulary): SmolLM2-135M's and Llama-3.2-1B's config.json shapes
SHAPES = {
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "llama-1b": (2048, 16, 32, 8, 8192, 128256),
    "tiny": (64, 2, 4, 2, 128, 512),
}
# dense bf16 peak FLOP/s by device name (NVIDIA datasheets: H100 SXM 989.4 TFLOPS, H200 the same, H100 PCIe 756,
# A100 312); the first name found in torch.cuda.get_device_name() wins
PEAKS = (("H200", 989.4e12), ("H100 PCIe", 756e12), ("H100", 989.4e12), ("A100", 312e12))
BETA = 0.1  # DPO's beta (Rafailov et al. 2023, the TRL default)
LR = 1e-5
COLUMNS = ("model", "task", "L", "path", "tokens/s", "MFU", "step GB", "loss", "vs fp32", "note")


@dataclass
class Setting:
    model: str
    task: str
    length: int


# ---- examples and required work --------------------------------------------------------------------------------
def make_examples(task: str, length: int, seed: int, vocab: int, quick: bool) -> list[dict]:
    """Tokenized examples that together fill one row of ``length`` tokens (a shared prompt counted once), with
    log-uniform document lengths: SFT conversations of 128-2048 tokens, a quarter to a half of them prompt; DPO
    prompts of 64-1024 and responses of 64-1024 tokens (``quick``: sixteen times shorter)."""
    rng = random.Random(seed)
    scale = 16 if quick else 1

    def span(lo: int, hi: int) -> int:
        return max(2, int(math.exp(rng.uniform(math.log(lo // scale), math.log(hi // scale)))))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    examples, used = [], 0
    while True:
        if task == "sft":
            n = span(128, 2048)
            p = max(1, int(n * rng.uniform(0.25, 0.5)))
            example, size = {"input_ids": tokens(n), "target_mask": [0] * p + [1] * (n - p)}, n
        else:
            p, c, r = span(64, 1024), span(64, 1024), span(64, 1024)
            example, size = {"prompt_ids": tokens(p), "chosen_ids": tokens(c), "rejected_ids": tokens(r)}, p + c + r
        if used + size > length:
            return examples or [example]
        examples.append(example)
        used += size


def required_flops(examples: list[dict], dims: dict, task: str) -> dict:
    """The FLOPs a training step on ``examples`` requires (see the module docstring) and its token counts."""
    tokens = labelled = pairs = 0
    for ex in examples:
        if "input_ids" in ex:
            n, lab = len(ex["input_ids"]), sum(ex["target_mask"][1:])
            tokens, labelled, pairs = tokens + n, labelled + lab, pairs + n * (n + 1) // 2
        else:
            p, responses = len(ex["prompt_ids"]), (len(ex["chosen_ids"]), len(ex["rejected_ids"]))
            tokens += p + sum(responses)
            labelled += sum(responses)
            pairs += p * (p + 1) // 2 + sum(r * p + r * (r + 1) // 2 for r in responses)
    train = 6 * dims["body"] * tokens + 6 * dims["d"] * dims["V"] * labelled + 12 * dims["layers"] * dims["d"] * pairs
    total = train + (train // 3 if task == "dpo" else 0)  # the reference's forward: a third of forward + backward
    return {"tokens": tokens, "labelled": labelled, "pairs": pairs, "flops": total}


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return None if not peak else flops / seconds / peak


def device_peak(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAKS if key in name), None)


# ---- models ----------------------------------------------------------------------------------------------------
def build(shape: str, device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import tunelab.trainers.attention  # noqa: F401  (registers tiled_sdpa and flex)

    d, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=32768,
                         tie_word_embeddings=True, attn_implementation="tiled_sdpa", pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    embed = model.get_input_embeddings().weight.numel()
    dims = {"d": d, "V": vocab, "layers": layers, "body": sum(p.numel() for p in model.parameters()) - embed}
    return model, dims


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- tunelab's paths -------------------------------------------------------------------------------------------
def our_loss(model, reference, examples: list[dict], task: str, attention: str, device: str) -> torch.Tensor:
    from tunelab.data.collate import Collator
    from tunelab.data.contract import Needs
    from tunelab.trainers.forward import CausalLMWithLogProbs

    length = sum(len(v) for ex in examples for k, v in ex.items() if k.endswith("ids"))
    shared = attention != "flash_attention_2"
    batch = Collator("sft" if task == "sft" else "pairs", packing=True, shared_prompt=shared,
                     row_length=length)(examples).to(device)
    for m in (model, reference):
        m.config._attn_implementation = attention
    out = CausalLMWithLogProbs(model, chunk_size=1024)(batch, Needs())
    if task == "sft":
        return -out.token_logps.sum() / out.token_logps.numel()
    with torch.no_grad():
        ref = CausalLMWithLogProbs(reference, chunk_size=1024)(batch, Needs()).seq_logps
    margin = (out.seq_logps[batch.chosen] - ref[batch.chosen]) - (out.seq_logps[batch.rejected] - ref[batch.rejected])
    return -F.logsigmoid(BETA * margin).mean()


def our_step_fn(model, reference, task: str, attention: str, device: str):
    def step(examples):
        with autocast(device):
            loss = our_loss(model, reference, examples, task, attention, device)
        loss.backward()
        return loss.detach()
    return step


# ---- TRL's paths -----------------------------------------------------------------------------------------------
def trl_step_fn(model, reference, task: str, device: str, liger: bool, tmp: str):
    """TRL's loss and backward on TRL's collation of the examples (its trainer's compute_loss, its data collator)."""
    import datasets
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from tunelab.trainers.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # pad/eos ids only: the examples arrive tokenized
    common = dict(output_dir=tmp, report_to="none", bf16=device == "cuda", use_cpu=device != "cuda",
                  per_device_train_batch_size=1, use_liger_kernel=liger, max_length=None, disable_tqdm=True)
    model.config._attn_implementation = "flash_attention_2" if _flash_available() else "sdpa"
    if task == "sft":
        dataset = datasets.Dataset.from_list([{"input_ids": [3, 4, 5], "completion_mask": [0, 1, 1]}])
        trainer = SFTTrainer(model=model, args=SFTConfig(padding_free=True, completion_only_loss=True, **common),
                             train_dataset=dataset, processing_class=tokenizer)

        def collate(examples):
            return trainer.data_collator([{"input_ids": ex["input_ids"], "labels": [
                token if target else -100 for token, target in zip(ex["input_ids"], ex["target_mask"])]}
                for ex in examples])
    else:
        reference.config._attn_implementation = model.config._attn_implementation
        dataset = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        trainer = DPOTrainer(model=model, ref_model=reference,
                             args=DPOConfig(beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                                            **common),
                             train_dataset=dataset, processing_class=tokenizer)
        collate = trainer.data_collator

    def step(examples):
        inputs = trainer._prepare_inputs(collate(examples))
        with autocast(device):
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        return loss.detach()
    return step


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def paths(device: str, only: list[str] | None) -> list[tuple[str, str | None]]:
    """(path, why it is skipped or None), in run order; trl+liger last (its patch stays on the model). Only the
    chosen paths are probed (importing trl takes seconds)."""
    cuda = device == "cuda"
    probes = {
        "tiled_sdpa": lambda: None,
        "flex": lambda: None if cuda else "no flex attention backward on CPU (torch 2.13)",
        "flash_attention_2": lambda: None if _flash_available() else "flash_attn not installed",
        "trl": lambda: None if _importable("trl") else "trl not installed",
        "trl+liger": lambda: None if cuda and _importable("trl") and _importable("liger_kernel")
        else "liger_kernel needs CUDA, and trl and liger-kernel installed",
    }
    return [(name, probe()) for name, probe in probes.items() if not only or name in only]


# ---- running ---------------------------------------------------------------------------------------------------
def measure(step, batches: list[list[dict]], params, warmup: int, device: str) -> dict:
    optimizer = torch.optim.AdamW(params, lr=LR)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    losses, seconds = [], 0.0
    for i, examples in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        loss = step(examples)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= warmup:
            seconds += time.perf_counter() - start
        losses.append(float(loss))
    peak = (torch.cuda.max_memory_allocated() - resident) / 2 ** 30 if device == "cuda" else None
    return {"losses": losses, "seconds": seconds, "peak_gb": peak}


def fp32_loss(model, reference, examples, task: str, device: str) -> float:
    with torch.no_grad():
        return float(our_loss(model, reference, examples, task, "tiled_sdpa", device))


def row(setting: Setting, path: str, **fields) -> dict:
    return {"model": setting.model, "task": setting.task, "L": setting.length, "path": path, **fields}


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = [r["model"], r["task"], str(r["L"]), r["path"], fmt(r.get("tokens_per_s"), ".0f"),
                 fmt(r.get("mfu"), ".1%"), fmt(r.get("peak_gb"), ".2f"), fmt(r.get("loss"), ".4f"),
                 fmt(r.get("loss_vs_fp32"), ".1e"), r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_shape(args, shape: str, todo: list[tuple[str, str | None]], exact: dict, start: float, emit) -> list[dict]:
    """Rows of the ``todo`` paths on every setting of one model shape; fills ``exact`` (fp32 losses) when empty.
    TRL's paths train a copy, since TRL's trainers patch the model they get (a fused LM head, Liger's modules).
    ``emit(row)`` receives each row as it is made."""
    device, peak = args.device, device_peak(args.device, args.peak_tflops)
    model, dims = build(shape, device, args.seed)
    # another initialisation: with the policy's own, the first DPO loss would be log 2 on every path whatever the
    # precision, and the comparison with fp32 would say nothing
    reference = build(shape, device, args.seed + 1)[0].eval().requires_grad_(False)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    settings = [Setting(shape, t, n) for t in args.tasks for n in args.lengths]
    data = {(s.task, s.length): [make_examples(s.task, s.length, args.seed + i, dims["V"], args.quick)
                                 for i in range(args.warmup + args.steps)] for s in settings}
    for s in settings:  # fp32, no autocast: the loss every path's first step is compared with
        if (shape, s.task, s.length) not in exact:
            exact[shape, s.task, s.length] = fp32_loss(model, reference, data[s.task, s.length][0], s.task, device)
    rows = []

    def add(made: dict) -> None:
        rows.append(made)
        emit(made)

    for path, why in todo:
        for s in settings:
            if why:
                add(row(s, path, note=f"skipped: {why}"))
                continue
            if time.perf_counter() - start > args.budget_s:
                add(row(s, path, note="skipped: time budget spent"))
                continue
            model.load_state_dict(initial)
            batches = data[s.task, s.length]
            trained, step = model, None
            try:
                if path.startswith("trl"):
                    trained = copy.deepcopy(model)
                    step = trl_step_fn(trained, copy.deepcopy(reference), s.task, device, path == "trl+liger",
                                       tempfile.mkdtemp(prefix="gpu_bench_trl_"))
                else:
                    step = our_step_fn(model, reference, s.task, path, device)
                trained.train()
                result = measure(step, batches, trained.parameters(), args.warmup, device)
            except Exception as err:  # noqa: BLE001  (a failing path is a row of the report, not the end)
                add(row(s, path, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:90]}"))
                result = None
            del trained, step
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            if result is None:
                continue
            work = [required_flops(ex, dims, s.task) for ex in batches[args.warmup:]]
            flops, tokens = sum(w["flops"] for w in work), sum(w["tokens"] for w in work)
            loss, ref = result["losses"][0], exact[shape, s.task, s.length]
            add(row(s, path, tokens_per_s=tokens / result["seconds"], mfu=mfu(flops, result["seconds"], peak),
                    peak_gb=result["peak_gb"], loss=loss, loss_vs_fp32=abs(loss - ref) / abs(ref), note=""))
    return rows


def run(args, emit=lambda made: None) -> list[dict]:
    """Every path on every setting; Liger's path last of all, because liger-kernel also patches transformers' Llama
    classes for the whole process (a model built after it would run Liger's kernels)."""
    start, exact = time.perf_counter(), {}
    todo = paths(args.device, args.paths)
    first = [p for p in todo if p[0] != "trl+liger"]
    last = [p for p in todo if p[0] == "trl+liger"]
    rows = [r for shape in args.models for r in run_shape(args, shape, first, exact, start, emit)]
    if last:
        rows += [r for shape in args.models for r in run_shape(args, shape, last, exact, start, emit)]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model, short rows: a smoke test (CPU: seconds)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=None)
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=["sft", "dpo"])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--paths", type=lambda s: s.split(","), default=None, help="a subset of the paths")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip what is left after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    parser.add_argument("--out", default="gpu_check.md")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ["tiny"] if args.quick else ["smollm2-135m", "llama-1b"]
    if args.lengths is None:
        args.lengths = [256] if args.quick else [4096, 16384]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --quick for the smoke test)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = (f"GPU check on {name}, torch {torch.__version__}: bf16 autocast over fp32 master weights, "
              f"{args.warmup} warm-up + {args.steps} measured steps per path")
    done = []

    def write(made: dict) -> None:  # the table so far, rewritten after every row: a run cut short keeps its rows
        done.append(made)
        with open(args.out, "w") as handle:
            handle.write(markdown(done, header))
        print(markdown([made], "").splitlines()[-1], flush=True)

    run(args, write)
    print(markdown(done, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
