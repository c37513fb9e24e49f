"""The load-test script end to end, as the GPU run uses it: it starts its own Ray and Serve (here in
high-throughput mode, HAProxy in front), drives the levels, prints a row per level with each process kind's CPU
per request, writes JSON, and holds requests/s to `--min-speedup`."""

import json
import os
import subprocess
import sys

import pytest

from serve.high_throughput import ENV

pytestmark = pytest.mark.slow


def test_a_high_throughput_run_reports_every_level_through_haproxy(tmp_path):
    out = tmp_path / "serve.json"
    env = {k: v for k, v in os.environ.items() if k not in ENV and k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_test", "--serve", "tiny", "--concurrency", "1", "4"]
        + ["--requests", "24", "--serve-option", "high_throughput=true", "--json", str(out)]
        + ["--min-speedup", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.getcwd(),
    )
    # the impossible --min-speedup fails the run, after every level was measured and written
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: speedup" in result.stderr
    report = json.loads(out.read_text())
    assert [row["concurrency"] for row in report["rows"]] == [1, 4]
    assert all(row["ok"] == row["requests"] >= 24 and row["errors"] == 0 for row in report["rows"])
    assert report["speedup"] == pytest.approx(
        report["rows"][1]["requests_per_s"] / report["rows"][0]["requests_per_s"]
    )
    for row in report["rows"]:  # the model's step rate: its batches over the level's wall time
        assert row["server_batches_per_s"] == pytest.approx(row["server_batches"] / row["wall_s"])
        # the model replica's forward passes: part of the level's time, and some CPU for every item
        assert 0 < row["forward_busy"] <= 1 and row["forward_cpu_ms_per_item"] > 0
        assert 0 < row["server_calls"] <= row["requests"]
    assert sum("batches (" in line and "/s)" in line for line in result.stdout.splitlines()) == 2
    cpu_lines = [line for line in result.stdout.splitlines() if "cpu ms/request" in line]
    assert len(cpu_lines) == 2 and all("haproxy" in line and "ingress" in line for line in cpu_lines)
