"""The soak script end to end for a few seconds on the tiny model: it starts its own Ray and Serve, sends good and
bad requests, samples the Serve processes' memory and file descriptors, and writes what it saw."""

import json
import os
import subprocess
import sys

import pytest

from serve.high_throughput import ENV

pytestmark = pytest.mark.slow


def test_a_short_soak_answers_every_request_without_a_5xx_and_samples_the_serve_processes(tmp_path):
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if k not in ENV and k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--serve", "tiny", "--duration", "6", "--sample-every", "2"]
        + ["--concurrency", "2", "--warmup", "0", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.getcwd(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    samples, summary = report["samples"], report["summary"]
    assert len(samples) >= 4  # the baseline, one every 2 s, the last
    assert summary["totals"]["2xx"] > 0 and summary["totals"]["4xx"] > 0
    assert summary["totals"]["5xx"] == summary["totals"]["errors"] == summary["totals"]["unexpected"] == 0
    for kind in ("proxy", "controller", "ingress", "model"):
        seen = summary["processes"][kind]
        assert seen["rss_mib"][1] > 10 and seen["fds"][1] > 0, (kind, seen)
        # the processes of the Ray instance the soak started, one of each, whatever else runs on the machine
        assert samples[-1]["processes"][kind]["processes"] == 1, (kind, samples[-1]["processes"])
    assert "totals:" in result.stdout and "model: RSS" in result.stdout
