"""Importing the packages is cheap: no torch, transformers or Ray until something needs them."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "pipelines",
        "pipelines.config",
        "pipelines.recipes",
        "pipelines.items",
        "pipelines.prepare",
        "pipelines.batching",
        "pipelines.cli",
        "serve",
    ],
)
def test_import_does_not_pull_heavy_libraries(module):
    code = (
        f"import sys, {module}; heavy = [m for m in ('torch', 'transformers', 'ray', 'lancedb') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} imported {result.stdout.strip()}"
