#!/usr/bin/env bash
# GPU check, one script, <= 8 minutes on one GPU: `bash bench/gpu_check.sh [REPORT_DIR]`.
#
# 1. environment (nvidia-smi, torch, onnxruntime providers)
# 2. the gpu-marked tests (pytest -m gpu): fp16/bf16 autocast, pinned staging, compiled buckets, captured CUDA
#    graphs (cuda_graphs), nvjpeg decoding within its stated tolerance (decode=engine), onnxruntime's CUDA
#    provider, the service on CUDA (eager, cuda_graphs, decode=engine), the engine loop with two batches in
#    flight, bf16/fp16 training, nccl + DDP
# 3. image-tower throughput, ViT-B-32 and ViT-B-16 (random weights), fp16, batch sweep: eager vs the same
#    forward replayed as CUDA graphs (+ onnxruntime-gpu when installed) (bench/backends.py)
# 4. the service under wrk on the GPU (bench/wrk_load.py --device cuda, 224-px JPEG uploads, fp16, max batch
#    128, 512 connections), each run alternating two configurations: ViT-B-32 with the service's defaults
#    (CUDA graphs) vs batches_in_flight 2 (the next batch launched while the GPU computes the last); ViT-B-16
#    likewise; then, with the better of the two, ViT-B-32 decode=worker vs decode=engine (nvjpeg). (Eager
#    against cuda_graphs was measured on 2026-11-30: docs/benchmarks.md, "On one H200".) Goals
#    (issue: engine process): ViT-B-32 >= 6,000 req/s and >= 0.5x its raw tower at the best batch (step 3),
#    ViT-B-16 >= 0.85x, p50 at concurrency 1 <= raw single forward + 3 ms. wrk: Debian's, or .gpu/bin/wrk
#    (bench/gpu_prepare.sh)
# 5. upload decoding alone: Pillow on a thread pool vs nvjpeg + tensor resize (bench/decode.py)
# 6. torch eager vs cuda_graphs vs torch.compile(reduce-overhead), ViT-B-32 fp16 (compiling is slow: last)
# Steps 3-6 run only while the time budget (GPU_CHECK_BUDGET_S, default 480 s, counted from the start) lasts.
# Writes REPORT_DIR/report.md (+ the logs and JSON it came from); REPORT_DIR defaults to
# runs/gpu-check-<time>. When $OUT is set (the device runner's output folder, which returns 8 files at
# most) report.md and gpu-check.tar.gz (the whole report dir) are copied there.
#
# Needs: the project's dependencies with a CUDA torch, e.g. pip install -e '.[dev,onnx-gpu]'. On a host that
# reaches no registry (the lent H200): run bench/gpu_prepare.sh where pip works and carry .gpu; this script
# then installs .gpu/wheels into /tmp/site itself when `import fastapi` fails.
# Every step has its own timeout, so a hang costs that step only. Exit status: that of the tests
# (2 when torch sees no CUDA device).
#
# GPU_CHECK_DRY=1 runs every step's plumbing on this CPU instead, with the embedded mmap-tiny, fp32 and
# short windows (the gpu tests skip, the compile step is left out): to try the script before a device run.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
REPORT=${1:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the project, installed or not
if ! "$PY" -c "import fastapi" 2> /dev/null && [ -d .gpu/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site  # (before site-packages: these win where the image has a package too)
fi
if ! "$PY" -c "import fastapi, uvicorn, zmq, msgspec, open_clip, service.http.app, service.engine.loop"; then
  echo "gpu_check: the project's dependencies do not import (above); on a host without a registry run" \
       "bench/gpu_prepare.sh where pip works and bring .gpu/" >&2
  exit 3
fi
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
BATCHES=${GPU_CHECK_BATCHES:-"1 8 32 128 256"}
DEVICE=cuda PRECISION=fp16 MODELS="ViT-B-32 ViT-B-16" IMAGE=224 DECODE_DEVICES="cpu cuda"
LOAD_OPTS=(--batch 128 --connections 512 --workers 12 --wrk-cores 14,15 --rounds 2 --warm-s 2 --window-s 8 --single 50)
DRY=${GPU_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then
  DEVICE=cpu PRECISION=fp32 MODELS="mmap-tiny" IMAGE=48 BATCHES="1 8" DECODE_DEVICES=cpu
  LOAD_OPTS=(--batch 32 --connections 16 --workers 1 --wrk-cores 1 --rounds 1 --warm-s 1 --window-s 3 --single 5)
fi
FIRST=${MODELS%% *}  # the model of the decode comparison
mkdir -p "$REPORT"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$REPORT/steps.log"; }

log "environment"
{
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; else echo "nvidia-smi: not found"; fi
  timeout 60 "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import onnxruntime
    print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
except ImportError:
    print("onnxruntime: not installed")
EOF
} > "$REPORT/environment.txt" 2>&1
cat "$REPORT/environment.txt"
if [ "$DRY" != 1 ] && ! timeout 60 "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  log "no CUDA device visible to torch: nothing to check"
  printf '# GPU check\n\nNo CUDA device visible to torch on this host.\n\n```\n%s\n```\n' "$(cat "$REPORT/environment.txt")" > "$REPORT/report.md"
  [ -z "${OUT:-}" ] || cp "$REPORT/report.md" "$OUT/"
  exit 2
fi

log "gpu-marked tests"
# SIGINT at the limit: pytest still prints its summary, which says whether the CUDA-graph test passed. The
# torch.compile test is left out (minutes of compiling); step 6 measures compiled towers and their difference.
timeout -s INT -k 10 240 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider -k "not compiled_buckets" \
  tests/test_deploy_gpu.py tests/test_training_gpu.py tests/test_service_engine_loop.py > "$REPORT/pytest-gpu.log" 2>&1
TESTS_RC=$?
grep -E "accuracy .* vs fp32|max \|Δ\|" "$REPORT/pytest-gpu.log" > "$REPORT/pytest-numbers.txt"
tail -n 15 "$REPORT/pytest-gpu.log"; cat "$REPORT/pytest-numbers.txt"

GRAPHS_OK=0  # the load runs and tower rows use cuda_graphs only when its GPU test passed
grep -q "^PASSED.*test_captured_cuda_graphs_match_eager.*\[fp16\]" "$REPORT/pytest-gpu.log" \
  && ! grep -q "^FAILED.*cuda_graphs" "$REPORT/pytest-gpu.log" && GRAPHS_OK=1
[ $GRAPHS_OK = 1 ] || log "the CUDA-graph test did not pass: eager only from here"
HAS_ORT_CUDA=$(timeout 60 "$PY" -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null || echo 0)
TOWERS="torch"
[ $GRAPHS_OK = 1 ] && TOWERS="$TOWERS torch-graphs"
[ "$HAS_ORT_CUDA" = 1 ] && TOWERS="$TOWERS onnx" || log "onnxruntime has no CUDA provider: no onnx rows (pip install 'onnxruntime-gpu[cuda,cudnn]')"

# bench_step NAME NEED_S CMD...: runs CMD when at least NEED_S seconds of the budget are left, under a
# timeout of what is left; REPORT/bench-NAME.md gets the command line, then CMD's stdout.
bench_step() {
  local name=$1 need=$2 rc
  shift 2
  if [ "$(left)" -lt "$need" ]; then log "skipping $name: $(left) s left"; return; fi
  log "$name"
  printf 'Command: %s\n\n' "$*" > "$REPORT/bench-$name.md"
  timeout $(( $(left) - 10 )) "$@" >> "$REPORT/bench-$name.md" 2> "$REPORT/bench-$name.log"
  rc=$?; log "$name exit $rc"; cat "$REPORT/bench-$name.md"
  [ $rc = 0 ] || tail -n 20 "$REPORT/bench-$name.log" | tee -a "$REPORT/bench-$name.md"
}

for MODEL in $MODELS; do
  # shellcheck disable=SC2086
  bench_step "$MODEL" 60 "$PY" bench/backends.py --model "$MODEL" --device $DEVICE --precision $PRECISION \
    --batch-sizes $BATCHES --backends $TOWERS --repeats 3 --min-round-s 0.3 --json "$REPORT/bench-$MODEL.json"
done

# The service under wrk: launcher + engine + HTTP workers; 12 workers and wrk on two cores of 16.
if [ -z "${WRK:-}" ] && ! command -v wrk > /dev/null && [ -x .gpu/bin/wrk ]; then
  export WRK=$PWD/.gpu/bin/wrk LD_LIBRARY_PATH=$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
LOAD=("$PY" bench/wrk_load.py --device $DEVICE --precision $PRECISION --image-size $IMAGE "${LOAD_OPTS[@]}")
GRAPHS=(--cuda-graphs auto)  # the service's default on CUDA; eager when the CUDA-graph test failed
[ $GRAPHS_OK = 1 ] || GRAPHS=(--cuda-graphs false)
SECOND=${MODELS#"$FIRST"}; SECOND=${SECOND# }
for MODEL in $FIRST $SECOND; do
  bench_step "load-$MODEL" 90 "${LOAD[@]}" --model "$MODEL" "${GRAPHS[@]}" --variant "--batches-in-flight 2" \
    --json "$REPORT/load-$MODEL.json"
done
# the faster of one and two batches in flight (req/s) serves the decode comparison
IN_FLIGHT=1
"$PY" -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['variant_over_engine_rps'] <= 1)" \
  "$REPORT/load-$FIRST.json" 2> /dev/null && IN_FLIGHT=2
bench_step "load-$FIRST-decode" 90 "${LOAD[@]}" --model "$FIRST" "${GRAPHS[@]}" --flags "--batches-in-flight $IN_FLIGHT" \
  --variant "--decode engine" --json "$REPORT/load-$FIRST-decode.json"
# shellcheck disable=SC2086
bench_step decode 40 "$PY" bench/decode.py --model "$FIRST" --devices $DECODE_DEVICES --sizes $IMAGE 1024 --images 128 \
  --batch 32 128 --json "$REPORT/decode.json"
if [ "$DRY" != 1 ]; then  # compiling takes tens of seconds per batch size: a short sweep only, last
  # shellcheck disable=SC2086
  bench_step compile 120 "$PY" bench/backends.py --model ViT-B-32 --device cuda --precision fp16 \
    --batch-sizes 32 128 --backends ${TOWERS% onnx} torch-compile --repeats 3 --min-round-s 0.3 \
    --json "$REPORT/bench-compile.json"
fi

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'; cat "$REPORT/environment.txt"; echo '```'
  echo
  echo "## gpu-marked tests (exit $TESTS_RC)"
  echo; echo '```'; tail -n 15 "$REPORT/pytest-gpu.log"; cat "$REPORT/pytest-numbers.txt"; echo '```'
  for f in "$REPORT"/bench-*.md; do
    [ -s "$f" ] || continue
    echo; echo "## $(basename "$f" .md)"; echo
    cat "$f"
  done
  echo; echo "Total $(( $(date +%s) - START )) s."
} > "$REPORT/report.md"
log "report: $REPORT/report.md"
if [ -n "${OUT:-}" ]; then
  cp "$REPORT/report.md" "$OUT/" && tar czf "$OUT/gpu-check.tar.gz" -C "$REPORT" .
fi
exit $TESTS_RC
