#!/usr/bin/env bash
# The GPU check, on a host without a package index: one script, hard time limits, report files.
#   scripts/gpu_check.sh KIT OUT [--cpu]
# KIT: what scripts/gpu_kit.sh wrote (parts are verified and reassembled). OUT: gpu-report.md,
# check.log and the step logs. It installs the kit with `pip install --no-index --no-deps --target`
# into a private directory first on the path, then runs, each step under its own time limit:
#   1. the `gpu` tests that need no TensorFlow (tests/gpu: CUDA provider selected and matching the
#      CPU within the export tolerance, IO binding keeping state on the device, TensorRT's attempt);
#   2. ONNX Runtime called directly at batch 1/64/256/1024/4096 x 16 and 256 steps;
#   3. the real server (--device cuda, batching, --workers 1 and 4) at 256 and 1024 streams.
# --cpu runs the same steps on the CPU provider with a small grid: how the kit and this script
# are tested on a machine without a GPU (tests/test_gpu_kit.py).
set -uo pipefail
kit=${1:?usage: scripts/gpu_check.sh KIT OUT [--cpu]}
out=${2:?usage: scripts/gpu_check.sh KIT OUT [--cpu]}
mode=gpu
[ "${3:-}" = "--cpu" ] && mode=cpu
cd "$(dirname "$0")/.."
root=$PWD
mkdir -p "$out"
out=$(cd "$out" && pwd)
kit=$(cd "$kit" && pwd)
log="$out/check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

say "# gpu_check ($mode) $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $("$py" -V 2>&1)"
# 1. Verify every part, reassemble, verify every whole file.
mkdir -p "$work/wheels"
while read -r kind sum name size; do
  if [ "$kind" = part ]; then
    echo "$sum  $kit/$name" | sha256sum -c --quiet - || { say "FAILED: $name does not match MANIFEST"; exit 1; }
  fi
done < "$kit/MANIFEST"
while read -r kind sum name size; do
  [ "$kind" = file ] || continue
  if [ -f "$kit/$name" ]; then cp "$kit/$name" "$work/wheels/"; else cat "$kit/$name".part-* > "$work/wheels/$name"; fi
  echo "$sum  $work/wheels/$name" | sha256sum -c --quiet - || { say "FAILED: reassembled $name"; exit 1; }
done < "$kit/MANIFEST"
say "kit verified: $(ls "$work/wheels" | wc -l) wheels"
timeout 300 "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-index \
  --no-deps --target "$work/site" \
  "$work"/wheels/*.whl >> "$log" 2>&1 || { say "FAILED: pip install --no-index"; exit 1; }
export PYTHONPATH="$root:$work/site" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 HMLSTM_ORT_PRELOAD_DLLS=1
"$py" - >> "$log" 2>&1 <<'PY'
import onnxruntime as o, numpy, grpc, google.protobuf as p
print("onnxruntime", o.__version__, o.get_available_providers(), "numpy", numpy.__version__,
      "grpcio", grpc.__version__, "protobuf", p.__version__)
PY
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$log" 2>&1
else
  echo "nvidia-smi: not found" >> "$log"
fi

step() {  # step NAME SECONDS COMMAND...: run with a hard limit, keep going either way
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  say "step $name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)"
  return 0
}
step tests 150 "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu
step bench 330 "$py" benchmarks/gpu_bench.py --mode "$mode" --out "$out/bench.md"

{
  echo "## GPU check ($mode), $(date -u +%Y-%m-%d)"
  echo
  echo "Written by \`scripts/gpu_check.sh\` from a kit built by \`scripts/gpu_kit.sh\`; $(( $(date +%s) - start )) s in all."
  echo
  echo '```'
  cat "$log"
  echo '```'
  echo
  echo "### Tests (tests/gpu)"
  echo
  echo '```'
  tail -n 15 "$out/tests.log"
  echo '```'
  echo
  if [ -f "$out/bench.md" ]; then cat "$out/bench.md"; else echo "(no benchmark report: see bench.log)"; tail -n 20 "$out/bench.log"; fi
} > "$out/gpu-report.md"
say "report: $out/gpu-report.md"
