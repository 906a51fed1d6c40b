# tunelab GPU image: CUDA 12.8 devel + Python 3.11 + torch (cu128) + DeepSpeed with prebuilt ops.
#
#   docker build -t tunelab:latest .
#   docker run --gpus all --ipc=host --rm -v "$PWD/runs:/workspace/runs" tunelab:latest \
#       accelerate launch --config_file recipes/accelerate/zero2.yaml train.py recipe=sft
#
# On Slurm clusters convert it (e.g. `enroot import dockerd://tunelab:latest`) and point
# scripts/slurm_submit.py --setup at the container runtime. See docs/distributed.md.
# Linted with hadolint; not built in this repository's CI (no Docker engine there).

FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG DEEPSPEED_VERSION=0.19.8
# GPU architectures the DeepSpeed ops are compiled for (no GPU is visible during `docker build`):
# 8.0 = A100, 8.6 = A10/RTX 30xx, 8.9 = L4/L40/RTX 40xx, 9.0 = H100/H200
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10); build tools for DeepSpeed's ops.
# apt packages are not version-pinned: the PPA and Ubuntu drop old versions (the base tag is pinned).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" "python${PYTHON_VERSION}-venv" \
      build-essential ninja-build git curl ca-certificates libaio-dev openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && "python${PYTHON_VERSION}" -m venv "$VIRTUAL_ENV" \
 && pip install --upgrade pip==25.2 setuptools==80.9.0 wheel==0.45.1

# torch built for this CUDA, from the PyTorch index (pinned).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# DeepSpeed after torch, against that torch (no build isolation), with the two ops our configs use
# prebuilt: FusedAdam (ZeRO on GPU) and CPUAdam (zero3_offload). Other ops still JIT-compile on demand.
RUN TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 \
    pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && ds_report | tail -n 30

WORKDIR /workspace

# The project itself, editable, so a mounted checkout over /workspace is picked up as-is.
COPY . /workspace
RUN pip install -e . \
 && python -c "import torch, accelerate, deepspeed, hydra; print(torch.__version__, torch.version.cuda)"

CMD ["accelerate", "launch", "train.py"]
