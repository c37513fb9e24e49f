"""The README's commands and code are run here, so the README stays true."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.quick_start import quick_start_commands

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_is_two_commands_that_set_up_then_run():
    main_job, tests = quick_start_commands()
    for command in (main_job, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e ")
    assert tests.endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set up, then run the tests" in ci and "README.md" in ci


def test_quick_start_main_job_runs(quick_start):
    """Backfill the bundled sample on a local Ray into ./data/lancedb (here: a fresh directory), then search it
    (the run is tests/quick_start.py's, shared with test_backfill and test_readme_retrieval)."""
    result = quick_start
    assert result.returncode == 0, result.stderr[-4000:]
    assert "backfill: read 24 = embedded 24 + skipped 0" in result.stdout
    first_hit = next(line for line in result.stdout.splitlines() if line.startswith("1\t"))
    assert first_hit.split("\t")[1:] == [
        "1.0000",
        "text-00",
        "A red circle is a round shape with no corners.",
    ]
    assert (quick_start.directory / "data" / "lancedb" / "vectors.lance").is_dir()


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


def test_backfill_examples_name_real_options_and_files():
    """The Backfill section's commands parse with the real parsers, and the files they name exist and validate."""
    import argparse
    import shlex

    from pipelines.backfill import add_backfill_arguments
    from pipelines.cli import build_parser
    from pipelines.config import Config

    section = README.split("## Backfill", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line.replace('"$PWD', '"/abs')) for line in lines if line]
    checked = 0
    for argv in commands:
        if argv[:1] == ["ray"]:
            argv = argv[argv.index("--") + 1 :]
        if argv[:3] == ["python", "-m", "pipelines.backfill"]:
            args = argv[3:]
            parser = argparse.ArgumentParser()
            add_backfill_arguments(parser)
            parser.parse_args(args)
        elif argv[:1] == ["vlm-embed"]:
            args = argv[1:]
            build_parser().parse_args(args)
        else:
            assert argv[0] == "cluster/local.sh" and os.access(ROOT / argv[0], os.X_OK), argv
            continue
        checked += 1
        for flag, value in zip(args, args[1:], strict=False):
            if flag == "--config":
                Config.from_yaml(ROOT / value)
            elif flag in ("--image", "--source"):
                assert (ROOT / value.split(":")[-1]).exists(), value
    assert checked >= 5
