"""How a table stores its vectors: float32 (the default), float16, or int8 codes with a recorded scale.

float32 and float16 are `fixed_size_list<float32|float16>` columns that LanceDB searches itself (cosine,
exact or through its indexes). int8 is scalar quantisation done here: each dimension `j` of a vector is
stored as `round(x_j / scale_j)` in -127..127, the per-dimension `scale_j` (the largest |x_j| of the fitting
sample over 127) recorded in the table's metadata. LanceDB 0.40 cannot run a vector search over an int8 column
(its query vectors are always float32: "Column vector has element type Int8 and the query vector is
Float32"), so an int8 table is searched by `pipelines.table_query`: an exact scan of the decoded codes after
LanceDB applies the filter. That is why this module, and not LanceDB, encodes and decodes int8.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

StorageType = Literal["float32", "float16", "int8"]
STORAGE_TYPES: tuple[StorageType, ...] = ("float32", "float16", "int8")
BYTES_PER_VALUE = {"float32": 4, "float16": 2, "int8": 1}
INT8_MAX = 127


def bytes_per_vector(storage: StorageType, dimension: int) -> int:
    """The exact size of one stored vector: `dimension` values of the storage type (Arrow stores a
    fixed-size list's values back to back, with no per-row offsets)."""
    return BYTES_PER_VALUE[storage] * dimension


def arrow_type(storage: StorageType, dimension: int):
    import pyarrow as pa

    value = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8()}[storage]
    return pa.list_(value, dimension)


def int8_scale(sample: np.ndarray) -> np.ndarray:
    """Per-dimension scales for int8 codes: the largest |value| of each dimension over 127 (never 0)."""
    peak = np.abs(np.asarray(sample, np.float32)).max(axis=0)
    return np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)


def encode(vectors: np.ndarray, storage: StorageType, scale: np.ndarray | None = None):
    """Vectors (n, d) as a fixed-size-list Arrow array of the storage type; int8 needs its `scale`."""
    import pyarrow as pa

    vectors = np.asarray(vectors, np.float32)
    dimension = vectors.shape[1]
    if storage == "int8":
        if scale is None:
            raise ValueError("int8 storage needs a scale (pipelines.storage.int8_scale)")
        values = np.clip(np.rint(vectors / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    else:
        values = vectors.astype(np.float16 if storage == "float16" else np.float32)
    flat = pa.array(values.reshape(-1), type=arrow_type(storage, dimension).value_type)
    return pa.FixedSizeListArray.from_arrays(flat, dimension)


def decode(column, storage: StorageType, scale: np.ndarray | None = None) -> np.ndarray:
    """A stored vector column (Arrow fixed-size lists) as float32 (n, d); int8 codes times their scale."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dimension = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dimension).astype(np.float32)
    if storage == "int8":
        values *= np.asarray(scale, np.float32)
    return values


def recorded_storage(metadata: dict[str, Any]) -> tuple[StorageType, np.ndarray | None]:
    """The storage type a table's metadata records (float32 for tables that record none) and its int8 scale."""
    storage = metadata.get("storage") or {}
    kind = storage.get("type", "float32")
    scale = storage.get("scale")
    return kind, None if scale is None else np.asarray(scale, np.float32)


def storage_metadata(storage: StorageType, scale: np.ndarray | None = None) -> dict[str, Any]:
    recorded: dict[str, Any] = {"type": storage}
    if storage == "int8":
        recorded["scale"] = [float(s) for s in scale]
    return recorded
