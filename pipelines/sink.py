"""An in-process writer of pipeline output rows into the vectors and errors tables (Python callers and tests
that write a few rows); the backfill itself writes in its Ray Data workers (`pipelines.lance_write`).

It keeps the backfill's invariant for the rows it is given: each ends in the vectors table or the errors table,
exactly once. At `open`, the ids in both tables are "done"; an id seen twice is written once (the repeats count
as skipped); each commit holds at most `commit_rows` rows; errors are upserted by id, and with `retry_errors` a
retried row that now succeeds leaves the errors table (an id left in both by a crash is repaired at `open`).

It holds the ids of both tables and of its rows in memory (about 100 bytes an id): fine for a few rows, not
for a corpus. The kept columns come typed in the rows' `kept` struct (`pipelines.kept`: a value that does not
fit its type is an error row from the read on); `kept_arrays` (them in the table's columns) is shared with the
backfill's writer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipelines.config import EmbedderConfig, TableConfig
from pipelines.kept import check_kept_types, kept_type, kept_values
from pipelines.table import TableConfigMismatch, check_matches, connect, errors_schema, vectors_schema

log = logging.getLogger(__name__)

VECTOR_COLUMNS = ("id", "modality", "text", "image_uri", "vector")


@dataclass
class SinkCounts:
    """read = embedded + skipped + errored; skipped = already done + repeated ids."""

    read: int = 0
    embedded: int = 0
    errored: int = 0
    already_done: int = 0
    duplicates: int = 0
    commits: int = 0

    @property
    def skipped(self) -> int:
        return self.already_done + self.duplicates


def sql_in(ids: list[str]) -> str:
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
    return f"id IN ({quoted})"


def table_ids(table) -> set[str]:
    return set(table.search().select(["id"]).limit(None).to_arrow()["id"].to_pylist())


def _open(db, name: str):
    try:
        return db.open_table(name)
    except (FileNotFoundError, ValueError):
        return None


class BackfillSink:
    """Open (and check) the tables, hand out the done ids, take the pipeline's rows, commit, then index."""

    def __init__(
        self, table: TableConfig, embedder: EmbedderConfig, dimension: int, kept: dict[str, str] | None = None
    ):
        """`kept`: the kept columns and their types (`SourceConfig.keep_types`; string unless declared)."""
        self.config = table
        self.embedder = embedder
        self.dimension = dimension
        self.kept_types = dict(kept or {})
        self.keep_columns = list(self.kept_types)
        self.counts = SinkCounts()
        self.db = self.vectors = self.errors = None
        self.seen: set[str] = set()
        self.done: set[str] = set()
        self.retried: set[str] = set()
        self._vector_parts: list = []
        self._vectors_waiting = 0
        self._error_rows: list[dict[str, Any]] = []
        self.indexes: list[str] = []

    # -- start ---------------------------------------------------------------------------------------------

    def open(self) -> set[str]:
        """Check (or drop, with mode=overwrite) the tables, repair a crash, and return the ids to skip."""
        self.db = connect(self.config)
        if self.config.mode == "overwrite":
            for name in (self.config.name, self.config.errors_name):
                self.db.drop_table(name, ignore_missing=True)
        self.vectors = _open(self.db, self.config.name)
        if self.vectors is not None:
            check_matches(self.vectors, self.embedder, self.dimension)
            missing = [c for c in self.keep_columns if c not in self.vectors.schema.names]
            if missing:
                raise TableConfigMismatch(
                    f"table {self.config.name!r} has no column(s) {missing} to keep; "
                    "use mode: overwrite to rebuild it with them"
                )
            check_kept_types(self.vectors.schema, self.kept_types, self.config.name)
        self.errors = _open(self.db, self.config.errors_name)
        if self.errors is None:
            self.errors = self.db.create_table(self.config.errors_name, schema=errors_schema())
        vector_ids = table_ids(self.vectors) if self.vectors is not None else set()
        error_ids = table_ids(self.errors)
        both = sorted(vector_ids & error_ids)
        if both:  # a crash between a retried row's vector commit and its error deletion
            log.info("repairing %d ids found in both tables (keeping their vectors)", len(both))
            self._delete_errors(both)
            error_ids -= set(both)
        self.retried = error_ids if self.config.retry_errors else set()
        self.done = vector_ids | (set() if self.config.retry_errors else error_ids)
        return self.done

    # -- rows ----------------------------------------------------------------------------------------------

    def write(self, batch) -> None:
        """Take one batch of the pipeline's output (`stages.output_schema`); commit each full `commit_rows`."""
        ids = batch["id"].to_pylist()
        status = batch["status"].to_pylist()
        take: list[int] = []
        for i, (row_id, state) in enumerate(zip(ids, status, strict=True)):
            self.counts.read += 1
            if row_id in self.seen:
                self.counts.duplicates += 1
                continue
            self.seen.add(row_id)
            if state == "ok":
                take.append(i)
            elif state == "done" and row_id in self.done:
                self.counts.already_done += 1
            elif state == "done":  # a 128-bit digest collision: never expected, never silent
                self._error(row_id, batch["source"][i].as_py(), "resume", "id digest collision; rerun it")
            elif state == "error":
                self._error(
                    row_id, batch["source"][i].as_py(), batch["stage"][i].as_py(), batch["reason"][i].as_py()
                )
            else:
                raise RuntimeError(f"row {row_id!r} reached the sink with status {state!r}")
        if take:
            self._vector_parts.append(batch.take(take))
            self._vectors_waiting += len(take)
        limit = self.config.commit_rows
        while self.pending_rows >= limit:  # a batch may be many commits' worth
            if self._vectors_waiting:
                self._commit_vectors(limit)
            else:
                self._commit_errors(limit)

    @property
    def pending_rows(self) -> int:
        """Rows taken but not committed yet (vectors and errors): fewer than `commit_rows` after each batch."""
        return self._vectors_waiting + len(self._error_rows)

    def _error(self, row_id: str, source: str, stage: str, reason: str) -> None:
        self._error_rows.append({"id": row_id, "source": source, "stage": stage, "reason": reason})

    # -- commits -------------------------------------------------------------------------------------------

    def flush_vectors(self) -> None:
        """Commit every waiting vector, `commit_rows` at a time."""
        while self._vectors_waiting:
            self._commit_vectors(self.config.commit_rows)

    def flush_errors(self) -> None:
        """Commit every waiting error row, `commit_rows` at a time."""
        while self._error_rows:
            self._commit_errors(self.config.commit_rows)

    def _commit_vectors(self, limit: int) -> None:
        """One commit: the first `limit` waiting vectors."""
        import pyarrow as pa

        waiting = pa.concat_tables(self._vector_parts)
        rows = waiting.slice(0, limit)
        rest = waiting.slice(limit)
        self._vector_parts = [rest] if rest.num_rows else []
        self._vectors_waiting = rest.num_rows
        if rows.num_rows == 0:
            return
        if self.vectors is None:
            self.vectors = self.db.create_table(self.config.name, schema=self._schema())
        schema = self.vectors.schema
        kept = kept_arrays(rows, schema, self.keep_columns)
        data = pa.table(
            [rows[c].cast(schema.field(c).type) for c in VECTOR_COLUMNS]
            + [kept[c] for c in self.keep_columns],
            schema=schema,
        )
        self.vectors.add(data)
        self.counts.embedded += data.num_rows
        self.counts.commits += 1
        log.info("committed %d vectors (%d in this run)", data.num_rows, self.counts.embedded)
        retried = sorted(self.retried.intersection(data["id"].to_pylist()))
        if retried:  # they succeeded this time: their old error rows go
            self._delete_errors(retried)

    def _commit_errors(self, limit: int) -> None:
        """One commit: the first `limit` waiting error rows, upserted by id."""
        import pyarrow as pa

        data = pa.Table.from_pylist(self._error_rows[:limit], schema=errors_schema())
        self._error_rows = self._error_rows[limit:]
        merge = self.errors.merge_insert("id").when_matched_update_all().when_not_matched_insert_all()
        merge.execute(data)
        self.counts.errored += data.num_rows
        self.counts.commits += 1
        log.info("committed %d error rows (%d in this run)", data.num_rows, self.counts.errored)

    def _delete_errors(self, ids: list[str]) -> None:
        for start in range(0, len(ids), 1000):
            self.errors.delete(sql_in(ids[start : start + 1000]))

    def _schema(self):
        return vectors_schema(self.embedder, self.dimension, list(kept_type(self.kept_types)))

    # -- end -----------------------------------------------------------------------------------------------

    def close(self) -> SinkCounts:
        """Commit what is buffered, make sure the vectors table exists, and build the indexes."""
        self.flush_vectors()
        self.flush_errors()
        if self.vectors is None:
            self.vectors = self.db.create_table(self.config.name, schema=self._schema())
        self.build_indexes()
        return self.counts

    def build_indexes(self) -> None:
        """Compact this run's commits, then a cosine vector index above the size threshold and a full-text index
        on `text`. An index is an optimisation: failing to build one is logged, never fatal."""
        from lancedb.index import FTS, IvfPq

        table = self.vectors
        try:
            if self.counts.commits:
                table.optimize()  # merges this run's small commits, adds its rows to the existing indexes
            rows = table.count_rows()
            indexed = {column for index in table.list_indices() for column in index.columns}
            if "vector" not in indexed and rows >= self.config.vector_index_min_rows:
                table.create_index("vector", config=IvfPq(distance_type="cosine"))
                log.info("built a cosine IVF_PQ index over %d vectors", rows)
            if self.config.fts_index and "text" not in indexed and rows:
                table.create_index("text", config=FTS())
            self.indexes = sorted(c for index in table.list_indices() for c in index.columns)
        except Exception as exc:
            log.warning("could not build the indexes of %s: %s", self.config.name, exc)


def kept_arrays(rows, schema, keep_columns: list[str]) -> dict[str, Any]:
    """The kept columns of `rows` (the fields of their typed `kept` struct) as the table's columns."""

    values = kept_values(rows, keep_columns)
    return {name: values[name].cast(schema.field(name).type) for name in keep_columns}
