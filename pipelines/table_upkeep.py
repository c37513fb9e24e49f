"""Table upkeep after a backfill: compaction, and indexes that cover the new rows.

A run appends a few fragments per commit (one or more per write task). After it, `upkeep`:
- `optimize()` (LanceDB): compacts the run's small fragments into fewer large ones, so the fragment count stays
  bounded over many incremental runs, and adds the new rows to every existing index (the ANN index on
  `vector`, the full-text index on `text`, the `id` index the resume look-ups use), so searches cover them;
- builds a cosine IVF_PQ index on `vector` once the table reaches `vector_index_min_rows`, and the full-text
  index on `text` (`fts_index`) when there is none yet.
What it did is returned as short phrases for the summary line. An index is an optimisation: failing to build
one is logged, never fatal. The backfill runs it off the driver (`pipelines.ray_cluster.off_driver`): its memory
grows with the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipelines.config import TableConfig

log = logging.getLogger(__name__)


@dataclass
class Upkeep:
    done: list[str] = field(default_factory=list)
    indexes: list[str] = field(default_factory=list)
    fragments: int = 0

    def phrase(self) -> str:
        return ", ".join(self.done) if self.done else "none needed"


def fragment_count(table) -> int:
    return len(table.to_lance().get_fragments())


def upkeep(config: TableConfig, changed: bool) -> Upkeep:
    """Compact and index the vectors table (and compact the errors table) after a run; `changed`: the run
    committed rows. Opens the tables itself, so that it can run in any process."""
    from lancedb.index import FTS, IvfPq

    from pipelines.table import connect

    result = Upkeep()
    try:
        db = connect(config)
        table, errors = db.open_table(config.name), db.open_table(config.errors_name)
        if changed:
            before = fragment_count(table)
            table.optimize()
            errors.optimize()
            result.done.append(f"compacted {before} -> {fragment_count(table)} fragments, indexes updated")
        rows = table.count_rows()
        indexed = {column for index in table.list_indices() for column in index.columns}
        if "vector" not in indexed and rows >= config.vector_index_min_rows:
            table.create_index("vector", config=IvfPq(distance_type="cosine"))
            result.done.append(f"built a cosine IVF_PQ index over {rows} vectors")
        if config.fts_index and "text" not in indexed and rows:
            table.create_index("text", config=FTS())
            result.done.append("built the full-text index on text")
        result.indexes = sorted({c for index in table.list_indices() for c in index.columns} - {"id"})
        result.fragments = fragment_count(table)
    except Exception as exc:
        log.warning("could not finish the upkeep of %s: %s", config.name, exc)
        result.done.append(f"failed: {exc}")
    return result
