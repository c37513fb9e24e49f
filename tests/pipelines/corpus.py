"""Small on-disk corpora for the backfill tests: good rows of every kind, and every kind of bad input.

`write_corpus(root)` writes the files and returns a `Corpus`: the sources to configure, the items each good
id must be embedded from (for parity with `Embedder.embed_batch`), and the (stage, reason kind) each bad id
must be recorded with. Ids without an id column are computed here independently of `pipelines.readers`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import SourceConfig
from tests.conftest import image_bytes


def documented_content_id(text: str | None, image_ref: str | None) -> str:
    """The content hash as the README documents it (recomputed here, not imported)."""
    canonical = json.dumps({"image": image_ref, "text": text}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


def huge_png_header(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG that declares width x height pixels but carries no pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@dataclass
class Corpus:
    sources: list[SourceConfig]
    good: dict[str, Any] = field(default_factory=dict)  # id -> the item embed_batch gets
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (stage, reason kind)
    duplicates: int = 0
    read: int = 0

    @property
    def ids(self) -> set[str]:
        return set(self.good) | set(self.bad)


def write_corpus(root: Path) -> Corpus:
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(image_bytes(1, (80, 60)))
    (images / "sub" / "b.JPG").write_bytes(image_bytes(2, (64, 96), "JPEG"))
    whole = image_bytes(3, (120, 120))
    (images / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (images / "notes.png").write_text("this is a text file with an image extension")
    (images / "empty.png").write_bytes(b"")
    (images / "huge.png").write_bytes(huge_png_header())
    (images / "readme.txt").write_text("not listed: wrong extension")

    pair_image = root / "pair.png"
    pair_image.write_bytes(image_bytes(4, (70, 50)))
    lines = [
        json.dumps({"id": "t1", "text": "the first text", "lang": "en"}),
        json.dumps({"id": "t2", "text": "der zweite Text", "lang": "de"}),
        json.dumps({"id": "t3", "text": "a third one, with a number", "lang": 3}),
        json.dumps({"id": "t-blank", "text": "   \t", "lang": "en"}),
        json.dumps({"id": "t-empty", "text": "", "lang": "en"}),
        json.dumps({"id": "t-null", "text": None, "lang": "en"}),
        json.dumps({"id": "t-missing", "lang": "en"}),
        json.dumps({"id": "t1", "text": "the first text", "lang": "en"}),  # the same row again: one row
        "{not json at all",
    ]
    texts = root / "texts.jsonl"
    texts.write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"id": "t-bytes", "text": "caf\xe9 latin-1", "lang": "fr"}\n'
    )

    pairs = root / "pairs.jsonl"
    pair_rows = [
        {"text": "a caption for the pair", "image": "pair.png"},
        {"text": "a caption for the pair", "image": "pair.png"},  # the same content twice: one row
        {"text": "an image that is not there", "image": "missing.png"},
        {"image": "pair.png"},  # image only
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))

    csv_file = root / "texts.csv"
    csv_file.write_bytes(b'id,text,lang\nc1,"a csv text, with a comma",en\nc-empty,,en\nc-bytes,caf\xe9,fr\n')

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = root / "blobs.parquet"
    good_blob = image_bytes(5, (64, 64))
    pq.write_table(
        pa.table(
            {
                "key": ["p1", "p-corrupt"],
                "blob": [good_blob, b"\x89PNG\r\n\x1a\n not really"],
                "caption": ["inline image bytes", None],
            }
        ),
        parquet,
    )

    sources = [
        SourceConfig(kind="images", path=str(images), name="images"),
        SourceConfig(kind="jsonl", path=str(texts), name="texts", id_column="id", keep_columns=["lang"]),
        SourceConfig(kind="jsonl", path=str(pairs), name="pairs"),
        SourceConfig(kind="csv", path=str(csv_file), name="csv", id_column="id", keep_columns=["lang"]),
        SourceConfig(
            kind="parquet",
            path=str(parquet),
            name="blobs",
            id_column="key",
            image_column="blob",
            text_column="caption",
        ),
    ]
    pair_id = documented_content_id("a caption for the pair", "pair.png")
    corpus = Corpus(sources=sources)
    corpus.good = {
        "a.png": {"image": str(images / "a.png")},
        "sub/b.JPG": {"image": str(images / "sub" / "b.JPG")},
        "t1": "the first text",
        "t2": "der zweite Text",
        "t3": "a third one, with a number",
        pair_id: {"text": "a caption for the pair", "image": str(pair_image)},
        documented_content_id(None, "pair.png"): {"image": str(pair_image)},
        "c1": "a csv text, with a comma",
        "p1": {"text": "inline image bytes", "image": good_blob},
    }
    corpus.bad = {
        "truncated.png": ("prepare", "image_decode"),
        "notes.png": ("prepare", "image_decode"),
        "empty.png": ("prepare", "image_decode"),
        "huge.png": ("prepare", "image_too_large"),
        "t-blank": ("prepare", "empty_text"),
        "t-empty": ("prepare", "empty_text"),
        "t-null": ("prepare", "invalid_item"),
        "t-missing": ("prepare", "invalid_item"),
        "t-bytes": ("read", "invalid_utf8"),
        hashlib.sha256(b"raw\0{not json at all").hexdigest()[:32]: ("read", "invalid_json"),
        documented_content_id("an image that is not there", "missing.png"): ("prepare", "image_unreadable"),
        "c-empty": ("prepare", "invalid_item"),
        "c-bytes": ("read", "invalid_utf8"),
        "p-corrupt": ("prepare", "image_decode"),
    }
    corpus.duplicates = 2  # t1 again, the pair again
    corpus.read = len(corpus.good) + len(corpus.bad) + corpus.duplicates
    return corpus
