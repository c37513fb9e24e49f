# Sourced by device_ray.sh and device_serve_profile.sh: joins the Ray pack's halves (q1 came with device_run.sh
# into /tmp/rk, q2 travels with this call), unpacks it into /tmp/site beside the transformers device_run.sh
# installed there, and sets the environment the Ray steps run in. SKIP_INSTALL=1: use what is installed (a dry
# run elsewhere).
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  mkdir -p /tmp/rk /tmp/site && cp .devwheels/q2/part.* /tmp/rk/
  cat /tmp/rk/part.0 /tmp/rk/part.1 | xz -d | tar xf - -C /tmp/site || { echo "the Ray pack is incomplete"; exit 1; }
  export PATH=/tmp/site/bin:$PATH
fi
if ls .whl/fix/*.whl >/dev/null 2>&1; then  # wheels that replace the image's own (grpcio for Serve's reflection)
  python3 -m pip install -q --no-deps --no-index --upgrade --target /tmp/site .whl/fix/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
