#!/usr/bin/env bash
# Prepared CUDA run of benchmarks/run.py (reference: one NVIDIA H200, Python 3.12, torch
# preinstalled, no network). From the repository root:
#
#     bash benchmarks/gpu.sh      # through the device tool: run(command=..., timeout_s=600)
#
# Runs in ~4-6 minutes (each run.py call has its own timeout; 540 s at most in all):
#   1. environment: GPU, driver, torch, and that the package imports;
#   2. run.py --device cuda, eager: matmul peak, prior forward (small / ffhq256 / ffhq1024,
#      batch 1 and 16, bf16 weights + bf16 autocast + fp32; SDPA kernels listed: flash for the
#      self-attention in bf16), hourglass vs flat, sampler overhead / CFG / early stop, host
#      syncs per step (torch.cuda.set_sync_debug_mode) and what one forced sync per step costs,
#      VQ-GAN decode 256^2 and 1024^2, s per 1024^2 image (target <= 0.3 s at batch 1);
#   3. run.py again with torch.compile on ffhq1024 (bf16 weights), its own subsection.
# Both write benchmarks/RESULTS.md (section "End-to-end performance (run.py)"); logs, JSON and
# that file are copied to $OUT (or out/gpu/, git-ignored, when OUT is unset). Tables print last.
# Optional: COMPILE_MODE=reduce-overhead (CUDA graphs) for step 3; PYTHON=python3.12.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${OUT:-$repo/out/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
compile_mode=${COMPILE_MODE:-default}
export PYTHONUNBUFFERED=1

# The repository root *is* the package comfyui_sundae: expose it under that name without
# installing anything (no network there).
pkg=$(mktemp -d)
ln -s "$repo" "$pkg/comfyui_sundae"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv || echo "nvidia-smi failed"
  "$py" - <<'EOF'
import sys

import torch

import comfyui_sundae.sundae_lib as lib

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("flash sdp enabled", torch.backends.cuda.flash_sdp_enabled(), "package", lib.__file__)
EOF
} 2>&1 | tee "$out/env.txt"

status=0
echo "== eager run ==" >&2
timeout 300 "$py" benchmarks/run.py --device cuda --batches 1,16 --write-results \
  --json "$out/run-eager.json" 2>&1 | tee "$out/run-eager.log" || status=$?

echo "== torch.compile run (mode $compile_mode) ==" >&2
timeout 240 "$py" benchmarks/run.py --device cuda --batches 1,16 --presets ffhq1024 \
  --precisions bf16-weights --sections forward,sampler,decode --compile ffhq1024 \
  --compile-mode "$compile_mode" --tag "torch.compile $compile_mode" --write-results \
  --json "$out/run-compile.json" 2>&1 | tee "$out/run-compile.log" || status=$?

cp benchmarks/RESULTS.md "$out/RESULTS.md"
rm -rf "$pkg"

echo
echo "================ summary (benchmarks/RESULTS.md, CUDA subsections) ================"
awk '/^## / {on=0} /^### / {on=($0 ~ /^### CUDA/)} on' benchmarks/RESULTS.md
echo "exit status of the runs: $status (124 = a run hit its timeout; see $out/*.log)"
exit "$status"
