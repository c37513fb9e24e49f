"""The README's commands and code are run here, so the README stays true."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _quick_start():
    block = _blocks("bash")[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_quick_start_is_two_commands_that_set_up_then_run():
    main_job, tests = _quick_start()
    for command in (main_job, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e ")
    assert tests.endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set up, then run the tests" in ci and "README.md" in ci


def test_quick_start_main_job_runs(tmp_path):
    main_job = _quick_start()[0]
    run_part = main_job.split(" && ")[-1].replace(".venv/bin/", f"{BIN}/")
    result = subprocess.run(
        run_part, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=600, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert "cosine similarity" in result.stdout


def test_python_example_runs(tmp_path):
    (code,) = _blocks("python")[:1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    assert "(3, 64) [0] ['item 1: text is empty or only whitespace']" in result.stdout


def test_command_line_examples_run(tmp_path):
    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")
    block = next(b for b in _blocks("bash") if "vlm-embed embed" in b and "make-tiny-model" in b)
    for line in block.splitlines():
        command = line.split("#")[0].strip()
        result = subprocess.run(
            f"{BIN}/{command}",
            shell=True,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
            env=os.environ,
        )
        assert result.returncode == 0, f"{command}: {result.stderr}"
    assert (tmp_path / "tiny-qwen3-vl" / "config.json").exists()
