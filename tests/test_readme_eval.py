"""The README's sentence-transformers and eval commands run as written, and give the comparison it shows."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_backend_and_eval_commands_run_and_give_the_comparison_shown(tmp_path):
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")
    (setup,) = bash_blocks(section("A CPU text model: sentence-transformers"))
    eval_section = section("Retrieval quality: vlm-embed eval")
    (commands,) = bash_blocks(eval_section)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # their own local Ray, as a user's
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", "-e", "-c", setup + commands],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=1200,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith('{"index": 0, "embedding": [')
    minilm = json.loads((tmp_path / "minilm.json").read_text())["runs"][0]
    tiny = json.loads((tmp_path / "tiny.json").read_text())["runs"][0]
    assert minilm["metrics"]["ndcg@10"] > 0.9 > 0.1 > tiny["metrics"]["ndcg@10"]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # the metric rows the README shows are the ones printed, to within other CPUs' rounding (latency varies
    # from machine to machine and is not compared)
    shown = re.search(r"```text\n(.*?)```", eval_section, flags=re.S).group(1)
    for name in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "random ndcg@10"):
        # the last such line: the --compare table (each eval run prints its own before it)
        printed = [line for line in result.stdout.splitlines() if line.startswith(name + " ")][-1]
        expected = next(line for line in shown.splitlines() if line.startswith(name + " "))
        values = [float(v) for v in printed[len(name) :].split()]
        assert values == pytest.approx([float(v) for v in expected[len(name) :].split()], abs=0.01), name
    hits = [line.split("\t") for line in result.stdout.splitlines() if re.match(r"^\d\t", line)]
    assert hits[0][2] == "weather-1"
