"""ARCHITECTURE.md names only modules that exist, and every module of the two packages is named there or in
README's Layout section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
MODULE = re.compile(r"\b([a-z0-9_]+)\.py\b")


def _named(text: str) -> set[str]:
    return set(MODULE.findall(text))


def _modules() -> set[str]:
    return {p.stem for package in ("pipelines", "serve") for p in (ROOT / package).glob("*.py")} - {
        "__init__"
    }


def test_every_module_architecture_md_names_exists():
    missing = _named((ROOT / "ARCHITECTURE.md").read_text()) - _modules()
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {sorted(missing)}"


def test_every_module_is_described_in_architecture_md_or_readme_layout():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    undescribed = _modules() - _named((ROOT / "ARCHITECTURE.md").read_text()) - _named(layout)
    assert not undescribed, (
        f"modules neither ARCHITECTURE.md nor README's Layout describes: {sorted(undescribed)}"
    )
