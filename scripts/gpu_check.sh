#!/usr/bin/env bash
# The GPU check of issue 17 in one command, for a single H100/H200 in under 8 minutes (docs/benchmarks.md, "GPU check"):
#   bash scripts/gpu_check.sh [table.md]
# 1. installs what the check needs and the machine lacks (flash-attn as a prebuilt wheel only, liger-kernel, trl 1.16),
#    each guarded by a time limit: whatever fails to install is left out and its rows say so;
# 2. runs the CUDA-only tests (flex attention's gradients against dense SDPA);
# 3. runs scripts/gpu_bench.py: bf16 SFT and DPO of a SmolLM2-135M-shaped and a ~1B Llama-shaped random-init model at
#    4k and 16k-token rows through tiled_sdpa, flex and FlashAttention, and TRL (with and without Liger) on the same
#    examples, writing the markdown table to the given file (default gpu_check.md) and to stdout.
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.md}"
START=$(date +%s)

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device; on CPU run: python scripts/gpu_bench.py --device cpu --quick" >&2
    exit 1
fi
python -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"

# --no-deps: none of these may replace the installed torch / transformers; a source build of flash-attn takes
# far longer than this check's window, so only a prebuilt wheel is accepted
try_install() {
    local module="$1"; shift
    if python -c "import $module" 2>/dev/null; then
        echo "gpu_check: $module already installed"
    elif timeout 60 pip install -q --no-deps "$@"; then
        echo "gpu_check: installed $*"
    else
        echo "gpu_check: could not install $* (continuing without it)"
    fi
}
try_install flash_attn --only-binary=:all: flash-attn
try_install liger_kernel liger-kernel
try_install trl trl==1.16.0

timeout 120 python -m pytest tests/test_attention.py -q -p no:cacheprovider -k cuda \
    || echo "gpu_check: the CUDA attention tests failed (see above)"

# what is left of the 8 minutes, less a margin for writing the table, bounds the benchmark
BUDGET=$(( 450 - ($(date +%s) - START) ))
[ "$BUDGET" -lt 90 ] && BUDGET=90
timeout $(( BUDGET + 60 )) python scripts/gpu_bench.py --device cuda --out "$OUT" --budget-s "$BUDGET"
echo "gpu_check: table written to $OUT after $(( $(date +%s) - START )) s"
