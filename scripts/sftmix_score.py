#!/usr/bin/env python3
"""SFTMix stage 1: confidence of every training example under the checkpoints of a finished NTP run.

    python scripts/sftmix_score.py run_dir=runs/sftmix/reference [checkpoints=all|last_K|[20,40]|step_0000020,...]
        [output=<file>] [batch_size=N] [force=true] [<key>=<value> ...]

``run_dir`` is a tunelab run directory (``config.yaml`` + ``checkpoints/step_*``). The model, data, tokenizer and
seed come from its ``config.yaml``; any other ``key=value`` overrides it (e.g. ``data.sources.0.num_rows=400``).
Writes ``<run_dir>/sftmix_confidence.json`` (or ``output``), keyed by the content fingerprint of the tokenized
train dataset; checkpoints already scored with the same weights are reused unless ``force=true``.
Multi-GPU: ``accelerate launch scripts/sftmix_score.py run_dir=...`` splits the examples over the ranks.
"""

from __future__ import annotations

import logging
import sys

OWN_KEYS = ("run_dir", "checkpoints", "output", "batch_size", "force")


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    options, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value, got {arg!r}\n\n{__doc__}")
        if key in OWN_KEYS:
            options[key] = value
        else:
            overrides.append(arg)
    if "run_dir" not in options:
        raise SystemExit(f"run_dir=<reference run directory> is required\n\n{__doc__}")
    return options, overrides


def main(argv: list[str]) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options, overrides = parse(argv)
    from tunelab.trainers.sftmix_scores import score_run

    return score_run(
        options["run_dir"],
        checkpoints=options.get("checkpoints", "all"),
        overrides=overrides,
        output=options.get("output") or None,
        batch_size=int(options["batch_size"]) if options.get("batch_size") else None,
        force=options.get("force", "false").lower() in ("1", "true", "yes"),
    )


if __name__ == "__main__":
    print(main(sys.argv[1:]))
