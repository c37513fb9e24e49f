"""The progress table: which work units of a backfill are committed, and how many rows each held.

A small LanceDB table `<vectors table>_units` beside the vectors and errors tables, one row per committed unit
(`unit`: `WorkUnit.key`, `rows`: the rows read from it). The driver reads it whole at start (O(units), never
O(rows)) and skips those units without reading them.

A unit is recorded after its rows are committed (vectors, then errors), in one commit per group of units. The
record is not atomic with the rows, and need not be: a crash between the two leaves the unit unrecorded, the
rerun reads it again, and its rows are found in the tables by id and counted as already done (the stages look
every row up before preparing it). So the record only saves reading; exactly-once rests on the id look-up.
"""

from __future__ import annotations

from pipelines.config import TableConfig


def progress_name(config: TableConfig) -> str:
    return f"{config.name}_units"


def progress_schema():
    import pyarrow as pa

    return pa.schema([pa.field("unit", pa.string(), nullable=False), pa.field("rows", pa.int64())])


def open_progress(db, config: TableConfig):
    """The progress table, made empty when missing."""
    try:
        return db.open_table(progress_name(config))
    except (FileNotFoundError, ValueError):
        return db.create_table(progress_name(config), schema=progress_schema())


def committed_units(table) -> dict[str, int]:
    """Every recorded unit's key and its rows (a unit recorded twice, after a crash, counts once)."""
    data = table.to_arrow()
    return dict(zip(data["unit"].to_pylist(), data["rows"].to_pylist(), strict=True))


def record_units(table, rows_by_unit: dict[str, int]) -> None:
    import pyarrow as pa

    if rows_by_unit:
        data = {"unit": list(rows_by_unit), "rows": list(rows_by_unit.values())}
        table.add(pa.table(data, schema=progress_schema()))
