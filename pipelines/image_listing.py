"""An image folder's listing, streamed to a Parquet file beside the table, so that the driver holds O(units).

A folder source has no file to cut into units: its rows are its files. The driver walks it once per run
(`readers.iter_images`: one folder's listing held at a time, in a fixed order) and writes each row (`id`, the
image's URI, or the reason a folder could not be listed) to `<table uri>/_listings/<table>-<source>.parquet`,
one row group of `unit_files` rows per work unit; it keeps only the units (their row group, their rows and a
digest of their ids). A read task reads its unit's row group back. The file is written again by every run (a
rerun must see new files) and removed when the run ends.

Hand-written because what the field ships lists in the driver too: Ray Data's `read_images` and file-based
datasources collect every path in the driver process before any read task starts, and LanceDB has no listing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.config import SourceConfig

LISTINGS = "_listings"


@dataclass(frozen=True)
class ListingPlace:
    """Where a run's listings go: the table's database (a directory or an object-store URI) and its keys."""

    uri: str
    table: str
    storage_options: tuple = ()  # sorted (key, value) pairs

    def path(self, source: int) -> str:
        return f"{self.uri.rstrip('/')}/{LISTINGS}/{self.table}-{source}.parquet"

    def filesystem(self):
        from pipelines.readers import filesystem_for

        return filesystem_for(self.uri, dict(self.storage_options) or None)


def listing_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("image_uri", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class Chunk:
    """One written row group: its index, its first row's ordinal, its rows, the digest of its ids."""

    group: int
    start: int
    rows: int
    digest: str


def ids_digest(ids: list[str]) -> str:
    """The digest a chunk of images is keyed by (the same as when the driver held the rows: the JSON list)."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def write_listing(
    rows: Iterator[dict[str, Any]], place: ListingPlace, source: int, unit_files: int
) -> tuple[str, list[Chunk]]:
    """Write `rows` (`readers.iter_images`) as row groups of `unit_files` rows; (the file, its chunks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    from pipelines.work_units import fs_path

    path = place.path(source)
    filesystem = place.filesystem()
    location = fs_path(path)
    # only a local table has folders to make: on an object store pyarrow would write folder-marker objects
    if isinstance(filesystem, fs.LocalFileSystem):
        filesystem.create_dir(location.rsplit("/", 1)[0], recursive=True)
    chunks: list[Chunk] = []
    schema = listing_schema()
    with pq.ParquetWriter(location, schema, filesystem=filesystem) as writer:
        held: list[dict[str, Any]] = []

        def flush() -> None:
            ids = [r["id"] for r in held]
            columns = {
                "id": ids,
                "image_uri": [r["image_uri"] for r in held],
                "reason": [r["reason"] if r["status"] == "error" else None for r in held],
            }
            writer.write_table(pa.table(columns, schema=schema), row_group_size=len(held))
            start = chunks[-1].start + chunks[-1].rows if chunks else 0
            chunks.append(Chunk(len(chunks), start, len(held), ids_digest(ids)))
            held.clear()

        for row in rows:
            held.append(row)
            if len(held) >= unit_files:
                flush()
        if held:
            flush()
    return path, chunks


def read_chunk(path: str, group: int, storage_options: dict | None, source: SourceConfig):
    """The rows of one written row group, as the readers make them (a todo row, or the folder's error row)."""
    import pyarrow.parquet as pq

    from pipelines.readers import empty_row, error_row, filesystem_for
    from pipelines.work_units import fs_path

    filesystem = filesystem_for(path, storage_options)
    with filesystem.open_input_file(fs_path(path)) as handle:
        table = pq.ParquetFile(handle).read_row_group(group)
    for row in table.to_pylist():
        if row["reason"] is None:
            yield empty_row(source, row["id"]) | {"image_uri": row["image_uri"], "status": "todo"}
        else:
            kind, _, message = row["reason"].partition(": ")  # as error_row wrote it: "<kind>: <message>"
            yield error_row(source, row["id"], kind, message)


def remove_listings(place: ListingPlace, sources: range | list[int]) -> None:
    """Remove these sources' listing files (missing ones are fine)."""
    from pipelines.work_units import fs_path

    filesystem = place.filesystem()
    for source in sources:
        with contextlib.suppress(OSError):  # FileNotFoundError is one
            filesystem.delete_file(fs_path(place.path(source)))
