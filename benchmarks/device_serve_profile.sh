#!/usr/bin/env bash
# Where a Serve request waits: py-spy profiles of the model replica and one ingress replica under load, in the
# call right after `SKIP_BENCH=1 bash benchmarks/device_run.sh` on the same warm machine (about 2 minutes):
#   device: carry [".devwheels/q2"], command "bash benchmarks/device_serve_profile.sh", timeout_s 200
# (device_prepare.sh --ray puts the py-spy wheel into .devwheels/q2.) Runs load_test with the 2B shape at one
# concurrency (PROFILE_CONCURRENCY, 8) for 30 s; once the model is served, records for 12 s:
#   $OUT/model.txt, $OUT/ingress.txt   every thread, idle included (py-spy --threads --idle, raw, 200 Hz)
#   $OUT/model_gil.txt                 only the thread holding the interpreter lock (--gil, 100 Hz)
# and prints each thread's busy share of the model replica and where its forward thread spends its time
# (benchmarks/spy_summary.py). The load test's own
# table lands in $OUT/load.out. A dry run elsewhere: SHAPE=tiny SKIP_INSTALL=1 (py-spy on the PATH).
set -uo pipefail
OUT=${OUT:-/tmp/profile-out}
mkdir -p "$OUT"
began=$(date +%s)
elapsed() { echo $(( $(date +%s) - began )); }
# shellcheck source=benchmarks/device_ray_env.sh
source benchmarks/device_ray_env.sh
SPY=py-spy
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/pyspy .devwheels/q2/py_spy-*.whl >/dev/null 2>&1 \
    || { echo "no py-spy wheel in .devwheels/q2 (bash benchmarks/device_prepare.sh --ray)"; exit 1; }
  SPY=/tmp/pyspy/bin/py-spy
fi
SHAPE=${SHAPE:-2b}
conc=${PROFILE_CONCURRENCY:-8}
echo "== [$(elapsed) s] load test, $SHAPE, concurrency $conc for 30 s ${PROFILE_ARGS:-} =="
# shellcheck disable=SC2086
timeout 150 python3 -m benchmarks.load_test --serve "$SHAPE" --concurrency "$conc" --duration 30 \
  ${PROFILE_ARGS:-} --json "$OUT/load.json" >"$OUT/load.out" 2>"$OUT/load.log" &
load=$!
for _ in $(seq 120); do grep -q "^serving" "$OUT/load.out" 2>/dev/null && break; sleep 1; done
sleep 8  # past the first requests
model=$(pgrep -f "^ray::ServeReplica:vlm-embed:EmbeddingModel" | head -1)
ingress=$(pgrep -f "^ray::ServeReplica:vlm-embed:EmbeddingService" | head -1)
echo "[$(elapsed) s] model replica pid ${model:-none}, ingress replica pid ${ingress:-none}: recording 12 s"
if [ -n "$model" ] && [ -n "$ingress" ]; then
  timeout 30 "$SPY" record --pid "$model" -d 12 -r 200 --threads --idle --format raw -o "$OUT/model.txt" \
    >"$OUT/spy_model.log" 2>&1 &
  spy_model=$!
  timeout 30 "$SPY" record --pid "$ingress" -d 12 -r 200 --threads --idle --format raw -o "$OUT/ingress.txt" \
    >"$OUT/spy_ingress.log" 2>&1 &
  spy_ingress=$!
  timeout 30 "$SPY" record --pid "$model" -d 12 -r 100 --gil --format raw -o "$OUT/model_gil.txt" \
    >"$OUT/spy_gil.log" 2>&1
  wait "$spy_model" "$spy_ingress"
fi
wait "$load"
echo "[$(elapsed) s] load test exit $?"
grep -E "^Traceback|Error" "$OUT/load.log" | sort | uniq -c | head -5
cat "$OUT/load.out"
ray stop --force >/dev/null 2>&1
if [ -s "$OUT/model.txt" ]; then
  python3 -m benchmarks.spy_summary "$OUT/model.txt" --thread forward
else
  echo "py-spy wrote nothing:"; tail -3 "$OUT/spy_model.log" 2>/dev/null
fi
