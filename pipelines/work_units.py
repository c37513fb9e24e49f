"""Work units: the deterministic pieces a backfill's inputs are split into, and reading one of them.

A backfill resumes by unit, not by id: the driver plans the units (O(units) state, never O(rows)), skips the
ones the progress table records as committed without reading them, and reads the rest, one Ray Data read task
per unit. The split, chosen so that the same inputs always give the same units:

- JSONL (uncompressed): byte ranges of `unit_bytes`. A range owns the lines whose first byte lies in it, so
  every line belongs to exactly one range whatever the range size.
- JSONL compressed (`.gz`, `.bz2`, `.zst`, ...) and CSV: one file (a CSV field may hold a newline, so a CSV file
  cannot be cut at a byte offset; a compressed stream cannot be entered mid-way).
- Parquet: one row group.
- Image folders: `unit_files` images of the sorted listing, which the driver streams to a Parquet file beside
  the table, a row group per unit (`pipelines.image_listing`), holding only the units.

A unit's key names its source, its file, its range and the file's size (a file that grew is new work); a
chunk of images is keyed by a digest of its paths. Inputs that change under the same key are not detected.
Every row carries its `origin`, "<unit index>:<row number in the unit>", which the stages use to claim ids and
the writer to count the rows of each unit.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipelines.config import SourceConfig
from pipelines.image_listing import ListingPlace
from pipelines.kept import kept_column, kept_types
from pipelines.readers import (
    ROWS_PER_BLOCK,
    TABLE_EXTENSIONS,
    _csv_rows,
    _jsonl_rows,
    build_row,
    expand_paths,
    filesystem_for,
    is_uri,
    iter_images,
    row_schema,
)

COMPRESSED = (".gz", ".bz2", ".zst", ".zstd", ".lz4", ".br", ".snappy")
HEAD_BYTES = 64 * 2**10  # read to estimate a JSONL file's rows per byte


@dataclass(frozen=True)
class WorkUnit:
    """One deterministic piece of one source: a byte range, a file, a row group or a chunk of images."""

    source: int  # index into the job's sources
    kind: str  # "range", "file", "row_group" or "images"
    path: str
    start: int = 0  # byte offset (range), row group index (row_group), first image (images)
    end: int = 0  # byte end (range), first row number of the group (row_group), last image + 1 (images)
    size: int = 0  # the file's size in bytes
    rows: int = 0  # rows, estimated (range, file) or exact (row_group, images)
    digest: str = ""  # images: of the chunk's ids
    listing: str = field(default="", compare=False)  # images: the listing file; `group` is its row group
    group: int = field(default=0, compare=False)
    listing_options: tuple = field(default=(), compare=False, repr=False)  # the listing's storage options

    @property
    def key(self) -> str:
        if self.kind == "images":
            return f"{self.source}|images|{self.path}|{self.start}-{self.end}|{self.digest}"
        return f"{self.source}|{self.kind}|{self.path}|{self.start}-{self.end}|{self.size}"


# -- planning ------------------------------------------------------------------------------------------------


def plan_units(
    sources: list[SourceConfig], unit_bytes: int, unit_files: int, listings: ListingPlace | None = None
) -> list[WorkUnit]:
    """Every source's units, in a fixed order (sources as given, files sorted). Image folders' listings are
    written to `listings` (the backfill: beside the table; default: a new local temporary directory)."""
    units: list[WorkUnit] = []
    for index, source in enumerate(sources):
        if source.kind == "images":
            if listings is None:
                import tempfile

                listings = ListingPlace(tempfile.mkdtemp(prefix="vlm-embed-listings-"), "units")
            units.extend(_image_units(index, source, unit_files, listings))
            continue
        filesystem = filesystem_for(source.path, source.storage_options)
        for path, size in _table_files(source, filesystem):
            units.extend(_file_units(index, source, filesystem, path, size, unit_bytes))
    return units


def waves(units: list[tuple[int, WorkUnit]], rows: int) -> list[list[tuple[int, WorkUnit]]]:
    """Consecutive (number, unit) pairs grouped so that each group holds about `rows` rows (a bigger unit is a
    group alone)."""
    groups: list[list[tuple[int, WorkUnit]]] = []
    current: list[tuple[int, WorkUnit]] = []
    held = 0
    for pair in units:
        size = max(pair[1].rows, 1)
        if current and held + size > rows:
            groups.append(current)
            current, held = [], 0
        current.append(pair)
        held += size
    if current:
        groups.append(current)
    return groups


def _table_files(source: SourceConfig, filesystem) -> list[tuple[str, int]]:
    """(path, size) of every file the source reads, sorted; folders recursively, names starting with `.` or
    `_` skipped (Ray Data's rule)."""
    from pyarrow import fs

    extensions = tuple("." + e for e in TABLE_EXTENSIONS[source.kind])
    found: list[tuple[str, int]] = []
    for path in expand_paths(source):
        location = fs_path(path)
        info = filesystem.get_file_info(location)
        if info.type == fs.FileType.NotFound:
            raise FileNotFoundError(f"source {source.label!r}: {path} does not exist")
        if info.type == fs.FileType.File:
            found.append((path, info.size))
            continue
        for entry in sorted(filesystem.get_file_info(fs.FileSelector(location, recursive=True)), key=_path):
            relative = entry.path[len(location.rstrip("/")) + 1 :]
            hidden = any(part.startswith((".", "_")) for part in relative.split("/"))
            name = entry.base_name.lower()
            if (
                entry.type == fs.FileType.File
                and not hidden
                and _strip_compression(name).endswith(extensions)
            ):
                found.append((_uri_like(path, entry.path), entry.size))
    return found


def _path(info) -> str:
    return info.path


def _strip_compression(name: str) -> str:
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def fs_path(path: str) -> str:
    """The path a pyarrow filesystem takes: a URI without its scheme, a local path made absolute."""
    return path.split("://", 1)[1].rstrip("/") if is_uri(path) else os.path.abspath(path)


def _uri_like(root: str, found: str) -> str:
    return f"{root.split('://', 1)[0]}://{found}" if is_uri(root) else found


def _file_units(index, source, filesystem, path: str, size: int, unit_bytes: int) -> list[WorkUnit]:
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        with filesystem.open_input_file(fs_path(path)) as handle:
            metadata = pq.ParquetFile(handle).metadata
        units, first = [], 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            units.append(WorkUnit(index, "row_group", path, group, first, size, rows))
            first += rows
        return units
    splittable = source.kind == "jsonl" and _strip_compression(path.lower()) == path.lower()
    rows = _estimate_rows(filesystem, path, size) if splittable else max(size // 100, 1)
    if not splittable or size <= unit_bytes:
        return [WorkUnit(index, "file", path, 0, size, size, rows)]
    per_byte = rows / max(size, 1)
    return [
        WorkUnit(
            index,
            "range",
            path,
            start,
            min(start + unit_bytes, size),
            size,
            max(int(per_byte * unit_bytes), 1),
        )
        for start in range(0, size, unit_bytes)
    ]


def _estimate_rows(filesystem, path: str, size: int) -> int:
    if size == 0:
        return 0
    with filesystem.open_input_file(fs_path(path)) as handle:
        head = handle.read(HEAD_BYTES)
    lines = max(head.count(b"\n"), 1)
    return max(int(size * lines / max(len(head), 1)), 1)


def _image_units(index: int, source: SourceConfig, unit_files: int, place: ListingPlace) -> list[WorkUnit]:
    from pipelines.image_listing import remove_listings, write_listing

    rows = (
        row for path in expand_paths(source) for row in iter_images(source.model_copy(update={"path": path}))
    )
    listing, chunks = write_listing(rows, place, index, unit_files)
    if not chunks:
        remove_listings(place, [index])
        raise FileNotFoundError(f"source {source.label!r}: no {source.extensions} files under {source.path}")
    return [
        WorkUnit(
            index,
            "images",
            source.path,
            c.start,
            c.start + c.rows,
            0,
            c.rows,
            digest=c.digest,
            listing=listing,
            group=c.group,
            listing_options=place.storage_options,
        )
        for c in chunks
    ]


# -- reading -------------------------------------------------------------------------------------------------


def read_unit(
    unit: WorkUnit, number: int, source: SourceConfig, kept: dict[str, str] | None = None
) -> Iterator[Any]:
    """The unit's rows in the common layout (`readers.row_schema`), in blocks of `ROWS_PER_BLOCK` rows, each
    with its `origin`; `number` is the unit's index in this run. `kept`: the run's kept columns and types
    (`kept.kept_types` of all its sources, so every source's blocks have one schema; default: this source's)."""
    kept = kept_types([source]) if kept is None else kept
    schema = row_schema(kept)
    rows: list[dict[str, Any]] = []
    for ordinal, row in enumerate(_unit_rows(unit, source)):
        rows.append(row | {"origin": f"{number}:{ordinal}"})
        if len(rows) >= ROWS_PER_BLOCK:
            yield _block(rows, schema, kept)
            rows = []
    if rows:
        yield _block(rows, schema, kept)


def _block(rows: list[dict[str, Any]], schema, kept: dict[str, str]):
    """One Arrow block of rows, their kept values typed; a row whose kept value does not fit is an error row."""
    import pyarrow as pa

    column, bad = kept_column([row["kept"] for row in rows], kept)
    for i, reason in bad.items():
        rows[i] |= {"status": "error", "stage": "read", "reason": reason, "image_bytes": None}
    table = pa.Table.from_pylist([row | {"kept": None} for row in rows], schema=schema)
    return table.set_column(schema.get_field_index("kept"), schema.field("kept"), column)


def _unit_rows(unit: WorkUnit, source: SourceConfig) -> Iterator[dict[str, Any]]:
    if unit.kind == "images":
        from pipelines.image_listing import read_chunk

        yield from read_chunk(unit.listing, unit.group, dict(unit.listing_options) or None, source)
        return
    filesystem = filesystem_for(unit.path, source.storage_options)
    location = fs_path(unit.path)
    if unit.kind == "row_group":
        yield from _row_group_rows(unit, source, filesystem, location)
        return
    if unit.kind == "range":
        data = _range_bytes(filesystem, location, unit.start, unit.end, unit.size)
        where = None if unit.start == 0 else f"{unit.path} (the range from byte {unit.start})"
        handle = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape", newline="")
        yield from _jsonl_rows(source, handle, unit.path, where)
        return
    parse = _jsonl_rows if source.kind == "jsonl" else _csv_rows
    with filesystem.open_input_stream(location, compression="detect") as stream:
        handle = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
        yield from parse(source, handle, unit.path)


def _range_bytes(filesystem, location: str, start: int, end: int, size: int) -> bytes:
    """The bytes of the lines that start in [start, end): from the first line start at or after `start` to the
    end of the line that holds byte `end - 1`."""
    with filesystem.open_input_file(location) as handle:
        low = max(start - 1, 0)
        handle.seek(low)
        data = handle.read(end - low)
        if start > 0:
            newline = data.find(b"\n")  # data[0] is byte start - 1: a line starts right after a newline
            data = data[newline + 1 :] if newline >= 0 else b""
        if data and not data.endswith(b"\n") and end < size:
            tail = []
            while True:
                chunk = handle.read(HEAD_BYTES)
                if not chunk:
                    break
                newline = chunk.find(b"\n")
                if newline >= 0:
                    tail.append(chunk[: newline + 1])
                    break
                tail.append(chunk)
            data += b"".join(tail)
    return data


def _row_group_rows(unit: WorkUnit, source: SourceConfig, filesystem, location: str):
    import pyarrow.parquet as pq

    with filesystem.open_input_file(location) as handle:
        table = pq.ParquetFile(handle).read_row_group(unit.start)
    base_dir = os.path.dirname(unit.path)
    for offset in range(0, table.num_rows, ROWS_PER_BLOCK):
        for number, raw in enumerate(
            table.slice(offset, ROWS_PER_BLOCK).to_pylist(), start=unit.end + offset
        ):
            yield build_row(source, raw, base_dir, f"{unit.path}: row {number}")


# -- Ray Data ------------------------------------------------------------------------------------------------


def units_dataset(units: list[tuple[int, WorkUnit]], sources: list[SourceConfig], ledger=None):
    """A Ray Dataset with one read task per (number, unit). `ledger` (a `commit_groups.UnitLedger` actor):
    each read task waits for its admission (the read-ahead window), then tells it how many rows its unit
    has, before it hands the rows on. A waiting read task holds no CPU, and at most `READ_TASKS` run at
    once; Ray Data launches them in the units' order, so the window's units are never held back by later
    ones."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    kept = kept_types(sources)
    schema = row_schema(kept)

    class UnitsDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(
                    functools.partial(_read_task, unit, number, sources[unit.source], kept, ledger),
                    BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[unit.path]),
                    schema=schema,
                )
                for number, unit in units
            ]

    return ray.data.read_datasource(
        UnitsDatasource(), override_num_blocks=max(len(units), 1), num_cpus=0, concurrency=READ_TASKS
    )


READ_TASKS = 4  # read tasks at once (each reads one unit, or waits for the window), holding no CPU: see
# `stages.build_pipeline` on Ray Data's CPU reservations


def _read_task(unit: WorkUnit, number: int, source: SourceConfig, kept: dict[str, str], ledger=None):
    if ledger is None:
        return list(read_unit(unit, number, source, kept))
    import ray

    ray.get(ledger.admit.remote(str(number)))
    blocks = list(read_unit(unit, number, source, kept))
    # before the rows go on: the driver knows a unit's size before its last row returns
    ray.get(ledger.read.remote(str(number), sum(b.num_rows for b in blocks)))
    return blocks
