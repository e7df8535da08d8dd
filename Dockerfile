# The CUDA image, the GPU baseline side of every comparison: the same structure as Dockerfile.npu with CUDA in
# place of CANN — torch, SGLang, Megatron-core, Ray and agentbench-npu with its plugins, all pinned, patches under
# docker/patches applied and checked at build time.
#   docker build -t agentbench-npu:cuda .
#   docker run --rm --gpus all agentbench-npu:cuda                        # doctor: the stack and the GPUs
#   docker run --rm --gpus all agentbench-npu:cuda doctor --smoke --device cuda
# What each pin is for: docker/README.md.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.8.0
ARG SGLANG_VERSION=0.5.5
ARG MEGATRON_CORE_VERSION=0.12.1
ARG RAY_VERSION=2.49.2

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python and `patch`; the versions are the base image's Ubuntu release's.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv git patch ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# torch built for CUDA 12.8, then SGLang (which pins its own kernels against that torch)
RUN python3 -m pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cu128 \
    && python3 -m pip install "sglang[all]==${SGLANG_VERSION}"

RUN python3 -m pip install "megatron-core==${MEGATRON_CORE_VERSION}" "ray[default]==${RAY_VERSION}"

# agentbench-npu and its plugins, then the patches (none at present: docker/patches/README.md)
COPY . /opt/agentbench-npu
WORKDIR /opt/agentbench-npu
RUN python3 -m pip install -e ".[sglang,megatron,ray,docker]" -e plugins/retool -e plugins/search_r1 \
        -e plugins/tau_bench \
    && docker/apply-patches.sh docker/patches

ENV CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    AGENTBENCH_NPU_CACHE=/cache

WORKDIR /work
ENTRYPOINT ["/opt/agentbench-npu/docker/entrypoint.sh"]
CMD ["doctor", "--device", "cuda", "--require", "sglang", "--require", "megatron", "--require", "ray"]
