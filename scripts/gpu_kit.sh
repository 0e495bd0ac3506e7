#!/usr/bin/env bash
# Build the offline kit for a GPU host that has no package index (see docs/benchmarks.md, "GPU").
#   scripts/gpu_kit.sh DIR [--python 3.12] [--cpu]
# (scripts/gpu_visit.py kit runs it and packs the result into the visit's parts.)
# Downloads, for that Python on manylinux x86_64, the wheels the server needs that such a host
# lacks: onnxruntime-gpu (with --cpu: the CPU onnxruntime, for trying the kit on a CPU machine) and
# what it requires (flatbuffers, packaging; not its optional extras: sympy is for its symbolic tools,
# and its 7 MB would cost the visit a sixth call), the exact grpcio / protobuf / health-checking /
# reflection versions this project's generated stubs were built against, numpy at the tested version,
# typing_extensions for grpcio, pytest with its own needs (pygments, pluggy, iniconfig), and this
# project as a wheel: everything, so that the kit installs with --no-index into an empty folder under
# a bare Python. Files over HMLSTM_KIT_PART_MB (default 60 MB) are split into numbered parts.
# MANIFEST lists every file's sha256 and its parts; scripts/gpu_check.sh verifies and reassembles.
set -euo pipefail
dir=${1:?usage: scripts/gpu_kit.sh DIR [--python X.Y] [--cpu]}
shift
pyver=3.12
ort="onnxruntime-gpu==1.31.1"
while [ $# -gt 0 ]; do
  case "$1" in
    --python) pyver=$2; shift 2 ;;
    --cpu) ort="onnxruntime==1.31.1"; shift ;;
    *) echo "gpu_kit.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
part_mb=${HMLSTM_KIT_PART_MB:-60}
# The versions installed here, which the generated stubs were built and tested against.
# numpy ships too, at the version tested here: the kit's folder comes first on the host's path, so the
# host's own numpy (2.5 on the documented host, outside this project's tested range) is not used.
pins=$("$py" -c "from importlib.metadata import version as v
print(' '.join(f'{p}=={v(p)}' for p in ('grpcio', 'grpcio-health-checking', 'grpcio-reflection', 'protobuf',
                                        'prometheus-client', 'numpy')))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
abi="cp${pyver/./}"
echo "kit for CPython $pyver: $ort $pins -> $dir" >&2
"$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
  --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$work" \
  "$ort" flatbuffers packaging $pins typing_extensions \
  pytest pluggy iniconfig pygments \
  2> >(grep -v "^WARNING: Location" >&2)
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$work" . \
  >"$work/wheel.log" 2>&1 || { cat "$work/wheel.log" >&2; exit 1; }
mkdir -p "$dir"
rm -f "$dir"/MANIFEST "$dir"/*.whl "$dir"/*.whl.part-*
limit=$((part_mb * 1000 * 1000))
for f in "$work"/*.whl; do
  name=$(basename "$f")
  sum=$(sha256sum "$f" | cut -d' ' -f1)
  size=$(stat -c %s "$f")
  if [ "$size" -gt "$limit" ]; then
    split -b "$limit" -d -a 2 "$f" "$dir/$name.part-"
    parts=$(cd "$dir" && ls "$name".part-* | tr '\n' ' ')
  else
    cp "$f" "$dir/"
    parts="$name"
  fi
  for p in $parts; do echo "part $(sha256sum "$dir/$p" | cut -d' ' -f1) $p" >> "$dir/MANIFEST"; done
  echo "file $sum $name $size" >> "$dir/MANIFEST"
done
echo "wrote $dir: $(grep -c '^file' "$dir/MANIFEST") wheels in $(grep -c '^part' "$dir/MANIFEST") files, largest $(ls -S "$dir" | head -1)" >&2
