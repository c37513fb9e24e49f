"""The small sample corpus shipped with the package: texts, images and text+image pairs."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_DIR = Path(__file__).parent / "sample_data"


def _jsonl(name: str) -> list[dict]:
    with (SAMPLE_DIR / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def sample_texts() -> list[dict]:
    """Rows with `id` and `text`."""
    return _jsonl("texts.jsonl")


def sample_pairs() -> list[dict]:
    """Rows with `id`, `image` (a path relative to the sample directory) and `text` (its caption)."""
    return _jsonl("pairs.jsonl")


def sample_image_paths() -> list[Path]:
    return sorted((SAMPLE_DIR / "images").glob("*.png"))


def sample_items() -> list[tuple[str, object]]:
    """(label, item) for a few texts, every image alone, and every image with its caption."""
    items: list[tuple[str, object]] = [
        (f"text: {row['text'][:32]}", row["text"]) for row in sample_texts()[:6]
    ]
    for row in sample_pairs():
        path = str(SAMPLE_DIR / row["image"])
        items.append((f"image: {Path(path).stem}", {"image": path}))
        items.append((f"pair: {Path(path).stem}", {"text": row["text"], "image": path}))
    return items
