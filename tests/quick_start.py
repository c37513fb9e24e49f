"""The README quick start's main job (backfill the bundled sample into ./data/lancedb on a new local Ray, then
search it), run as written in a fresh directory. One run serves the session (`quick_start` in conftest.py):
tests/test_readme.py checks what it printed, tests/pipelines/test_backfill.py what the backfill command wrote to
the terminal and to Ray's log files, and tests/test_readme_retrieval.py works on its table, so the sample is
backfilled once instead of three times."""

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
    steps: list[subprocess.CompletedProcess]  # the backfill, then the search (the first that fails is last)
    ray_tmp: Path  # RAY_TMPDIR of its run: Ray's session and log files are under ray/

    @property
    def returncode(self) -> int:
        return self.steps[-1].returncode

    @property
    def stdout(self) -> str:
        return "".join(step.stdout for step in self.steps)

    @property
    def stderr(self) -> str:
        return "".join(step.stderr for step in self.steps)


def run_main_job(directory: Path, ray_tmp: Path) -> QuickStart:
    """The main job from its backfill on (the venv set-up before it is the one the tests run in), one step
    after the other as `&&` runs them, with Ray's files under `ray_tmp` (short: Ray's socket paths) and a new
    vlm-embed home (the tiny model built there)."""
    steps = quick_start_commands()[0].split(" && ")
    assert steps[2].endswith("vlm-embed backfill") and "vlm-embed search" in steps[3], steps
    # its own local Ray, as on a fresh machine; this checkout's code, whichever one the scripts came from
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp), "VLM_EMBED_HOME": str(directory / ".home")}
    done = []
    for step in steps[2:]:
        command = step.replace(".venv/bin/", f"{BIN}/")
        done.append(
            subprocess.run(
                command, shell=True, capture_output=True, text=True, cwd=directory, timeout=600, env=env
            )
        )
        if done[-1].returncode != 0:
            break
    return QuickStart(directory, done, ray_tmp)
