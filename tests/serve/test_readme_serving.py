"""The README's Serving example runs against a real endpoint, so the README stays true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.serve.conftest import API_KEY
from tests.serve.test_search import write_table

ROOT = Path(__file__).resolve().parents[2]


def serving_python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"\n## Serving\n(.*?)\n## ", readme, flags=re.S).group(1)
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_the_serving_example_embeds_and_searches(main_app, table_uri, embedder):
    write_table(table_uri, embedder)
    code = serving_python_example()
    assert 'url = "http://127.0.0.1:8000"' in code
    code = code.replace('url = "http://127.0.0.1:8000"', f'url = "{main_app}"')
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "VLM_EMBED_API_KEY": API_KEY},
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    tokens = sum(embedder.prepare(t).num_tokens for t in ["a red circle", "a blue square"])
    assert first == f"2 {embedder.get_embedding_dimension()} {tokens}"
    assert second.startswith("200 [('t-red', 1.0), ")
