#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA-provider tests, then CPU and CUDA execution
# providers side by side (direct ONNX Runtime and the server), in well under 8 minutes.
#   scripts/gpu_check.sh OUTPUT_DIR
# Needs the project installed (make install, or .venv carried to the machine).
set -euo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTPUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"; } \
  > "$out/gpu.txt" 2>&1
"$py" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" >> "$out/gpu.txt"
# CUDA-provider tests (skipped where no GPU): the provider, export validation on CUDA, IO binding.
timeout 240 "$py" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests.log"
timeout 240 "$py" benchmarks/provider_bench.py --out "$out/providers.md" 2>&1 | tee "$out/providers.log"
echo "report: $out/providers.md"
