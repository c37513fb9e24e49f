"""Test tables written the way the backfill writes them: rows in `output_schema`, through `BackfillSink`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.config import TableConfig
from pipelines.kept import kept_column, kept_type
from pipelines.prepared_arrow import output_schema
from pipelines.sink import BackfillSink


def write_rows(
    config: TableConfig,
    embedder_config,
    vectors: np.ndarray,
    columns: dict[str, list[Any]],
    kept_types: dict[str, str] | None = None,
) -> None:
    """`columns` holds what a test sets (id, text, image_uri, modality, kept, ...); every other column of the
    stages' output is what a plain embedded row has (source 'test', status 'ok', its origin, the rest null).
    `kept`: each row's kept values (a dict, or a JSON object), typed with `kept_types` as the readers type
    them; each must fit."""
    n, dim = vectors.shape
    schema = output_schema(dim, kept_type(kept_types))
    plain = {"source": ["test"] * n, "status": ["ok"] * n, "origin": [f"0:{i}" for i in range(n)]}
    data = {name: columns.get(name, plain.get(name, [None] * n)) for name in schema.names}
    given = [json.loads(k) if isinstance(k, str) else k for k in data["kept"]]
    data["kept"], bad = kept_column(given, kept_types or {})
    assert not bad, f"kept values that do not fit: {bad}"
    data["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    sink = BackfillSink(config, embedder_config, dim, *([kept_types] if kept_types else []))
    sink.open()
    sink.write(pa.table(data, schema=schema))
    sink.close()
