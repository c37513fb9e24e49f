#!/usr/bin/env bash
# On this machine, before the device run: fetch the few wheels the GPU machine lacks into .whl/bench (ignored
# by git, carried with the call). The GPU image has torch 2.11 and transformers 5.17 but no pydantic; we carry
# transformers 5.24 (what the tests here run) and pydantic, nothing else. About 17 MB.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .whl/bench && mkdir -p .whl/bench
plats=""
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64; do
  plats="$plats --platform $p"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plats \
  -d .whl/bench transformers==5.24.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 "regex>=2025.10.22"
ls -la .whl/bench
echo "now: a device run with carry [\".whl/bench\"] and command \"bash benchmarks/device_run.sh\", timeout_s 570"
