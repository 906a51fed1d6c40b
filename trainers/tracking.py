"""Everything a person watches during a run: the progress bar (throughput, ETA), a log line per logging
step, ``metrics.jsonl`` in the run directory, optional wandb / TensorBoard (offline-safe), and a PNG of the
loss curves at the end. Only the main process writes. A resumed run first drops the rows it will log again.
TensorBoard and wandb keep their own history: on resume they receive the re-run steps a second time."""

from __future__ import annotations

import json
import logging
import os
import time

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
    def __init__(self, accelerator, output_dir: str, total_steps: int, start_step: int, train_cfg, config: dict):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if self.main:
            drop_rows_after(self.path, start_step)
        self.trackers = list(train_cfg.trackers or [])
        if self.trackers:
            accelerator.init_trackers(
                train_cfg.project, config=flatten(config),
                init_kwargs={"wandb": {"dir": output_dir, "name": os.path.basename(output_dir)}},
            )
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (self.main and train_cfg.progress_bar),
                        dynamic_ncols=True, desc="train")
        self.tokens = 0
        self.window_start = time.perf_counter()

    def start_timer(self) -> None:
        self.tokens = 0
        self.window_start = time.perf_counter()

    def step(self, num_tokens: int, loss: float) -> None:
        self.tokens += num_tokens
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens / elapsed:,.0f}", refresh=False)
        self.bar.update(1)

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.window_start, 1e-9)

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

    def close(self, plot: bool, output_dir: str) -> None:
        self.bar.close()
        # not accelerator.end_training(): it also destroys the process group, which the export still needs
        for tracker in self.accelerator.trackers:
            tracker.finish()
        if self.main and plot and os.path.exists(self.path):
            plot_losses(self.path, os.path.join(output_dir, "loss_curves.png"))


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


def plot_losses(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    with open(metrics_path) as handle:
        for line in handle:
            rec = json.loads(line)
            if "loss" in rec:
                xs, ys = series.setdefault(rec["split"], ([], []))
                xs.append(rec["step"])
                ys.append(rec["loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, marker="o" if split == "eval" else None, markersize=3, label=split)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
