#!/bin/sh
# Installs ducho-fast with ONNX Runtime for CUDA: the `gpu` extra (onnxruntime-gpu, never the
# CPU `onnxruntime` beside it: both install the module `onnxruntime`), plus export extras when
# asked, then proves the result.
#
#   docker/install.sh SOURCE [EXTRAS]     e.g. docker/install.sh . torch,hf
#
# Dockerfile.cuda runs it; tests/test_gpu_install.py runs it in a fresh venv. PYTHON picks the
# interpreter (default: python3 on PATH); docker/constraints-gpu.txt pins onnxruntime-gpu to
# the release that matches the image's CUDA and cuDNN.
set -eu
source=$1
extras=${2:-}
python=${PYTHON:-python3}
here=$(dirname "$0")

"$python" -m pip install --no-cache-dir --constraint "$here/constraints-gpu.txt" \
    "$source[gpu${extras:+,$extras}]"

if "$python" -m pip show --quiet onnxruntime >/dev/null 2>&1; then
    echo "error: the CPU package onnxruntime was installed beside onnxruntime-gpu" \
        "(pulled in by: $("$python" -m pip show onnxruntime | sed -n 's/^Required-by: //p'))." >&2
    exit 1
fi
"$python" -m pip check
"$python" -c "import onnxruntime, ducho_fast; print('onnxruntime', onnxruntime.__version__)"
