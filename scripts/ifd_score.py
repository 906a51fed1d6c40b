#!/usr/bin/env python3
"""IFD scores of a training run's data (Cherry LLM, Li et al. 2024; docs/methods.md, IFD), for the ifd_select stage.

    python scripts/ifd_score.py --output runs/ifd/ifd_scores.json [--checkpoint <run>/checkpoints/step_N]
        [--batch-size N] [--force] [<key>=<value> ...]

Positional ``key=value`` arguments compose the run config exactly as train.py does (``recipe=sft_ifd``,
``data.sources.0.num_rows=400``, ``model=...``): pass the same ones as the training run that will read the scores,
so the scored dataset is the one its ``ifd_select`` stage sees (the stage itself and anything after it are left out
while scoring). The model is the config's, with its initial weights or those of ``--checkpoint`` (the paper scores
with a model briefly trained on a small sample first). The file maps the tokenized dataset's fingerprint to its
scores; scoring the same data with the same model again reads it unless ``--force``.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the scores file (ifd_scores.json) the stage reads")
    p.add_argument("--checkpoint", help="a run checkpoint directory to score with instead of the initial weights")
    p.add_argument("--batch-size", type=int, help="scoring batch size (default: train.eval_batch_size)")
    p.add_argument("--force", action="store_true", help="score again even if the file has this scorer's scores")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="the run's config overrides")
    return p


def main(argv: list[str]) -> str:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tunelab.trainers.config_schema import compose_config
    from tunelab.trainers.ifd_scores import score_config

    return score_config(compose_config(args.overrides), args.output, checkpoint=args.checkpoint,
                        batch_size=args.batch_size, force=args.force)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
