#!/usr/bin/env bash
# On this machine, before the device runs: fetch what the GPU machine lacks (ignored by git, carried with the calls).
#   bash benchmarks/device_prepare.sh          -> .whl/bench: transformers 5.24 + pydantic + orjson + simplejpeg +
#                                                 sqlglot, about 22 MB
#   bash benchmarks/device_prepare.sh --ray    -> also .devwheels/q1 and q2: Ray 2.60 (data, serve) and LanceDB 0.40,
#                                                 installed here for cp312, trimmed and xz-compressed (~95 MB in two
#                                                 parts; about 4 minutes on 2 cores), and py-spy in q2
# The GPU image has torch 2.11 and transformers 5.17 but no pydantic, Ray or LanceDB. One call carries at most
# 64 MiB, so the Ray pack travels in two parts: q1 with the bench call (device_run.sh stashes it in /tmp/rk),
# q2 with the next call on the same warm machine (device_ray.sh joins and unpacks them). Compared with
# ../shared/tools/device-wheels (wheels as they are, 4 parts of 60 MiB), this saves two calls: pylance is not
# needed (we write through LanceDB's own API), Ray's Java jars and RLlib are dropped, and xz packs tighter.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
plats=""
for p in manylinux_2_5_x86_64 manylinux1_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  plats="$plats --platform $p"
done
target="--only-binary=:all: --python-version 3.12 --implementation cp $plats"
rm -rf .whl/bench && mkdir -p .whl/bench
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps $target -d .whl/bench transformers==5.24.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 "regex>=2025.10.22" \
  "orjson>=3.10" "simplejpeg>=1.8,<2" "sqlglot>=30,<31"  # JPEG truncation checks, search filters
ls -la .whl/bench
if [ "${1:-}" = --ray ]; then
  work=$(mktemp -d)
  # shellcheck disable=SC2086
  python3 -m pip download -q $target -d "$work/dl" "ray[data,serve]==2.60.0" lancedb==0.40.0 \
    "grpcio>=1.85.1"
  # what the GPU image already has (KINDS.md; the list the shared device-wheels tool keeps) stays behind
  have=$(sed -n '/^HAVE="/,/"$/p' ../shared/tools/device-wheels | tr -d '"' | sed 's/^HAVE=//' | tr ' ' '\n')
  mkdir -p "$work/keep"
  for f in "$work"/dl/*.whl; do
    name=$(basename "$f" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
    case $name in pydantic|pydantic-core|annotated-types|typing-inspection) continue ;; esac  # in .whl/bench
    # grpcio: Serve imports grpc_reflection, whose generated code wants a newer grpcio than the image's 1.84
    [ "$name" = grpcio ] || ! grep -qx -- "$name" <<<"$have" && cp "$f" "$work/keep/"
  done
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-deps --no-compile --no-index $target --target "$work/site" "$work"/keep/*.whl
  rm -rf "$work/site/ray/jars" "$work/site/ray/rllib"
  find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
  tar cf - -C "$work/site" . | xz -T0 -6 >"$work/ray.tar.xz"
  rm -rf .devwheels/q1 .devwheels/q2 && mkdir -p .devwheels/q1 .devwheels/q2
  grep -qx '/.devwheels/' .git/info/exclude 2>/dev/null || echo '/.devwheels/' >>.git/info/exclude
  head -c 44M "$work/ray.tar.xz" >.devwheels/q1/part.0
  tail -c +$((44 * 1024 * 1024 + 1)) "$work/ray.tar.xz" >.devwheels/q2/part.1
  # py-spy for device_serve_profile.sh (3 MB, a static binary in a wheel)
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps $target -d .devwheels/q2 "py-spy>=0.4"
  rm -rf "$work"
  ls -la .devwheels/q1 .devwheels/q2
fi
echo "device call 1: carry [\".whl/bench\", \".devwheels/q1\"], command \"bash benchmarks/device_run.sh\", timeout_s 420"
echo "device call 2 (within 30 s, same machine): carry [\".devwheels/q2\"], command \"bash benchmarks/device_ray.sh\""
