"""The backfill's blocks as Arrow: `PreparedItem`s to columns and back, and the fixed schemas of the stages.

Between the prepare tasks and the embedding actors, each row's `PreparedItem` travels as Arrow list columns
(`ARRAY_COLUMNS`, one buffer and offsets per column: no per-item Python objects in the block, and the actor
reads each row's arrays as zero-copy slices). The rows' own columns (`PASS_COLUMNS`, `readers.row_schema`)
pass through every stage unchanged, the typed `kept` struct included: its type is the read's, so each stage's
schema is fixed for the whole run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.prepare import PreparedItem

PASS_COLUMNS = ("id", "source", "text", "image_uri", "kept", "status", "stage", "reason", "origin")
ARRAY_COLUMNS = {
    "input_ids": "int64",
    "position_ids": "int64",
    "pixel_values": "float32",
    "pixel_shape": "int64",
    "image_grid_thw": "int64",
}
LARGE_COLUMNS = {"pixel_values"}  # may pass 2**31 values in one block


def _pass_fields(kept):
    import pyarrow as pa

    from pipelines.kept import kept_type

    kept = kept_type() if kept is None else kept
    return [pa.field(c, kept if c == "kept" else pa.string()) for c in PASS_COLUMNS]


def prepared_schema(kept=None):
    """The prepare stage's blocks; `kept`: the Arrow type of the rows' `kept` column (default: none kept)."""
    import pyarrow as pa

    arrays = [pa.field(c, _list_type(c)) for c in ARRAY_COLUMNS]
    return pa.schema(
        [*_pass_fields(kept), pa.field("modality", pa.string()), *arrays, pa.field("truncated", pa.bool_())]
    )


def output_schema(dimension: int, kept=None):
    """The embed stage's blocks, what the writers take: the rows' columns, the modality and the vector."""
    import pyarrow as pa

    return pa.schema(
        [
            *_pass_fields(kept),
            pa.field("modality", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dimension)),
        ]
    )


def prepared_table(rows, items: list[PreparedItem | None]):
    """`rows` (an Arrow table with the `PASS_COLUMNS`) with each row's prepared item as columns, in
    `prepared_schema`; a row without an item (None: not to embed) gets empty arrays."""
    import pyarrow as pa

    schema = prepared_schema(rows.schema.field("kept").type)
    flat = [None if item is None else item.to_row() for item in items]
    empty = {c: np.zeros(0, t) for c, t in ARRAY_COLUMNS.items()}
    columns: dict[str, Any] = {c: rows[c] for c in PASS_COLUMNS}
    columns["modality"] = pa.array([None if f is None else f["modality"] for f in flat], pa.string())
    for c in ARRAY_COLUMNS:
        columns[c] = _list_array([empty[c] if f is None else f[c] for f in flat], c)
    columns["truncated"] = pa.array([False if f is None else bool(f["truncated"]) for f in flat], pa.bool_())
    return pa.table([columns[f.name] for f in schema], schema=schema)


def prepared_items(batch, rows: list[int]) -> list[PreparedItem]:
    """The `PreparedItem`s of the given rows of a `prepared_schema` block."""
    arrays = {c: _rows_of(batch[c]) for c in ARRAY_COLUMNS}
    modality, truncated = batch["modality"].to_pylist(), batch["truncated"].to_pylist()
    return [
        PreparedItem.from_row(
            {c: arrays[c][i] for c in ARRAY_COLUMNS} | {"modality": modality[i], "truncated": truncated[i]}
        )
        for i in rows
    ]


def vector_column(vectors: np.ndarray):
    """`[rows, dimension]` float32 as the fixed-size list column of `output_schema`."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def _list_type(column: str):
    import pyarrow as pa

    value_type = pa.from_numpy_dtype(np.dtype(ARRAY_COLUMNS[column]))
    return pa.large_list(value_type) if column in LARGE_COLUMNS else pa.list_(value_type)


def _list_array(arrays: list[np.ndarray], column: str):
    """One Arrow list column from per-row numpy arrays, built from one buffer and offsets (no per-item copy)."""
    import pyarrow as pa

    dtype = ARRAY_COLUMNS[column]
    large = column in LARGE_COLUMNS
    offsets = np.zeros(len(arrays) + 1, np.int64 if large else np.int32)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    values = pa.array(
        np.concatenate([np.asarray(a, dtype).reshape(-1) for a in arrays] or [np.zeros(0, dtype)])
    )
    array_class = pa.LargeListArray if large else pa.ListArray
    return array_class.from_arrays(pa.array(offsets), values)


def _rows_of(column) -> list[np.ndarray]:
    """The per-row numpy arrays of an Arrow list column (zero-copy slices of one buffer)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
