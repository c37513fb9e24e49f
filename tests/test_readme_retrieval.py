"""The README's "Smaller vectors, hybrid search and RAG context" commands and code, run as written on the sample
table of the quick start (the session's run of it, tests/quick_start.py, copied here under tmp_path)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def _block(language: str, marker: str) -> str:
    return next(b for b in re.findall(rf"```{language}\n(.*?)```", README, flags=re.S) if marker in b)


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's code, whichever one the console script was installed from
    return subprocess.run(command, shell=True, capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def test_reduce_search_modes_and_retrieve_context_run_as_written(tmp_path, quick_start):
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")
    assert quick_start.returncode == 0, quick_start.stderr[-3000:]
    shutil.copytree(quick_start.directory / "data", tmp_path / "data")  # the reduce commands add tables
    outputs = []
    for line in _block("bash", "vlm-embed reduce").splitlines():
        command = line.split(" #")[0].strip()
        result = _run(f"{BIN}/{command}", tmp_path)
        assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert "wrote table 'vectors_pca16_int8': pca, 16 dimensions, int8, 16 bytes per vector" in outputs[1]
    first = outputs[3].splitlines()[0].split("\t")
    assert first[2:] == ["text-00", "A red circle is a round shape with no corners."]
    assert float(first[1]) > 0.99  # its own row, through the projected int8 query
    assert all("circle" in line.lower() for line in outputs[4].splitlines())
    again = _run(f"{BIN}/{_block('bash', 'vlm-embed reduce').splitlines()[0]}", tmp_path)
    assert again.returncode == 2 and "table 'vectors_pca16' already exists" in again.stderr
    code = _block("python", "retrieve_context")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "red_circle.png" in result.stdout
