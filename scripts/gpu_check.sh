#!/usr/bin/env bash
# The GPU check, on a host without a package index: one step per invocation, hard time limits, reports.
#   scripts/gpu_check.sh KIT OUT [--cpu] [--step install|tests|bench|all]
# KIT: what scripts/gpu_kit.sh wrote (parts are verified and reassembled). OUT: gpu-report.md,
# check.log, the step logs and the installed kit (OUT/site, reused by later invocations). Steps:
#   install  verify and reassemble the kit, `pip install --no-index --no-deps --target OUT/site`, load
#            the host's CUDA libraries (hmlstm.runtime.preload_nvidia) and log what loaded (160 s);
#   tests    the `gpu` tests that need no TensorFlow (tests/gpu: CUDA provider selected and matching
#            the CPU within the export tolerance, IO binding keeping state on the device, TensorRT's
#            attempt; 120 s);
#   bench    ONNX Runtime called directly (dense and sparse engines) and the real server (200 s);
#            the three limits add up to 480 s, the 8 minutes a visit to the GPU host leaves for them;
#   all      the three in turn (the default).
# Each invocation writes gpu-report.md from every step run so far; its first line says whether all
# passed or names the first failed step and its error, and the script exits 1 if a step it ran failed.
# --cpu runs the same steps on the CPU provider with a small grid: how the kit and this script
# are tested on a machine without a GPU (tests/test_gpu_kit.py).
set -uo pipefail
usage="usage: scripts/gpu_check.sh KIT OUT [--cpu] [--step install|tests|bench|all]"
kit=${1:?$usage}
out=${2:?$usage}
shift 2
mode=gpu
only=all
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) mode=cpu ;;
    --step) only=${2:?$usage}; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
case $only in install|tests|bench|all) ;; *) echo "$usage" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
root=$PWD
mkdir -p "$out"
out=$(cd "$out" && pwd)
kit=$(cd "$kit" && pwd)
log="$out/check.log"
[ "$only" = install ] || [ "$only" = all ] && : > "$log" && : > "$out/failed"
touch "$log" "$out/failed"
say() { echo "$*" | tee -a "$log"; }
fail() { echo "$*" >> "$out/failed"; say "FAILED: $*"; }
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
failed_here=0

install() {
  say "# gpu_check ($mode, step install) $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $("$py" -V 2>&1)"
  # Verify every part, reassemble, verify every whole file; a fresh install replaces an earlier one.
  rm -rf "$out/site"
  mkdir -p "$work/wheels"
  while read -r kind sum name size; do
    if [ "$kind" = part ]; then
      echo "$sum  $kit/$name" | sha256sum -c --quiet - || { fail "install: $name does not match MANIFEST"; return 1; }
    fi
  done < "$kit/MANIFEST"
  while read -r kind sum name size; do
    [ "$kind" = file ] || continue
    if [ -f "$kit/$name" ]; then cp "$kit/$name" "$work/wheels/"; else cat "$kit/$name".part-* > "$work/wheels/$name"; fi
    echo "$sum  $work/wheels/$name" | sha256sum -c --quiet - || { fail "install: reassembled $name does not match MANIFEST"; return 1; }
  done < "$kit/MANIFEST"
  say "kit verified: $(ls "$work/wheels" | wc -l) wheels"
  timeout 160 "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-index \
    --no-deps --target "$out/site" \
    "$work"/wheels/*.whl >> "$log" 2>&1 || { fail "install: pip install --no-index (see check.log)"; return 1; }
  PYTHONPATH="$root:$out/site" HMLSTM_ORT_PRELOAD_DLLS=1 "$py" - >> "$log" 2>&1 <<'PY'
import onnxruntime as o, numpy, grpc, google.protobuf as p
print("onnxruntime", o.__version__, o.get_available_providers(), "numpy", numpy.__version__,
      "grpcio", grpc.__version__, "protobuf", p.__version__)
from hmlstm.runtime import _preload_nvidia_libraries, nvidia_library_dirs
print("NVIDIA library folders on the path:", nvidia_library_dirs() or "none")
for line in _preload_nvidia_libraries():  # what it loaded and what onnxruntime.preload_dlls printed
    print("preload:", line)
from hmlstm.runtime import tensorrt_libraries_present
print("TensorRT:", "libnvinfer and libnvonnxparser load" if tensorrt_libraries_present() else
      "not available (libnvinfer and libnvonnxparser do not load; the kit cannot carry them: PyPI's "
      "tensorrt-cu13-libs is a 15 kB sdist that fetches its wheel from NVIDIA's own index)")
PY
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$log" 2>&1
  else
    echo "nvidia-smi: not found" >> "$log"
  fi
}
export PYTHONPATH="$root:$out/site" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 HMLSTM_ORT_PRELOAD_DLLS=1

step() {  # step NAME SECONDS COMMAND...: run with a hard limit; a failure is recorded, the script goes on
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  say "step $name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)"
  if [ $rc -ne 0 ]; then
    local why
    why=$([ $rc -eq 124 ] && echo "ran past its $limit s limit" || grep -v '^\s*$' "$out/$name.log" | tail -n 1)
    fail "$name: exit $rc: ${why:0:300}"
    failed_here=1
  fi
}
if [ "$only" = install ] || [ "$only" = all ]; then
  install || failed_here=1
fi
if [ ! -d "$out/site" ]; then
  [ "$only" = install ] || [ "$only" = all ] || fail "$only: the kit is not installed in $out/site (run --step install first)"
  failed_here=1
else
  [ "$only" = tests ] || [ "$only" = all ] && step tests 120 "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu
  [ "$only" = bench ] || [ "$only" = all ] && step bench 200 "$py" benchmarks/gpu_bench.py --mode "$mode" --out "$out/bench.md"
fi

{
  if [ -s "$out/failed" ]; then echo "FAILED step $(head -n 1 "$out/failed")"; else echo "All steps run so far passed."; fi
  echo
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
  [ -f "$out/tests.log" ] && tail -n 15 "$out/tests.log" || echo "(not run)"
  echo '```'
  echo
  if [ -f "$out/bench.md" ]; then cat "$out/bench.md"
  elif [ -f "$out/bench.log" ]; then echo "(no benchmark report: see bench.log)"; tail -n 20 "$out/bench.log"
  else echo "(benchmark not run)"; fi
} > "$out/gpu-report.md"
say "report: $out/gpu-report.md"
exit $failed_here
