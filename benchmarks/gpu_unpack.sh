#!/usr/bin/env bash
# On a GPU machine without network, from the repository root: unpack the pieces that
# benchmarks/gpu_pack.sh made (copied into FOLDER, with its `sum`) into /tmp/site, put
# onnxruntime-gpu in place of the CPU onnxruntime, and write /tmp/env.sh, which later commands
# source: the repository and /tmp/site on PYTHONPATH, CUDA's libraries from NVIDIA's pip
# packages (those torch brought) on LD_LIBRARY_PATH. A `ducho-fast` command is put beside that
# Python. Then: `. /tmp/env.sh && bash benchmarks/gpu_suite.sh`.
#
#   bash benchmarks/gpu_unpack.sh FOLDER
#
# $PYTHON: the machine's Python (default python3). $SITE: where (default /tmp/site).
# SKIP_INSTALL=1: only check and unpack.
set -euo pipefail
FOLDER=${1:?usage: gpu_unpack.sh FOLDER (the pieces p0, p1, ... and sum)}
[ -d "$FOLDER" ] && FOLDER=$(cd "$FOLDER" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
pieces=("$FOLDER"/p[0-9]*)
if [ ! -e "${pieces[0]}" ] || [ ! -f "$FOLDER/sum" ]; then
  echo "gpu_unpack: no pieces p0, p1, ... and sum in $FOLDER" >&2
  exit 2
fi
got=$(cat "${pieces[@]}" | sha256sum | cut -c1-64)
if [ "$got" != "$(cat "$FOLDER/sum")" ]; then
  echo "gpu_unpack: the ${#pieces[@]} pieces in $FOLDER do not add up to what was packed (a piece missing or cut short?)" >&2
  exit 1
fi
rm -rf "$SITE"
mkdir -p "$SITE"
cat "${pieces[@]}" | xz -d | tar -C "$SITE" --strip-components 1 -xf -
echo "gpu_unpack: $SITE from ${#pieces[@]} pieces"
[ "${SKIP_INSTALL:-0}" = 1 ] && exit 0

"$PY" -m pip uninstall -y -q onnxruntime 2>&1 | tail -1 || true
purelib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(find "$purelib/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')
cat > /tmp/env.sh <<EOT
export PYTHONPATH=$SITE:$PWD
export LD_LIBRARY_PATH=${libs}\${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
export PYTHON=$(command -v "$PY")
EOT
bin=$(dirname "$(command -v "$PY")")
printf '#!%s\nimport sys\nfrom ducho_fast.cli import main\nsys.exit(main())\n' \
  "$(command -v "$PY")" > "$bin/ducho-fast"
chmod +x "$bin/ducho-fast"
cat /tmp/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
