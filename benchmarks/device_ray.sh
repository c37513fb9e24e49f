#!/usr/bin/env bash
# The Ray parts on the GPU, in the call right after device_run.sh on the same warm machine (about 5 minutes with
# SKIP_BACKFILL=1; each step is bounded at 150 s, so with the backfill too it may need more than one call's 600 s):
#   device: carry [".devwheels/q2"], command "SKIP_BACKFILL=1 bash benchmarks/device_ray.sh", timeout_s 560
# Joins the Ray pack's halves (q1 came with device_run.sh into /tmp/rk), unpacks it into /tmp/site beside the
# transformers that device_run.sh installed there, then
#   1. the backfill end to end on the mixed workload (2,048 texts + 256 images of 448x448), 2B shape, random
#      weights, against the bare embedder on the same rows (issue 3 section 8, issue 6 section 1);
#   2. Ray Serve with the 2B shape: single-text requests at concurrency 1, 8 and 64 (issue 4 section 5), with
#      Serve's own proxy, then in high-throughput mode (HAProxy), then that mode with no model-side batch wait.
# Logs and JSON go to $OUT; the tail of the output holds both results.
set -uo pipefail
OUT=${OUT:-/tmp/ray-out}
mkdir -p "$OUT"
began=$(date +%s)
elapsed() { echo $(( $(date +%s) - began )); }
# shellcheck source=benchmarks/device_ray_env.sh
source benchmarks/device_ray_env.sh
python3 -c "import ray, lancedb, transformers; print('ray', ray.__version__, '| lancedb', lancedb.__version__, \
'| transformers', transformers.__version__)" 2>&1 | tee "$OUT/ray_env.txt"

SHAPE=${SHAPE:-2b}
step() {  # step NAME TITLE MODULE ARGS: one bounded benchmark run, its output in $OUT/NAME.{out,log,json}
  local name=$1 title=$2 module=$3 args=$4
  echo "== [$(elapsed) s] $title, $SHAPE: $args =="
  # shellcheck disable=SC2086
  timeout 150 python3 -m "$module" $args --json "$OUT/$name.json" >"$OUT/$name.out" 2>"$OUT/$name.log"
  echo "$name exit $? after $(elapsed) s"
  grep -E "^Traceback|Error" "$OUT/$name.log" | sort | uniq -c | head -5
  cat "$OUT/$name.out"
}
if [ "${SKIP_BACKFILL:-0}" != 1 ]; then
  step backfill "backfill end to end" benchmarks.backfill_bench \
    "--shape $SHAPE ${BACKFILL_ARGS:-"--texts 2048 --images 256 --image-side 448 --packed"}"
  ray stop --force >/dev/null 2>&1 || python3 -c "import ray; ray.shutdown()" >/dev/null 2>&1
fi
# on a GPU, load_test serves packed+compile with 4 ingress replicas. Three runs on the same machine: Serve's own
# proxy, Ray Serve's high-throughput mode (HAProxy, serve/high_throughput.py), and that mode with no batch wait
# in the model replica (the ingress already groups requests). LOAD2_ARGS= or LOAD3_ARGS= (empty) skips a run.
levels="--concurrency 1 8 64 --duration 10 --min-speedup 5"
LOAD_ARGS=${LOAD_ARGS:-"$levels"}
LOAD2_ARGS=${LOAD2_ARGS-"$levels --serve-option high_throughput=true"}
LOAD3_ARGS=${LOAD3_ARGS-"$levels --serve-option high_throughput=true --serve-option batch_wait_timeout_s=0"}
run=1
for args in "$LOAD_ARGS" "$LOAD2_ARGS" "$LOAD3_ARGS"; do
  if [ -n "$args" ]; then
    ray stop --force >/dev/null 2>&1
    step "serve$run" "Ray Serve, run $run" benchmarks.load_test "--serve $SHAPE $args"
  fi
  run=$((run + 1))
done
