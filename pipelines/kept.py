"""Kept columns: the source columns a backfill copies into the vectors table, typed when they are read.

A run's kept columns are the union over its sources (`kept_types`), each with one type (`SourceConfig.keep_types`,
string unless declared). Every row carries them as one Arrow struct column, `kept`, with one field per kept
column (null where the row's source lacks it), so every block of every stage has the same schema (Ray Data
needs that) and the writer takes the values as they are. A value that does not fit its type is found when its
block is read (`kept_column`): that row, and only that row, becomes an error row.
"""

from __future__ import annotations

import json
from typing import Any


def kept_types(sources) -> dict[str, str]:
    """Every source's kept columns with their types, in order; one column kept by two sources must have one
    type."""
    kept: dict[str, str] = {}
    for source in sources:
        for name in source.keep_columns:
            kind = source.keep_types.get(name, "string")
            if kept.setdefault(name, kind) != kind:
                raise ValueError(f"kept column {name!r} is {kept[name]} in one source and {kind} in another")
    return kept


def kept_type(types: dict[str, str] | None = None):
    """The Arrow struct of the `kept` column (no fields when nothing is kept)."""
    import pyarrow as pa

    return pa.struct([pa.field(name, pa.type_for_alias(kind)) for name, kind in (types or {}).items()])


def kept_column(values: list[dict[str, Any] | None], types: dict[str, str]) -> tuple[Any, dict[int, str]]:
    """The `kept` column of a block of rows (`values`: each row's kept values as read, None for a row without
    any) typed as `kept_type(types)`, and the rows (by position) whose values do not fit it, with the reason.
    Every row gets a valid struct; a missing or unfitting value is null."""
    import pyarrow as pa

    struct = kept_type(types)
    if not types:
        return pa.array([{}] * len(values), struct), {}
    columns, bad = [], {}
    for field in struct:
        column = [None if v is None else v.get(field.name) for v in values]
        try:
            columns.append(fit(column, field.type))
            continue
        except ValueError:
            pass
        fitted = []
        for i, value in enumerate(column):
            try:
                fit([value], field.type)
                fitted.append(value)
            except ValueError:
                reason = f"kept_column: {field.name!r} value {value!r} does not fit the column's {field.type}"
                bad.setdefault(i, reason)
                fitted.append(None)
        columns.append(fit(fitted, field.type))
    return pa.StructArray.from_arrays(columns, fields=list(struct)), bad


def fit(values: list[Any], target):
    """Values as an Arrow array of `target`: text is parsed ('2001' -> 2001), other values are converted;
    strings take anything (non-strings as JSON). Raises ValueError when a value does not fit."""
    import pyarrow as pa

    if pa.types.is_string(target):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], target)
    try:
        if any(isinstance(v, str) for v in values):
            text = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            return pa.array(text, pa.string()).cast(target)
        return pa.array(values, target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        raise ValueError(str(exc)) from exc


def check_kept_types(schema, kept: dict[str, str], name: str) -> None:
    """Refuse a table whose kept columns have other types than the config's: the readers type the values
    with the config's, the table takes them as they are."""
    import pyarrow as pa

    from pipelines.table import TableConfigMismatch

    wrong = [
        f"{c!r} is {schema.field(c).type} in the table, {kind} in the config"
        for c, kind in kept.items()
        if schema.field(c).type != pa.type_for_alias(kind)
    ]
    if wrong:
        raise TableConfigMismatch(
            f"table {name!r}: kept column {', '.join(wrong)}; use mode: overwrite to rebuild it"
        )


def kept_values(rows, names: list[str]) -> dict[str, Any]:
    """The named fields of a table's `kept` column, one array each (a null struct gives nulls)."""
    import pyarrow as pa

    column = rows["kept"]
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    struct = column.type
    out = {}
    for name in names:
        index = struct.get_field_index(name)
        if index < 0:
            raise KeyError(f"the rows carry no kept column {name!r}")
        parts = [chunk.flatten()[index] for chunk in chunks]
        out[name] = pa.chunked_array(parts, struct.field(index).type).combine_chunks()
    return out
