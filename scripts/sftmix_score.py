#!/usr/bin/env python3
"""SFTMix stage 1: confidence of every training example under the checkpoints of a finished NTP run.

    python scripts/sftmix_score.py --run-dir runs/sftmix/reference [--checkpoints all|last_K|[20,40]|step_0000020,...]
        [--output <file>] [--batch-size N] [--force] [<key>=<value> ...]

``--run-dir`` is a tunelab run directory (``config.yaml`` + ``checkpoints/step_*``). The model, data, tokenizer
and seed come from its ``config.yaml``; positional ``key=value`` arguments override it (e.g.
``data.sources.0.num_rows=400``). Writes ``<run_dir>/sftmix_confidence.json`` (or ``--output``), keyed by the
content fingerprint of the tokenized train dataset; checkpoints already scored with the same weights are reused
unless ``--force``. Multi-GPU: ``accelerate launch scripts/sftmix_score.py --run-dir ...`` splits the examples
over the ranks.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the finished reference (NTP) run")
    p.add_argument("--checkpoints", default="all", help="all | last_K | [20,40] | step_0000020,...")
    p.add_argument("--output", help="score file (default <run_dir>/sftmix_confidence.json)")
    p.add_argument("--batch-size", type=int, help="scoring batch size (default: the run's)")
    p.add_argument("--force", action="store_true", help="score again checkpoints already scored")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the run's config")
    return p


def main(argv: list[str]) -> str:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tunelab.trainers.sftmix_scores import score_run

    return score_run(
        args.run_dir, checkpoints=args.checkpoints, overrides=args.overrides, output=args.output,
        batch_size=args.batch_size, force=args.force,
    )


if __name__ == "__main__":
    print(main(sys.argv[1:]))
