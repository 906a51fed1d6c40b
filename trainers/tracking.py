"""Everything a person watches during a run: the progress bar (throughput, ETA), a log line per logging
step, ``metrics.jsonl`` in the run directory, optional wandb / TensorBoard (offline-safe), a PNG with one panel
per metric family at the end, and the end-of-run summary. Only the main process writes. A resumed run first drops
the rows it will log again. TensorBoard and wandb keep their own history: on resume they receive the re-run steps a
second time.

A train row's ``loss`` is the objective the optimizer minimised, averaged over the steps since the previous row;
the terms it is made of keep their loss's prefix (``dpo/loss``, ``ntp/loss``), and the progress bar's
``step_loss`` is the latest step's alone. ``tokens_per_s`` counts the tokens of the steps since the previous row
over the time spent in those steps (evaluation and checkpoint writing excluded)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable

from tqdm.auto import tqdm

log = logging.getLogger("tunelab")
TRACKERS = ("wandb", "tensorboard")


def tracker_names(train_cfg) -> list[str]:
    names = list(train_cfg.trackers or [])
    for name in names:
        if name not in TRACKERS:
            raise KeyError(f"unknown tracker {name!r} in train.trackers; valid: {', '.join(TRACKERS)}")
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", train_cfg.wandb_mode)
    return names


class RunTracker:
    def __init__(self, accelerator, output_dir: str, total_steps: int, start_step: int, train_cfg, config: dict,
                 clock: Callable[[], float] = time.perf_counter):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.main = accelerator.is_main_process
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.samples_path = os.path.join(output_dir, "samples.jsonl")
        if self.main:
            drop_rows_after(self.path, start_step)
            drop_rows_after(self.samples_path, start_step)
        self.trackers = list(train_cfg.trackers or [])
        if self.trackers:
            accelerator.init_trackers(
                train_cfg.project, config=flatten(config),
                init_kwargs={"wandb": {"dir": output_dir, "name": os.path.basename(output_dir)}},
            )
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (self.main and train_cfg.progress_bar),
                        dynamic_ncols=True, desc="train")
        self.clock = clock
        self.tokens = 0  # tokens trained on by this process's run (since the resume, if it resumed)
        self.train_seconds = 0.0  # time spent inside training steps, evaluation and checkpointing excluded
        self.interval_tokens = 0
        self.interval_seconds = 0.0
        self.step_started: float | None = None

    def start_step(self) -> None:
        self.step_started = self.clock()

    def step(self, num_tokens: int, loss: float) -> None:
        """Record the step started by ``start_step``: its tokens (all ranks) and its objective."""
        seconds = self.clock() - self.step_started
        self.tokens += num_tokens
        self.train_seconds += seconds
        self.interval_tokens += num_tokens
        self.interval_seconds += seconds
        self.bar.set_postfix(step_loss=f"{loss:.4f}", tok_s=f"{num_tokens / max(seconds, 1e-9):,.0f}", refresh=False)
        self.bar.update(1)

    def interval_tokens_per_second(self) -> float:
        """Tokens per second of the steps since the previous call (the logging interval), then a new interval."""
        rate = self.interval_tokens / self.interval_seconds if self.interval_seconds > 0 else math.nan
        self.interval_tokens, self.interval_seconds = 0, 0.0
        return rate

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.main:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "split"))
        self.bar.write(f"[{split} step {step}] {shown}") if not self.bar.disable else log.info(
            "[%s step %d] %s", split, step, shown)
        if self.trackers:
            self.accelerator.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Answers generated for the fixed eval prompts at this step ({"prompt", "output"} each): one row per prompt in
        ``samples.jsonl``, a TensorBoard text entry and a wandb table. They stay out of metrics.jsonl, whose rows
        hold numbers only (the plot and the summary read every key as one)."""
        if not self.main or not samples:
            return
        with open(self.samples_path, "a") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": step, "prompt": sample["prompt"], "output": sample["output"]}) + "\n")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                text = "\n\n".join(f"**prompt:** {s['prompt']}\n\n**output:** {s['output']}" for s in samples)
                tracker.tracker.add_text("eval/samples", text, global_step=step)
            elif tracker.name == "wandb":
                rows = [[step, s["prompt"], s["output"]] for s in samples]
                tracker.log_table("eval/samples", columns=["step", "prompt", "output"], data=rows, step=step)

    def close(self, plot_title: str | None) -> str | None:
        """Finish the trackers and, given a title, plot metrics.jsonl; the PNG's path (None without a plot)."""
        self.bar.close()
        # not accelerator.end_training(): it also destroys the process group, which the export still needs
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if plot_title is None:
            return None
        png = os.path.join(self.output_dir, "loss_curves.png")
        if self.main and os.path.exists(self.path):
            plot_metrics(self.path, png, plot_title)
        return png


def drop_rows_after(metrics_path: str, start_step: int) -> None:
    """A run (re)starting at ``start_step`` logs every later row again, so rows after it (all rows when it starts
    from scratch, the step-0 evaluation included) go, so that no step appears twice. Rewritten atomically."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as handle:
        lines = [line for line in handle if line.strip()]
    kept = [line for line in lines if start_step > 0 and json.loads(line)["step"] <= start_step]
    if len(kept) == len(lines):
        return
    tmp = metrics_path + ".tmp"
    with open(tmp, "w") as handle:
        handle.writelines(kept)
    os.replace(tmp, metrics_path)
    log.info("metrics.jsonl: %d rows after step %d dropped (they are logged again)", len(lines) - len(kept), start_step)


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"a.b": scalar} (TensorBoard's hparams take scalars only)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def metric_family(name: str) -> str:
    """The panel a metric goes in: its prefix before the first "/" (rewards/margins -> rewards), else its name."""
    return name.split("/", 1)[0]


def read_records(metrics_path: str) -> list[dict]:
    with open(metrics_path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def metrics_figure(records: list[dict], title: str):
    """A matplotlib figure with one panel per metric family of ``records`` (metrics.jsonl rows), each metric of the
    family drawn per split (train as lines, eval as markers) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[tuple[str, str], tuple[list, list]]] = {}
    for rec in records:
        for name, value in rec.items():
            if name in ("step", "split"):
                continue
            xs, ys = series.setdefault(metric_family(name), {}).setdefault((name, rec["split"]), ([], []))
            xs.append(rec["step"])
            ys.append(value)
    families = sorted(series, key=lambda f: (f != "loss", f))  # the objective first
    columns = min(3, max(1, len(families)))
    rows = max(1, -(-len(families) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(families):]:
        fig.delaxes(ax)
    for ax, family in zip(axes.flat, families):
        for (name, split), (xs, ys) in sorted(series[family].items()):
            ax.plot(xs, ys, marker="o" if split == "eval" else None, markersize=3, label=f"{split} {name}")
        ax.set_title(family)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(metrics_path: str, png_path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = metrics_figure(read_records(metrics_path), title)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins")


def format_summary(summary: dict) -> str:
    """The end-of-run report: time, tokens, steps, the final train and eval figures (with the eval before training,
    when it ran) and where the outputs are."""
    wall, train_s = summary["wall_seconds"], summary["train_seconds"]
    rate = summary["tokens"] / train_s if train_s > 0 else math.nan
    lines = [f"run finished: {summary['steps']} steps ({summary['skipped_steps']} skipped) in {wall:.1f} s, "
             f"{train_s:.1f} s of them training; {summary['tokens']:,} tokens ({rate:,.0f} tokens/s while training)"]
    train = summary.get("train_last") or {}
    shown = [f"{k} {train[k]:.4f}" for k in SUMMARY_METRICS if k in train]
    if shown:
        lines.append("  final train: " + ", ".join(shown))
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    keys = [k for k in SUMMARY_METRICS if k in after]
    if keys:
        lines.append("  final eval: " + ", ".join(
            f"{k} {before[k]:.4f} -> {after[k]:.4f}" if k in before else f"{k} {after[k]:.4f}" for k in keys)
            + (" (before -> after training)" if before else ""))
    for label, key in (("metrics", "metrics_file"), ("checkpoint", "checkpoint"), ("export", "export"),
                       ("curves", "curves")):
        if summary.get(key):
            lines.append(f"  {label}: {summary[key]}")
    return "\n".join(lines)
