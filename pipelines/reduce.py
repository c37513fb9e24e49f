"""`vlm-embed reduce`: smaller vectors in a new table, by PCA or Matryoshka truncation, stored as float32,
float16 or int8 (`pipelines.storage`).

- **pca**: a projection fitted on a random sample of the table's vectors (the mean and the top `dimensions`
  principal axes from numpy's SVD of the centred sample; no scikit-learn needed for this one decomposition),
  applied to every row. The projection is stored next to the new table, in a one-row LanceDB table
  `<new table>__projection` (so it travels with the database, object stores included), and recorded in the
  new table's metadata; every search of the table (`vlm-embed search`, the Python `search`, Serve's
  `/search`, `retrieve_context`) projects its query the same way (`pipelines.table_query`). When the table's
  vectors are normalised, projected vectors and queries are normalised again, so scores stay cosines.
- **matryoshka**: the first `dimensions` of each vector, normalised again: what the embedder computes with
  `dimensions: D` (the new table records that configuration, so queries are simply embedded at D). Only
  meaningful for Matryoshka-trained models (Qwen3-VL-Embedding); for others it is a baseline.
- **none**: the vectors as they are, only in another storage type.

The result is always a new table (an existing name is refused, never overwritten) with the same rows, ids,
texts and kept columns, and a full-text index on `text` like the backfill's, so hybrid search works on it.
A reduced table is a read-only copy: backfill into the original and reduce again.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipelines.config import DEFAULT_TABLE_NAME, TableConfig
from pipelines.storage import STORAGE_TYPES, StorageType

Method = Literal["pca", "matryoshka", "none"]
PROJECTION_SUFFIX = "__projection"
DEFAULT_SAMPLE = 20_000
COPY_BATCH_ROWS = 4096
EXIT_USAGE = 2


@dataclass(frozen=True)
class Projection:
    """A fitted PCA: `(x - mean) @ components.T`, then L2-normalised when `normalize`."""

    mean: np.ndarray  # (d_in,)
    components: np.ndarray  # (k, d_in), orthonormal rows
    normalize: bool
    explained_variance_ratio: float

    @property
    def dimensions(self) -> int:
        return self.components.shape[0]

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))
        projected = (vectors - self.mean) @ self.components.T
        if self.normalize:
            norms = np.linalg.norm(projected, axis=1, keepdims=True)
            projected = projected / np.where(norms > 0, norms, 1.0)
        return projected.astype(np.float32)


def fit_pca(sample: np.ndarray, dimensions: int, normalize: bool) -> Projection:
    """The top `dimensions` principal axes of `sample` (n, d) by SVD of the centred sample."""
    sample = np.asarray(sample, np.float64)
    n, d = sample.shape
    if dimensions > min(n, d):
        raise ValueError(
            f"cannot fit {dimensions} PCA dimensions on {n} sampled vectors of size {d}: at most {min(n, d)}"
        )
    mean = sample.mean(axis=0)
    _, singular, axes = np.linalg.svd(sample - mean, full_matrices=False)
    variance = singular**2
    ratio = float(variance[:dimensions].sum() / variance.sum()) if variance.sum() > 0 else 1.0
    return Projection(
        mean=mean.astype(np.float32),
        components=axes[:dimensions].astype(np.float32),
        normalize=normalize,
        explained_variance_ratio=ratio,
    )


def _exists(db, name: str) -> bool:
    try:
        db.open_table(name)
    except (FileNotFoundError, ValueError):
        return False
    return True


def projection_table_name(table_name: str) -> str:
    return f"{table_name}{PROJECTION_SUFFIX}"


def save_projection(db, name: str, projection: Projection) -> None:
    import pyarrow as pa

    k, d = projection.components.shape
    row = pa.table(
        {
            "mean": pa.FixedSizeListArray.from_arrays(pa.array(projection.mean), d),
            "components": pa.FixedSizeListArray.from_arrays(
                pa.array(projection.components.reshape(-1)), k * d
            ),
        }
    )
    db.create_table(name, row)


_PROJECTIONS: dict[tuple[str, str, str], Projection] = {}


def load_projection(db, reduction: dict[str, Any]) -> Projection:
    """The projection a reduced table's metadata names (cached per database, table and fit)."""
    key = (str(db.uri), reduction["projection_table"], reduction["fitted_at"])
    if key not in _PROJECTIONS:
        row = db.open_table(reduction["projection_table"]).to_arrow()
        d, k = reduction["input_dimension"], reduction["dimensions"]
        mean = np.asarray(row["mean"][0].as_py(), np.float32)
        components = np.asarray(row["components"][0].as_py(), np.float32).reshape(k, d)
        _PROJECTIONS[key] = Projection(
            mean, components, reduction["normalize"], reduction["explained_variance"]
        )
    return _PROJECTIONS[key]


def reduce_table(
    table_config: TableConfig,
    output_table: str,
    dimensions: int | None = None,
    *,
    method: Method = "pca",
    storage: StorageType = "float32",
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    progress=None,
) -> dict[str, Any]:
    """Write `output_table` beside `table_config.name`: its rows with vectors reduced by `method` to
    `dimensions` and stored as `storage`. Returns the new table's recorded metadata. An existing
    `output_table` (or its projection table) is refused with `FileExistsError`."""
    from datetime import UTC, datetime

    from pipelines.storage import decode, encode, int8_scale, recorded_storage, storage_metadata
    from pipelines.table import METADATA_KEY, connect, open_vectors_table, recorded_metadata

    source = open_vectors_table(table_config)
    metadata = recorded_metadata(source)
    if metadata.get("reduction", {}).get("method") == "pca":
        raise ValueError(
            f"table {source.name!r} is itself a PCA reduction: reduce the table it was made from"
        )
    db = connect(table_config)
    for name in (output_table, projection_table_name(output_table) if method == "pca" else None):
        if name is not None and _exists(db, name):
            raise FileExistsError(f"table {name!r} already exists at {table_config.uri}: choose another name")
    source_storage, source_scale = recorded_storage(metadata)
    width = source.schema.field("vector").type.list_size
    if method == "none":
        dimensions = width
    if dimensions is None or not 1 <= dimensions <= width:
        raise ValueError(
            f"dimensions must be between 1 and the table's vector size {width}, not {dimensions}"
        )
    rows = source.count_rows()
    if rows == 0:
        raise ValueError(f"table {source.name!r} is empty: nothing to reduce")
    normalize = bool(metadata["embedder"].get("normalize", True))

    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(rows, size=min(sample, rows), replace=False)).tolist()
    drawn = decode(
        source.take_offsets(picked).select(["vector"]).to_arrow()["vector"], source_storage, source_scale
    )

    projection = None
    new = dict(metadata)
    if method == "pca":
        projection = fit_pca(drawn, dimensions, normalize)
        transform = projection.apply
        new["reduction"] = {
            "method": "pca",
            "from_table": source.name,
            "input_dimension": width,
            "dimensions": dimensions,
            "sample_rows": len(picked),
            "normalize": normalize,
            "explained_variance": projection.explained_variance_ratio,
            "projection_table": projection_table_name(output_table),
            "fitted_at": datetime.now(UTC).isoformat(),
        }
    else:

        def transform(vectors: np.ndarray) -> np.ndarray:
            from pipelines.pooling import matryoshka

            return np.asarray(matryoshka(vectors, dimensions, normalize), np.float32)

        new["reduction"] = {"method": method, "from_table": source.name, "dimensions": dimensions}
        if method == "matryoshka" and dimensions < width:
            embedder = {**metadata["embedder"], "dimensions": dimensions}
            new["embedder"], new["dimension"] = embedder, dimensions
            new["signature"] = {**metadata["signature"], "dimensions": dimensions}
    scale = int8_scale(transform(drawn)) if storage == "int8" else None
    new["storage"] = storage_metadata(storage, scale)

    import pyarrow as pa

    from pipelines.storage import arrow_type

    index = source.schema.get_field_index("vector")
    schema = source.schema.set(index, pa.field("vector", arrow_type(storage, dimensions)))
    schema = schema.with_metadata({METADATA_KEY: json.dumps(new, sort_keys=True).encode()})
    if projection is not None:
        save_projection(db, new["reduction"]["projection_table"], projection)
    target = db.create_table(output_table, schema=schema)
    done = 0
    for batch in source.search().limit(None).to_batches(COPY_BATCH_ROWS):
        vectors = transform(decode(batch.column("vector"), source_storage, source_scale))
        columns = {name: batch.column(name) for name in schema.names if name != "vector"}
        columns["vector"] = encode(vectors, storage, scale)
        target.add(pa.table([columns[name] for name in schema.names], schema=schema))
        done += batch.num_rows
        if progress is not None:
            progress(done, rows)
    if "text" in schema.names:
        from lancedb.index import FTS

        target.create_index("text", config=FTS())
    return new


DESCRIPTION = """\
Write a new table with smaller vectors: PCA fitted on a sample of the table's vectors (--method pca, the
default; the projection is stored beside the new table and every search projects its query the same way),
Matryoshka truncation (--method matryoshka), or none (only --storage changes), stored as float32, float16
or int8 (scalar quantisation, a scale per dimension recorded in the table). The new table keeps the rows,
ids, texts and kept columns, and gets a full-text index; an existing name is refused.

examples:
  vlm-embed reduce --table ./data/lancedb --dimensions 16 --output-table vectors_pca16
  vlm-embed reduce --table ./data/lancedb --dimensions 16 --storage int8 --output-table vectors_pca16_int8
  vlm-embed reduce --table ./data/lancedb --method none --storage float16 --output-table vectors_f16
  vlm-embed search "a red circle" --table ./data/lancedb --name vectors_pca16
"""


def add_reduce_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--table", default="./data/lancedb", metavar="URI", help="the LanceDB (default: %(default)s)"
    )
    parser.add_argument(
        "--name", default=DEFAULT_TABLE_NAME, help="the vectors table to read (default: %(default)s)"
    )
    parser.add_argument(
        "--dimensions", type=int, metavar="D", help="the new vector size (not with --method none)"
    )
    parser.add_argument(
        "--method", choices=["pca", "matryoshka", "none"], default="pca", help="how to reduce (default: pca)"
    )
    parser.add_argument(
        "--storage", choices=list(STORAGE_TYPES), default="float32", help="value type (default: float32)"
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        metavar="N",
        help="rows drawn at random to fit the PCA and the int8 scales (default: %(default)s)",
    )
    parser.add_argument(
        "--output-table",
        metavar="NAME",
        help="the new table's name (default: NAME_pcaD / NAME_matryoshkaD / NAME_STORAGE, plus _STORAGE)",
    )


def default_output_name(name: str, method: Method, dimensions: int | None, storage: StorageType) -> str:
    stem = name if method == "none" else f"{name}_{method}{dimensions}"
    return stem if storage == "float32" and method != "none" else f"{stem}_{storage}"


def run_reduce_command(args: argparse.Namespace) -> int:
    from pipelines.table import TableConfigMismatch, TableNotFound

    if args.method != "none" and args.dimensions is None:
        print(f"reduce: error: --method {args.method} needs --dimensions", file=sys.stderr)
        return EXIT_USAGE
    if args.sample < 1:
        print("reduce: error: --sample must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    output = args.output_table or default_output_name(args.name, args.method, args.dimensions, args.storage)

    def progress(done: int, total: int) -> None:
        print(f"reduce: {done}/{total} rows", file=sys.stderr)

    try:
        recorded = reduce_table(
            TableConfig(uri=args.table, name=args.name),
            output,
            args.dimensions,
            method=args.method,
            storage=args.storage,
            sample=args.sample,
            progress=progress,
        )
    except (TableNotFound, TableConfigMismatch, FileExistsError, ValueError) as exc:
        print(f"reduce: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from pipelines.storage import bytes_per_vector

    dims = recorded["reduction"]["dimensions"]
    storage = recorded["storage"]["type"]
    line = f"reduce: wrote table {output!r}: {args.method}, {dims} dimensions, {storage}, "
    line += f"{bytes_per_vector(storage, dims)} bytes per vector"
    if args.method == "pca":
        line += f", {recorded['reduction']['explained_variance']:.1%} of the sample's variance kept"
    print(line)
    return 0
