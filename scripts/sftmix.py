#!/usr/bin/env python3
"""The whole SFTMix chain in one command: reference NTP run -> confidence scores -> SFTMix training.

    python scripts/sftmix.py --out runs/sftmix_demo [--recipe sftmix] [--reference-recipe sftmix_reference]
        [--launcher "accelerate launch --config_file recipes/accelerate/ddp.yaml"] [--checkpoints all]
        [--ref <key>=<value> ...] [--mix <key>=<value> ...] [<key>=<value> ...]

Runs, each as its own process; a failed step stops the chain. Re-running continues where it stopped: both
training runs get ``resume=auto``, a reference run that has exported its model is not started again, and
checkpoints already scored with the same weights are not scored again.

1. ``<launcher> train.py recipe=<reference_recipe> output_dir=<out>/reference [shared + --ref overrides]``
2. ``<launcher> scripts/sftmix_score.py --run-dir <out>/reference --checkpoints <checkpoints>``
3. ``<launcher> train.py recipe=<recipe> sftmix.reference_run=<out>/reference output_dir=<out>/sftmix
   [shared + --mix overrides]``

Positional ``key=value`` overrides go to both training runs (keep data, model and seed identical, or the scores
will not match the SFTMix run's dataset); ``--ref key=value`` only to the reference run, ``--mix key=value`` only
to the SFTMix run (each may repeat). The default launcher is this Python interpreter.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for the two runs (<out>/reference, <out>/sftmix)")
    p.add_argument("--recipe", default="sftmix", help="recipe of the SFTMix run")
    p.add_argument("--reference-recipe", default="sftmix_reference", help="recipe of the reference run")
    p.add_argument("--launcher", help="command that runs each step (default: this Python interpreter)")
    p.add_argument("--checkpoints", default="all", help="reference checkpoints to score (see sftmix_score.py)")
    p.add_argument("--ref", action="append", default=[], metavar="key=value", help="override for the reference run")
    p.add_argument("--mix", action="append", default=[], metavar="key=value", help="override for the SFTMix run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override for both training runs")
    return p


def parse(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    options = vars(build_parser().parse_intermixed_args(argv))
    shared = options.pop("overrides")
    return options, shared + options.pop("ref"), shared + options.pop("mix")


def commands(options: dict, ref: list[str], mix: list[str]) -> list[tuple[str, list[str]]]:
    launcher = shlex.split(options.get("launcher") or shlex.quote(sys.executable))
    out = options["out"]
    ref_dir, mix_dir = os.path.join(out, "reference"), os.path.join(out, "sftmix")
    return [
        ("reference run", launcher + ["train.py", f"recipe={options['reference_recipe']}", f"output_dir={ref_dir}",
                                      "resume=auto", *ref]),
        ("confidence scores", launcher + [os.path.join("scripts", "sftmix_score.py"), "--run-dir", ref_dir,
                                          "--checkpoints", options["checkpoints"]]),
        ("SFTMix run", launcher + ["train.py", f"recipe={options['recipe']}", f"sftmix.reference_run={ref_dir}",
                                   f"output_dir={mix_dir}", "resume=auto", *mix]),
    ]


def main(argv: list[str]) -> int:
    options, ref, mix = parse(argv)
    ref_dir = os.path.join(options["out"], "reference")
    for name, command in commands(options, ref, mix):
        if name == "reference run" and os.path.isdir(os.path.join(ref_dir, "export")):
            print(f"== {name}: {ref_dir} is finished, reused", flush=True)
            continue
        print(f"== {name}: {shlex.join(command)}", flush=True)
        start = time.time()
        code = subprocess.call(command, cwd=ROOT)
        print(f"== {name}: exit {code} after {time.time() - start:.1f}s", flush=True)
        if code:
            return code
    print(f"== done: reference {ref_dir}, SFTMix {os.path.join(options['out'], 'sftmix')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
