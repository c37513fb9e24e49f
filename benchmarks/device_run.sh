#!/usr/bin/env bash
# The whole GPU table in one device call (about 6 minutes on one H100, 7 at most: every step is bounded).
#   here:   bash benchmarks/device_prepare.sh [--ray]
#   device: carry [".whl/bench"] (and ".devwheels/q1" with --ray), command "bash benchmarks/device_run.sh",
#           timeout_s 420; then, with --ray, device_ray.sh in the next call (the backfill and Serve on the GPU)
# Logs and the JSON go to $OUT; the reply's tail ends with the table. Installs nothing but the carried wheels
# (into /tmp/site); leaves the GPU's settings alone.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
began=$(date +%s)
elapsed() { echo $(( $(date +%s) - began )); }

# Overrides: BENCH_ARGS (the bench's arguments), BENCH2_ARGS (a second bench after it, e.g. the FP8 rows),
# RERANK_ARGS (the reranker's bench, benchmarks/rerank_bench.py, e.g. "--shape 2b"; SKIP_BENCH-free sessions),
# SKIP_INSTALL=1 (use what is installed: a dry run elsewhere), SKIP_BENCH=1 (only stage what device_ray.sh
# needs: a Serve-only session is SKIP_BENCH=1 here, then device_ray.sh in the next call).
# The default compares the two packed engines, compiled, in one run: hooks (the default engine, the model's own
# layers through AttentionInterface) against legacy (the engine README's figures were measured with).
# GRAPHS=1: the CUDA-graph session instead (issue 17; NOTES "CUDA graphs for small steps"): 2B, Serve-sized steps
# of 1 and 8 texts and the image set, compiled with and without graphs, every pass, and a new process's start to
# its first vector with and without the compiler cache (~4-5 minutes: timeout_s 420).
if [ "${GRAPHS:-0}" = 1 ]; then
  BENCH_ARGS=${BENCH_ARGS:-"--shape 2b --workload text1 --workload text8 --workload image --variant packed+compile \
--variant packed+compile+graphs --passes 3 --no-cached-compile --cold-start packed+compile+graphs"}
  BENCH_DEADLINE=${BENCH_DEADLINE:-240}
fi
# FP8=1: the FP8 session instead (issue 17; NOTES "FP8 that keeps the vectors"): 2B text, bf16 against the FP8
# variants (unfused as before, fused, fused keeping the first/last layers, down_proj, or all three), every pass;
# first each variant's cosine at the full 28 layers (benchmarks/fp8_cosine.py, ~1 minute; ~4-5 minutes in all:
# timeout_s 420).
if [ "${FP8:-0}" = 1 ]; then
  BENCH_ARGS=${BENCH_ARGS:-"--shape 2b --workload text --variant packed+compile --variant packed+compile+fp8-unfused \
--variant packed+compile+fp8 --variant packed+compile+fp8-keep-ends --variant packed+compile+fp8-keep-down \
--variant packed+compile+fp8-keep-all3 --passes 3 --no-cached-compile"}
  BENCH_DEADLINE=${BENCH_DEADLINE:-240}
  COSINE_ARGS=${COSINE_ARGS:-"--shape 2b --items 64 --device cuda"}
fi
BENCH_ARGS=${BENCH_ARGS:-"--shape 2b --shape 8b --variant packed+compile --variant legacy:packed+compile --passes 3"}
BENCH_DEADLINE=${BENCH_DEADLINE:-270}
if [ -d .devwheels/q1 ]; then  # the first half of the Ray pack: device_ray.sh picks it up in the next call
  mkdir -p /tmp/rk && cp .devwheels/q1/part.* /tmp/rk/
fi
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  export PYTHONPATH=$PWD
elif ls .whl/bench/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site .whl/bench/*.whl >"$OUT/install.log" 2>&1 \
    || { echo "wheel install failed:"; tail -5 "$OUT/install.log"; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no carried wheels in .whl/bench: using the machine's own transformers (and failing without pydantic)"
  export PYTHONPATH=$PWD
fi
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # a fresh cache: the first compile is a real cold start
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
    --format=csv
  python3 -c "import torch, transformers, pydantic; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| pydantic', pydantic.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

if [ "${SKIP_BENCH:-0}" = 1 ]; then  # only stage the wheels and the Ray pack's first half for device_ray.sh
  echo "staged: $(ls /tmp/rk 2>/dev/null | wc -l) Ray pack part(s), transformers in /tmp/site"; exit 0
fi
echo "== [$(elapsed) s] GPU checks: flash varlen kernel, packed layout in bf16 =="
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu -s \
  tests/pipelines/test_varlen.py tests/pipelines/test_packed.py tests/pipelines/test_gpu_real_shape.py \
  tests/pipelines/test_step_graphs.py \
  >"$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|skipped|rror|cosine|graphs:" "$OUT/gpu_tests.log" | tail -10

bench() {  # bench NAME TITLE ARGS: one bounded bench run, its output in $OUT/NAME.{out,log,json}
  local name=$1 title=$2 args=$3
  echo "== [$(elapsed) s] $title: $args =="
  # shellcheck disable=SC2086
  timeout $((BENCH_DEADLINE + 60)) python3 -m benchmarks.bench $args --deadline-s "$BENCH_DEADLINE" \
    --json "$OUT/$name.json" >"$OUT/$name.out" 2>"$OUT/$name.log"
  echo "$name exit $? after $(elapsed) s"
  grep -E "^Traceback|Error|skipped" "$OUT/$name.log" | sort | uniq -c | head -8
  echo
}
show() {  # the table of a bench's JSON, or the end of its log when it wrote none
  if [ -s "$OUT/$1.json" ]; then python3 -m benchmarks.bench --show "$OUT/$1.json"; else tail -20 "$OUT/$1.log"; fi
  echo
}
if [ -n "${COSINE_ARGS:-}" ]; then  # FP8 variants' cosine to bf16 and float32 (benchmarks/fp8_cosine.py)
  echo "== [$(elapsed) s] fp8 cosine: $COSINE_ARGS =="
  # shellcheck disable=SC2086
  timeout 120 python3 -m benchmarks.fp8_cosine $COSINE_ARGS --json "$OUT/fp8_cosine.json" \
    >"$OUT/fp8_cosine.out" 2>"$OUT/fp8_cosine.log"
  echo "fp8_cosine exit $? after $(elapsed) s"; cat "$OUT/fp8_cosine.out"; tail -3 "$OUT/fp8_cosine.log"; echo
fi
bench bench "benchmark (and the baseline), text and image" "$BENCH_ARGS"
if [ -n "${RERANK_ARGS:-}" ]; then  # the reranker's pairs/s, e.g. RERANK_ARGS="--shape 2b" (~1-2 minutes)
  echo "== [$(elapsed) s] reranker: $RERANK_ARGS =="
  # shellcheck disable=SC2086
  timeout 150 python3 -m benchmarks.rerank_bench $RERANK_ARGS \
    --json "$OUT/rerank.json" >"$OUT/rerank.out" 2>"$OUT/rerank.log"
  echo "rerank exit $? after $(elapsed) s"; cat "$OUT/rerank.out"; echo
fi
if [ -n "${BENCH2_ARGS:-}" ]; then  # a second bench in the same call (e.g. the FP8 rows), its own JSON
  bench bench2 "second benchmark" "$BENCH2_ARGS"
  show bench2
fi
show bench
