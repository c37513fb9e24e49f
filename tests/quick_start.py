"""The README quick start's main job (backfill the bundled sample into ./data/lancedb on a new local Ray, then
search it), run as written in a fresh directory. One run serves the session (`quick_start` in conftest.py):
tests/test_readme.py checks what it printed and tests/test_readme_retrieval.py works on its table, so the
sample is backfilled once instead of twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def quick_start_commands() -> list[str]:
    """The quick start's command lines: the main job, then the tests."""
    block = re.findall(r"```bash\n(.*?)```", README, flags=re.S)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


@dataclass
class QuickStart:
    directory: Path  # where it ran: ./data/lancedb is the sample table
    result: subprocess.CompletedProcess


def run_main_job(directory: Path) -> QuickStart:
    """The main job from its backfill on (the venv set-up before it is the one the tests run in)."""
    steps = quick_start_commands()[0].split(" && ")
    assert steps[2].endswith("vlm-embed backfill") and "vlm-embed search" in steps[3], steps
    run_part = " && ".join(steps[2:]).replace(".venv/bin/", f"{BIN}/")
    # its own local Ray, as on a fresh machine; this checkout's code, whichever one the scripts came from
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        run_part, shell=True, capture_output=True, text=True, cwd=directory, timeout=600, env=env
    )
    return QuickStart(directory, result)
