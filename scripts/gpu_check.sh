#!/usr/bin/env bash
# The GPU check, on a host without a package index: one step per invocation, hard time limits, reports.
#   scripts/gpu_check.sh KIT OUT [--gpu|--cpu] [--step install|tests|bench|all]
# KIT: what scripts/gpu_visit.py kit wrote (KIT/p1 ... pN; a flat folder of scripts/gpu_kit.sh works too):
# parts are verified against MANIFEST and reassembled. OUT: gpu-report.md, check.log, the step logs and
# the installed kit (OUT/site, reused by later invocations). Steps:
#   install  check the host first (CUDA 13 libraries, driver >= 580: scripts/gpu_host.py, one line), verify
#            and reassemble the kit, `pip install --no-index --no-deps --target OUT/site`, load the host's
#            CUDA libraries (hmlstm.runtime.preload_nvidia) and log what loaded (240 s);
#   tests    the `gpu` tests that need no TensorFlow (tests/gpu: CUDA provider selected and matching the
#            CPU within the export tolerance, IO binding keeping state on the device, TensorRT's attempt;
#            180 s). With --gpu (the default) a GPU test that skips fails the step, naming its reason;
#   bench    ONNX Runtime called directly (dense and sparse engines) and the real server (360 s); the
#            server's log is kept (OUT/server.log) and a server that fails is named with its last line;
#   all      the three in turn.
# Every invocation rewrites gpu-report.md from every step run so far, in this OUT, by any invocation: its
# first line says which steps passed, names the failed one and its error, and gives the time of all
# invocations together. A step run again replaces its earlier result (a passing rerun clears a failure).
# The script exits 1 if a step it ran failed. Where $OUT is set (the device tool's folder that comes
# back), the report, the logs and the benchmark's table are copied there.
# --cpu runs the same steps on the CPU provider with a small grid: how the kit and this script are tested
# on a machine without a GPU (tests/test_gpu_visit.py).
set -uo pipefail
usage="usage: scripts/gpu_check.sh KIT OUT [--gpu|--cpu] [--step install|tests|bench|all]"
kit=${1:?$usage}
out=${2:?$usage}
shift 2
mode=gpu
only=all
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) mode=cpu ;;
    --gpu) mode=gpu ;;
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
results="$out/steps.tsv"  # step <TAB> exit status <TAB> seconds <TAB> why (one line per step, the latest)
touch "$log" "$results" "$out/invocations"
say() { echo "$*" | tee -a "$log"; }
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
failed_here=0

record() {  # record STEP STATUS SECONDS WHY: replaces the step's earlier line
  grep -v "^$1	" "$results" > "$work/results" || true
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\n'/ }" >> "$work/results"
  cp "$work/results" "$results"
  if [ "$2" != 0 ]; then failed_here=1; say "FAILED: $1: $4"; fi
}

find_kit_file() {  # a MANIFEST name, wherever in KIT (its p* folders, or KIT itself) it landed
  find "$kit" -maxdepth 2 -name "$1" -type f | head -n 1
}

install() {  # begins a new sequence: earlier steps' results and times are of another install
  local t0=$(date +%s)
  : > "$log"; : > "$results"; : > "$out/invocations"
  say "# gpu_check ($mode, step install) $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $("$py" -V 2>&1)"
  local host
  host=$("$py" scripts/gpu_host.py $([ "$mode" = cpu ] && echo --cpu) 2>&1)
  local host_rc=$?
  say "$host"
  if [ $host_rc -ne 0 ]; then record install 1 $(( $(date +%s) - t0 )) "$host"; return 1; fi
  local manifest
  manifest=$(find_kit_file MANIFEST)
  [ -n "$manifest" ] || { record install 1 0 "no MANIFEST under $kit: carry every part of the kit"; return 1; }
  # Verify every part, reassemble, verify every whole file; a fresh install replaces an earlier one.
  rm -rf "$out/site"
  mkdir -p "$work/wheels"
  while read -r kind sum name size; do
    [ "$kind" = part ] || continue
    local at
    at=$(find_kit_file "$name")
    [ -n "$at" ] || { record install 1 $(( $(date +%s) - t0 )) "$name is missing: a part was not carried"; return 1; }
    echo "$sum  $at" | sha256sum -c --quiet - \
      || { record install 1 $(( $(date +%s) - t0 )) "$name does not match MANIFEST"; return 1; }
  done < "$manifest"
  while read -r kind sum name size; do
    [ "$kind" = file ] || continue
    local whole
    whole=$(find_kit_file "$name")
    if [ -n "$whole" ]; then cp "$whole" "$work/wheels/"
    else
      # the parts in their numbered order, wherever each landed
      for p in $(grep "^part .* $name\.part-" "$manifest" | awk '{print $3}' | sort); do
        cat "$(find_kit_file "$p")"
      done > "$work/wheels/$name"
    fi
    echo "$sum  $work/wheels/$name" | sha256sum -c --quiet - \
      || { record install 1 $(( $(date +%s) - t0 )) "reassembled $name does not match MANIFEST"; return 1; }
  done < "$manifest"
  say "kit verified: $(ls "$work/wheels" | wc -l) wheels"
  timeout 200 "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-index \
    --no-deps --target "$out/site" "$work"/wheels/*.whl >> "$log" 2>&1 \
    || { record install 1 $(( $(date +%s) - t0 )) "pip install --no-index failed (see check.log)"; return 1; }
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
  record install 0 $(( $(date +%s) - t0 )) ""
}
export PYTHONPATH="$root:$out/site" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 HMLSTM_ORT_PRELOAD_DLLS=1

step() {  # step NAME SECONDS COMMAND...: run with a hard limit; the result is recorded, the script goes on
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local seconds=$(( $(date +%s) - t0 ))
  say "step $name: exit $rc in $seconds s (limit $limit s)"
  local why=""
  if [ $rc -eq 124 ]; then why="ran past its $limit s limit"
  elif [ $rc -ne 0 ]; then why="exit $rc: $(grep -v '^\s*$' "$out/$name.log" | tail -n 1 | cut -c1-300)"
  elif [ "$name" = tests ] && [ "$mode" = gpu ] && grep -q '^SKIPPED' "$out/$name.log"; then
    rc=1  # on a GPU host every GPU test must run: a skip is a check that did not happen
    why="a GPU test skipped on a GPU visit: $(grep -m 1 '^SKIPPED' "$out/$name.log" | cut -c1-300)"
  fi
  record "$name" $rc $seconds "$why"
}
if [ "$only" = install ] || [ "$only" = all ]; then
  install
fi
if [ ! -d "$out/site" ]; then
  [ "$only" = install ] || [ "$only" = all ] \
    || record "$only" 1 0 "the kit is not installed in $out/site (run --step install first)"
else
  [ "$only" = tests ] || [ "$only" = all ] && step tests 180 "$py" -m pytest -q -rs -p no:cacheprovider \
    -o addopts="" tests/gpu
  [ "$only" = bench ] || [ "$only" = all ] && step bench 360 "$py" benchmarks/gpu_bench.py --mode "$mode" \
    --out "$out/bench.md"
fi
echo $(( $(date +%s) - start )) >> "$out/invocations"

total=$(awk '{s += $1} END {print s + 0}' "$out/invocations")
count=$(wc -l < "$out/invocations")
passed=$(awk -F'\t' '$2 == 0 {printf "%s%s", sep, $1; sep = ", "}' "$results")
first_failed=$(awk -F'\t' '$2 != 0 {print $1 ": " $4; exit}' "$results")
{
  if [ -n "$first_failed" ]; then
    echo "FAILED step $first_failed; passed: ${passed:-none}; $total s in all over $count invocation(s)."
  else
    echo "All steps run so far passed: ${passed:-none}; $total s in all over $count invocation(s)."
  fi
  echo
  echo "## GPU check ($mode), $(date -u +%Y-%m-%d)"
  echo
  echo "Written by \`scripts/gpu_check.sh\` from a kit built by \`scripts/gpu_visit.py kit\`."
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
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # the device tool's folder: what is there comes back
  for f in gpu-report.md check.log tests.log bench.log bench.md server.log; do
    [ -f "$out/$f" ] && cp "$out/$f" "$OUT/"
  done
fi
exit $failed_here
