#!/usr/bin/env bash
# The tiny profile of `base` on a CUDA GPU against a CPU run of the same config, and their diff: the
# GPU-vs-CPU comparison the checklist's TQ items ask of an accelerator, at toy size. Needs a CUDA torch
# build and one GPU; a few minutes. Not part of the test suite (no GPU there): run it on a GPU host.
#   tests/device/cuda_vs_cpu.sh [OUT_DIR]     # default $OUT, else runs/device
# Writes OUT_DIR/doctor.json (what the host has, and a 1-step smoke run on CUDA), OUT_DIR/{cpu,cuda}/
# (report.json, report.md, report.html) and OUT_DIR/diff.{md,json}; OUT_DIR/cuda-megatron/ and
# diff-megatron.md (the Megatron trainer on the GPU against the torch one); exits with the cpu/cuda diff's
# status (0 within tolerance, 1 out, 2 error).
set -euo pipefail
out="${1:-${OUT:-runs/device}}"
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
agentbench-npu doctor --device cuda --smoke --json > "$out/doctor.json" || true
agentbench-npu run base --device cpu --out "$out/cpu" -q || true    # a failed gate is itself a finding
agentbench-npu run base --device cuda --out "$out/cuda" -q || true
# the Megatron trainer's kernels, which only here run unpatched (needs the megatron extra)
agentbench-npu run base --device cuda --trainer megatron --out "$out/cuda-megatron" -q || true
agentbench-npu diff "$out/cpu" "$out/cuda" --format json --out "$out/diff.json" >/dev/null || true
if [ -f "$out/cuda-megatron/report.json" ]; then
  agentbench-npu diff "$out/cuda" "$out/cuda-megatron" --format markdown --out "$out/diff-megatron.md" >/dev/null || true
fi
agentbench-npu diff "$out/cpu" "$out/cuda" --format markdown --out "$out/diff.md"
