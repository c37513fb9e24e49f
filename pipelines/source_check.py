"""Sources checked before any work: each exists, is readable, and has the columns its config names.

A typo in `text_column` would otherwise run to the end and record every row as an error (which a rerun then
skips as done), and a missing path would be refused only after Ray's start and after the errors table was made.
So `check_sources` runs first, in the driver, in a fraction of a second, and raises `SourceError` naming the
source, the file, the missing column and the columns the file has:

- Local paths and globs: every path must exist and be readable; a folder must hold at least one file of the
  source's kind (Ray Data's rule: recursive, names starting with `.` or `_` skipped).
- Columns (`id_column`, `text_column`, `image_column`, `keep_columns`) are looked up in the first file of the
  source (sorted): a CSV's header, a Parquet file's schema, the keys of a JSONL file's first `HEAD_ROWS`
  lines. Without `text_column` and `image_column`, the file must have a `text` or an `image` column.
- Object-store URIs (`s3://...`) are asked once, through pyarrow.fs (with the source's `storage_options`),
  whether they exist, and a single file's
  columns are checked the same way. Anything this check cannot decide (a scheme pyarrow does not know, no
  credentials on the driver, a network error) is left to Ray Data: a valid source is never refused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

from pipelines.config import SourceConfig
from pipelines.readers import TABLE_EXTENSIONS, expand_paths, is_uri

log = logging.getLogger(__name__)

HEAD_ROWS = 1000  # JSONL: the lines whose keys are the file's columns
HEAD_BYTES = 8 * 2**20


class SourceError(ValueError):
    """A source that cannot be read as configured; raised before any work starts."""


def check_sources(sources: Iterable[SourceConfig]) -> None:
    for source in sources:
        check_source(source)


def check_source(source: SourceConfig) -> None:
    if is_uri(source.path):
        _check_uri(source)
        return
    paths = expand_paths(source)  # FileNotFoundError for a missing path or a glob that matches nothing
    for path in paths:
        if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
            raise SourceError(f"source {source.label!r}: {path} is not readable")
    first = _first_file(source, paths)
    if source.kind != "images":
        columns, where = _local_columns(source, first)
        _check_columns(source, first, columns, where)


# -- which file ----------------------------------------------------------------------------------------------


def _extensions(source: SourceConfig) -> list[str]:
    if source.kind == "images":
        return list(source.extensions)
    return ["." + e for e in TABLE_EXTENSIONS[source.kind]]


def _first_file(source: SourceConfig, paths: list[str]) -> str:
    """The first file the source reads (sorted); a folder without one is an error."""
    extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in _extensions(source))
    hidden = () if source.kind == "images" else (".", "_")  # Ray Data skips these in a table folder
    for path in paths:
        if not os.path.isdir(path):
            return path
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                relative = os.path.relpath(os.path.join(folder, name), path)
                if name.lower().endswith(extensions) and not relative.startswith(hidden):
                    return os.path.join(folder, name)
    raise SourceError(f"source {source.label!r}: no {', '.join(extensions)} files under {', '.join(paths)}")


# -- which columns -------------------------------------------------------------------------------------------


def _local_columns(source: SourceConfig, path: str) -> tuple[list[str] | None, str]:
    try:
        return _columns(source, path)
    except OSError as exc:
        raise SourceError(f"source {source.label!r}: cannot read {path}: {exc.strerror or exc}") from exc


def _columns(source: SourceConfig, path: str, filesystem=None) -> tuple[list[str] | None, str]:
    """The file's columns (None: nothing to judge by, such as an empty file) and where they were found.
    Compressed files (by extension, as Ray Data reads them) are read through their codec."""
    import pyarrow as pa

    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(path, filesystem=filesystem).names, "its schema"
        except pa.ArrowInvalid as exc:  # not Parquet at all: it cannot be read as configured
            raise SourceError(f"source {source.label!r}: {path} is not a Parquet file ({exc})") from exc
    if filesystem is None:
        stream = pa.input_stream(path, compression="detect")
    else:
        stream = filesystem.open_input_stream(path, compression="detect")
    with stream:
        head = stream.read(HEAD_BYTES)
    if source.kind == "csv":
        return _csv_header(head), "its header"
    return _jsonl_keys(head, source), f"its first {HEAD_ROWS} lines"


def _csv_header(head: bytes) -> list[str] | None:
    import csv
    import io

    text = head.decode("utf-8", "replace")
    try:
        return next(csv.reader(io.StringIO(text, newline="")))
    except (StopIteration, csv.Error):
        return None  # an empty file, or a header the reader will report itself


def _jsonl_keys(head: bytes, source: SourceConfig) -> list[str] | None:
    keys: dict[str, None] = {}
    seen = False
    lines = head.splitlines()
    if len(head) == HEAD_BYTES and lines:
        lines = lines[:-1]  # cut mid-line
    for line in [line for line in lines if line.strip()][:HEAD_ROWS]:
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a bad line is the reader's business (an error row)
        if isinstance(value, str):  # a bare string is a text
            value = {source.text_column or "text": value}
        if isinstance(value, dict):
            seen = True
            keys.update(dict.fromkeys(value))
    return list(keys) if seen else None


def _check_columns(source: SourceConfig, path: str, columns: list[str] | None, where: str) -> None:
    if columns is None:
        return
    wanted = {
        "id_column": [source.id_column],
        "text_column": [source.text_column],
        "image_column": [source.image_column],
        "keep_columns": source.keep_columns,
    }
    missing = [
        f"{name!r} ({field})"
        for field, names in wanted.items()
        for name in names
        if name and name not in columns
    ]
    has = ", ".join(repr(c) for c in columns) or "none"
    if missing:
        raise SourceError(
            f"source {source.label!r}: {path} has no column {', '.join(missing)}; "
            f"the columns in {where} are {has}"
        )
    if not source.text_column and not source.image_column and not {"text", "image"} & set(columns):
        raise SourceError(
            f"source {source.label!r}: {path} has neither a 'text' nor an 'image' column (the columns in "
            f"{where} are {has}); name yours with text_column and/or image_column"
        )


# -- object stores -------------------------------------------------------------------------------------------


def _check_uri(source: SourceConfig) -> None:
    """Existence (one call), and a single file's columns; whatever cannot be decided here is Ray Data's."""
    from pyarrow import fs

    from pipelines.readers import filesystem_for

    try:
        filesystem = filesystem_for(source.path, source.storage_options)
        path = source.path.split("://", 1)[1].rstrip("/")
        info = filesystem.get_file_info(path)
    except Exception as exc:  # an unknown scheme, no credentials here, the network: leave it to Ray Data
        log.debug("cannot check source %s here: %s", source.path, exc)
        return
    if info.type == fs.FileType.NotFound:
        raise SourceError(f"source {source.label!r}: {source.path} does not exist")
    if info.type != fs.FileType.File or source.kind == "images":
        return
    try:
        columns, where = _columns(source, path, filesystem)
    except OSError as exc:
        log.debug("cannot read source %s here: %s", source.path, exc)
        return
    _check_columns(source, source.path, columns, where)
