"""Ray Data sources: JSONL, CSV and Parquet tables (texts, image paths or bytes, pairs) and image folder trees.

Every source becomes the same row layout (`row_schema`): `id`, `source`, `text`, `image_uri` (a path or URI to
read the image from), `image_bytes` (an image carried inline), `kept` (the columns to keep, typed: one struct,
`pipelines.kept`), `status` (`todo`, or `error` for a row that could not even be read), `stage`, `reason` and
`origin` (the work unit and row number it came from, `pipelines.work_units`). A bad line (not JSON, not UTF-8,
the wrong type in a column, a kept value that does not fit its type) becomes an error row instead of failing
the file, so every input row is accounted for downstream.

Ids come from `id_column` when the source has one; otherwise they are a content hash (`content_id`): the first
32 hex digits of the SHA-256 of the canonical JSON `{"image": <the path as written in the row, or
"sha256:<hex digest of the bytes>">, "text": <the text>}` (keys sorted, ASCII, no spaces). The same row always
gets the same id, on any machine. An images source uses the path relative to its folder as the id. A line that
cannot be parsed gets the hash of its raw bytes (`raw_id`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

from pipelines.config import SourceConfig

ROW_COLUMNS = (
    "id",
    "source",
    "text",
    "image_uri",
    "image_bytes",
    "kept",
    "status",
    "stage",
    "reason",
    "origin",
)
ROWS_PER_BLOCK = 256
TABLE_EXTENSIONS = {"jsonl": ["jsonl", "json"], "csv": ["csv"], "parquet": ["parquet"]}


def row_schema(kept: dict[str, str] | None = None):
    """The rows' Arrow schema; `kept`: the run's kept columns and their types (`pipelines.kept.kept_types`)."""
    import pyarrow as pa

    from pipelines.kept import kept_type

    types = {"image_bytes": pa.binary(), "kept": kept_type(kept)}
    return pa.schema([pa.field(c, types.get(c, pa.string())) for c in ROW_COLUMNS])


def content_id(text: str | None, image_ref: str | None) -> str:
    """The documented content hash of a row without an id column (see the module docstring)."""
    canonical = json.dumps({"image": image_ref, "text": text}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


def raw_id(raw: bytes) -> str:
    """The id of a line that could not be parsed: the hash of its bytes."""
    return hashlib.sha256(b"raw\0" + raw).hexdigest()[:32]


def bytes_ref(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem_and_path(location: str, storage_options: dict[str, str] | None = None):
    """(pyarrow filesystem, the location's path in it, without a trailing "/") for a local path or a URI, the
    filesystem as `filesystem_for` makes it."""
    if not is_uri(location):
        return filesystem_for(location), os.path.abspath(location)
    from pyarrow import fs

    return filesystem_for(location, storage_options), fs.FileSystem.from_uri(location)[1].rstrip("/")


def filesystem_for(path: str, storage_options: dict[str, str] | None = None):
    """The pyarrow filesystem for a local path or a URI. For `s3://`, `storage_options` (the object-store keys
    LanceDB takes: `aws_access_key_id`, `aws_secret_access_key`, `aws_endpoint`/`endpoint`, `aws_region`/
    `region`, `allow_http`) configure it; without them pyarrow reads the usual AWS environment and files."""
    from pyarrow import fs

    if not is_uri(path):
        return fs.LocalFileSystem()
    options = storage_options or {}
    if path.startswith("s3://") and options:
        endpoint = options.get("aws_endpoint") or options.get("endpoint") or options.get("aws_endpoint_url")
        scheme = "https"
        if endpoint and "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        if str(options.get("allow_http", "")).lower() == "true" and not endpoint:
            scheme = "http"
        return fs.S3FileSystem(
            access_key=options.get("aws_access_key_id"),
            secret_key=options.get("aws_secret_access_key"),
            session_token=options.get("aws_session_token"),
            region=options.get("aws_region") or options.get("region"),
            endpoint_override=endpoint,
            scheme=scheme,
        )
    return fs.FileSystem.from_uri(path)[0]


def read_image_uri(uri: str, storage_options: dict[str, str] | None = None) -> bytes:
    """Image bytes from an object-store URI (local paths are read by `load_image` itself); an
    `ImageNotFoundError` naming the URI when it cannot be read."""
    from pipelines.items import ImageNotFoundError

    try:
        filesystem = filesystem_for(uri, storage_options)
        with filesystem.open_input_stream(uri.split("://", 1)[1]) as handle:
            return handle.readall()
    except (OSError, ValueError) as exc:
        raise ImageNotFoundError(f"cannot read image {uri}: {exc}") from exc


# -- one row -----------------------------------------------------------------------------------------------


def error_row(source: SourceConfig, row_id: str, kind: str, message: str) -> dict[str, Any]:
    return {**empty_row(source, row_id), "status": "error", "stage": "read", "reason": f"{kind}: {message}"}


def empty_row(source: SourceConfig, row_id: str) -> dict[str, Any]:
    return dict.fromkeys(ROW_COLUMNS) | {"id": row_id, "source": source.label}


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _bad_utf8(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    return "not valid UTF-8"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _id_value(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, str) else json.dumps(_jsonable(value), sort_keys=True)


def _resolve_image(path: str, root: str) -> str:
    if is_uri(path) or os.path.isabs(path) or not root:
        return path
    return root.rstrip("/") + "/" + path if is_uri(root) else os.path.join(root, path)


def build_row(source: SourceConfig, raw: dict[str, Any], base_dir: str, where: str) -> dict[str, Any]:
    """One input row (a dict of the file's columns) in the common layout, or an error row saying what is wrong."""
    text_column = source.text_column or ("text" if "text" in raw else None)
    image_column = source.image_column or ("image" if "image" in raw else None)
    text = raw.get(text_column) if text_column else None
    image = raw.get(image_column) if image_column else None
    problem = None
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            problem = ("invalid_utf8", f"{where}: column {text_column!r} is {_bad_utf8(bytes(text))}")
            text = None
    elif text is not None and not isinstance(text, str):
        problem = (
            "invalid_row",
            f"{where}: column {text_column!r} holds a {type(text).__name__}, not a text",
        )
        text = None
    image_uri = image_bytes = image_ref = None
    if isinstance(image, bytes | bytearray):
        image_bytes = bytes(image)
        image_ref = bytes_ref(image_bytes)
    elif isinstance(image, str) and image.strip():
        image_ref = image
        image_uri = _resolve_image(image, source.image_root or base_dir)
    elif image is not None and not isinstance(image, str):
        problem = (
            "invalid_row",
            f"{where}: column {image_column!r} holds a {type(image).__name__}, not a path",
        )
    given_id = _id_value(raw.get(source.id_column)) if source.id_column else None
    if given_id is not None:
        row_id = given_id
    elif problem is None and (text is not None or image_ref is not None):
        row_id = content_id(text, image_ref)
    else:  # nothing to hash but the row itself
        row_id = raw_id(json.dumps(_jsonable(raw), sort_keys=True).encode())
    if problem is not None:
        return error_row(source, row_id, *problem)
    row = empty_row(source, row_id) | {"text": text, "image_uri": image_uri, "image_bytes": image_bytes}
    if source.keep_columns:  # typed per block when the rows become Arrow (`work_units.read_unit`)
        row["kept"] = {c: _jsonable(raw.get(c)) for c in source.keep_columns}
    return row | {"status": "todo"}


# -- JSONL and CSV -----------------------------------------------------------------------------------------


def _jsonl_rows(
    source: SourceConfig, handle, path: str, label: str | None = None
) -> Iterator[dict[str, Any]]:
    """The rows of JSONL lines; `label` names where line 1 of `handle` is (default: the file itself)."""
    base_dir = os.path.dirname(path)
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"{label or path}:{number}"
        text = line.rstrip("\r\n")  # so an unterminated string is reported as one, not as a control character
        raw = text.encode("utf-8", "surrogateescape")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield error_row(
                source, raw_id(raw), "invalid_json", f"{where}: not valid JSON: {_json_problem(exc, number)}"
            )
            continue
        if isinstance(value, str):
            value = {source.text_column or "text": value}
        if not isinstance(value, dict):
            kind = type(value).__name__
            yield error_row(source, raw_id(raw), "invalid_row", f"{where}: a JSON {kind}, not an object")
        elif _has_surrogates(line):
            given = _id_value(value.get(source.id_column)) if source.id_column else None
            row_id = given if given and not _has_surrogates(given) else raw_id(raw)
            yield error_row(source, row_id, "invalid_utf8", f"{where}: the line is {_bad_utf8(raw)}")
        else:
            yield build_row(source, value, base_dir, where)


def _json_problem(exc: json.JSONDecodeError, line: int) -> str:
    """The decoder's message with its position in the file: `invalid control character at line 3, column 12`
    (its own `msg` stops mid-sentence at "... at")."""
    message = exc.msg[:1].lower() + exc.msg[1:]
    at = "" if message.endswith(" at") else " at"
    return f"{message}{at} line {line}, column {exc.colno}"


def _csv_rows(source: SourceConfig, handle, path: str) -> Iterator[dict[str, Any]]:
    import csv

    base_dir = os.path.dirname(path)
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield error_row(source, raw_id(path.encode()), "invalid_csv", f"{path}: unreadable header ({exc})")
        return
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"{path}:{reader.line_num}"
            yield error_row(source, raw_id(where.encode()), "invalid_csv", f"{where}: {exc}")
            continue
        where = f"{path}:{reader.line_num}"
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raw = ",".join(fields).encode("utf-8", "surrogateescape")
            message = f"{where}: {len(fields)} fields, the header has {len(header)}"
            yield error_row(source, raw_id(raw), "invalid_csv", message)
            continue
        raw_row = {name: (value if value != "" else None) for name, value in zip(header, fields, strict=True)}
        if any(_has_surrogates(f) for f in fields):
            raw = ",".join(fields).encode("utf-8", "surrogateescape")
            given = _id_value(raw_row.get(source.id_column)) if source.id_column else None
            row_id = given if given and not _has_surrogates(given) else raw_id(raw)
            yield error_row(source, row_id, "invalid_utf8", f"{where}: the row is {_bad_utf8(raw)}")
            continue
        yield build_row(source, raw_row, base_dir, where)


# -- image folders -----------------------------------------------------------------------------------------


def _has_extension(name: str, extensions: list[str]) -> bool:
    lowered = name.lower()
    return any(lowered.endswith(e.lower() if e.startswith(".") else "." + e.lower()) for e in extensions)


def list_images(source: SourceConfig) -> list[dict[str, Any]]:
    """The image files under the folder (recursive, sorted), one row each; an unreadable folder is an error row."""
    return list(iter_images(source))


def iter_images(source: SourceConfig) -> Iterator[dict[str, Any]]:
    """`list_images`, one row at a time, holding one folder's listing at a time: in each folder its files
    (sorted), then its subfolders (sorted), local or object storage alike."""
    root = source.path
    if is_uri(root):
        yield from _iter_images_uri(source)
        return
    if os.path.isfile(root):
        yield empty_row(source, os.path.basename(root)) | {"image_uri": root, "status": "todo"}
        return
    failed: list[dict[str, Any]] = []

    def unreadable(exc: OSError) -> None:
        rel = os.path.relpath(exc.filename or root, root)
        failed.append(
            error_row(source, rel, "image_unreadable", f"cannot list {exc.filename}: {exc.strerror}")
        )

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        yield from failed
        failed.clear()
        dirs.sort()
        for name in sorted(files):
            if _has_extension(name, source.extensions):
                full = os.path.join(folder, name)
                rel = PurePosixPath(*os.path.relpath(full, root).split(os.sep)).as_posix()
                yield empty_row(source, rel) | {"image_uri": full, "status": "todo"}
    yield from failed


def _iter_images_uri(source: SourceConfig) -> Iterator[dict[str, Any]]:
    from pyarrow import fs

    filesystem = filesystem_for(source.path, source.storage_options)
    root = source.path.split("://", 1)[1].rstrip("/")
    scheme = source.path.split("://", 1)[0]
    folders = [root]
    while folders:  # depth first, as os.walk: a folder's files, then each subfolder in order
        folder = folders.pop()
        infos = sorted(
            filesystem.get_file_info(fs.FileSelector(folder, recursive=False)), key=lambda i: i.path
        )
        for info in infos:
            if info.type == fs.FileType.File and _has_extension(info.base_name, source.extensions):
                rel = info.path[len(root) :].lstrip("/")
                yield empty_row(source, rel) | {"image_uri": f"{scheme}://{info.path}", "status": "todo"}
        folders.extend(reversed([i.path for i in infos if i.type == fs.FileType.Directory]))


# -- sources -----------------------------------------------------------------------------------------------


def expand_paths(source: SourceConfig) -> list[str]:
    """Local globs expanded; a missing local path is a configuration error, raised before anything runs."""
    if is_uri(source.path):
        return [source.path]
    if glob.has_magic(source.path):
        found = sorted(glob.glob(source.path, recursive=True))
        if not found:
            raise FileNotFoundError(f"source {source.label!r}: no files match {source.path}")
        return found
    if not os.path.exists(source.path):
        raise FileNotFoundError(f"source {source.label!r}: {source.path} does not exist")
    return [source.path]
