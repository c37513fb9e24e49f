"""The backfill's write path: Ray Data write tasks write Lance fragments, the driver commits their metadata.

Lance's documented distributed write: workers write data files (fragments) straight to the table's storage,
then one process commits the fragments' metadata as one new table version. Here:

- `BackfillDatasink.write` (a Ray Data write task, on any node) turns the embedded rows into the vectors
  table's schema (the kept columns as the readers typed them), writes them as fragments with
  `lance.fragment.write_fragments`, and returns the fragments' metadata, the task's error rows (small: no
  vectors), its counts and the rows it saw per work unit. No vector passes through the driver.
- `commit_wave` (the driver, once per group of units): upserts the error rows into the errors table, deletes
  the retried ids that now have a vector from it, appends the fragments to the vectors table in one commit,
  records the units in the progress table (`pipelines.progress`), and brings the `id` index up to date (in a
  Ray worker process: its memory grows with the table).

Why our own `Datasink` and not `lance_ray.LanceDatasink` (lance-ray 0.5 works with pylance 14 and Ray 2.60
here, Ray's own `write_lance` does not): lance-ray's sink writes one table and commits in its
`on_write_complete`; a backfill's rows go to two tables (vectors, errors), and the commit has to record which
work units it completes. We use the same pylance calls lance-ray makes (`write_fragments`, `LanceDataset.commit`
with `LanceOperation.Append`).

Exactly once, and repeated ids (the guarantee and its cost): before any work, each row is
1. claimed in an `IdClaims` actor (per group of units, hash-partitioned by id over `claim_partitions`
   actors): the first occurrence of an id in the group wins, a repeat is counted and dropped; a task that
   Ray retries claims its own rows again (the claim is keyed by the row's origin). The actors hold the ids of
   one group only (about `commit_rows` ids, ~100 bytes each, split over the partitions) and start empty for
   the next one;
2. looked up by id (`DoneLookup`, a BTREE index on `id`) in the vectors and errors tables as committed before
   the group started: a row already there is `done`.
Groups run one after another, so a later group sees the earlier ones committed. A crash at any point leaves
the group's units unrecorded; the rerun reads them again and the look-up finds what was committed. Cost: one
claim call and one indexed look-up per block of 256 rows, and the id index updated after each commit.
"""

from __future__ import annotations

import functools
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

from pipelines.ray_cluster import off_driver

log = logging.getLogger(__name__)

VECTOR_COLUMNS = ("id", "modality", "text", "image_uri", "vector")
ID_INDEX = "id_idx"
LOOKUP_CHUNK = 1000
MAX_FRAGMENTS = 256  # more than this after a commit: compact


def dataset_uri(uri: str, name: str) -> str:
    """The Lance dataset of LanceDB table `name` in database `uri` (a directory or an object-store URI)."""
    return f"{uri.rstrip('/')}/{name}.lance"


def sql_in(ids: list[str]) -> str:
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
    return f"id IN ({quoted})"


@functools.lru_cache(maxsize=8)
def _dataset(uri: str, options: tuple, version: int | None):
    import lance

    return lance.dataset(uri, version=version, storage_options=dict(options) or None)


@dataclass(frozen=True)
class Target:
    """Where one group of units goes, as the workers need it (picklable, small)."""

    vectors_uri: str
    errors_uri: str
    storage_options: tuple  # sorted (key, value) pairs
    vectors_version: int
    errors_version: int
    retry_errors: bool
    start_versions: tuple = (None, None)  # (vectors, errors) when the run started: found there = already done
    kept_types: tuple = ()  # (name, type) pairs
    claims: tuple = field(default=(), compare=False)  # IdClaims actor handles

    def dataset(self, which: str, at_start: bool = False):
        vectors = which == "vectors"
        uri = self.vectors_uri if vectors else self.errors_uri
        version = self.vectors_version if vectors else self.errors_version
        if at_start:
            version = self.start_versions[0 if vectors else 1]
        return _dataset(uri, self.storage_options, version)


# -- before the work: claims and look-ups -------------------------------------------------------------------


class IdClaims:
    """The ids of one group of units, each with the origin of its first occurrence (a Ray actor)."""

    def __init__(self):
        self.owner: dict[str, str] = {}

    def claim(self, ids: list[str], origins: list[str]) -> list[bool]:
        granted = []
        for row_id, origin in zip(ids, origins, strict=True):
            granted.append(self.owner.setdefault(row_id, origin) == origin)
        return granted

    def reset(self) -> int:
        held = len(self.owner)
        self.owner = {}
        return held


def start_claims(partitions: int) -> tuple:
    import ray

    actor = ray.remote(num_cpus=0)(IdClaims)
    return tuple(actor.remote() for _ in range(partitions))


def reset_claims(claims: tuple) -> None:
    import ray

    ray.get([c.reset.remote() for c in claims])


def stop_claims(claims: tuple) -> None:
    """End the run's claim actors (a driver that runs several backfills, a notebook, would keep them all)."""
    import ray

    for actor in claims:
        ray.kill(actor)


def _partition(row_id: str, partitions: int) -> int:
    import zlib

    return zlib.crc32(row_id.encode("utf-8", "surrogatepass")) % partitions


def claim(target: Target, ids: list[str], origins: list[str]) -> list[bool]:
    """Whether each row is its id's first occurrence in this group."""
    import ray

    if not target.claims:
        return [True] * len(ids)
    parts = len(target.claims)
    positions: dict[int, list[int]] = {}
    for i, row_id in enumerate(ids):
        positions.setdefault(_partition(row_id, parts), []).append(i)
    refs = {
        p: target.claims[p].claim.remote([ids[i] for i in where], [origins[i] for i in where])
        for p, where in positions.items()
    }
    granted = [True] * len(ids)
    for p, answer in zip(refs, ray.get(list(refs.values())), strict=True):
        for i, ok in zip(positions[p], answer, strict=True):
            granted[i] = ok
    return granted


def committed_ids(target: Target, which: str, ids: list[str], at_start: bool = False) -> set[str]:
    """The ids among `ids` that the table held when this group (`at_start`: this run) started."""
    dataset = target.dataset(which, at_start)
    if not ids or dataset.count_rows() == 0:
        return set()
    found: set[str] = set()
    unique = sorted(set(ids))
    for start in range(0, len(unique), LOOKUP_CHUNK):
        chunk = unique[start : start + LOOKUP_CHUNK]
        found.update(dataset.to_table(columns=["id"], filter=sql_in(chunk))["id"].to_pylist())
    return found


# -- the write tasks ----------------------------------------------------------------------------------------


def _counts() -> dict[str, int]:
    return {"read": 0, "embedded": 0, "errored": 0, "already_done": 0, "duplicates": 0}


def datasink(target: Target, schema):
    """The Ray Data sink of one group of units; `schema`: the vectors table's Arrow schema."""
    from ray.data.datasource.datasink import Datasink

    class BackfillDatasink(Datasink):
        def __init__(self):
            self.returns: list[dict[str, Any]] = []

        def get_name(self) -> str:
            return "WriteVectors"

        def write(self, blocks, ctx) -> dict[str, Any]:
            return write_blocks(target, schema, blocks)

        def on_write_complete(self, write_result) -> None:
            self.returns = list(write_result.write_returns)

    return BackfillDatasink()


def write_blocks(target: Target, schema, blocks) -> dict[str, Any]:
    """One write task: its blocks' vectors as fragments of the vectors table, the rest accounted for."""
    import lance
    import pyarrow as pa

    counts, units, errors, parts = _counts(), {}, [], []
    for block in blocks:
        if block.num_rows == 0:
            continue
        status = block["status"].to_pylist()
        ids = block["id"].to_pylist()
        for origin in block["origin"].to_pylist():
            unit = origin.split(":", 1)[0]
            units[unit] = units.get(unit, 0) + 1
        take = []
        for i, (row_id, state) in enumerate(zip(ids, status, strict=True)):
            counts["read"] += 1
            if state == "ok":
                take.append(i)
            elif state == "done":
                counts["already_done"] += 1
            elif state == "repeat":
                counts["duplicates"] += 1
            elif state == "error":
                errors.append(_error(block, i, block["stage"][i].as_py(), block["reason"][i].as_py()))
            else:
                raise RuntimeError(f"row {row_id!r} reached the writer with status {state!r}")
        if take:
            rows = block.take(take)
            parts.append(table_rows(rows, schema, dict(target.kept_types)))
    fragments, retried = [], []
    if parts:
        data = pa.concat_tables(parts)
        counts["embedded"] = data.num_rows
        options = dict(target.storage_options) or None
        fragments = lance.fragment.write_fragments(
            data, target.vectors_uri, schema=schema, storage_options=options
        )
        if target.retry_errors:
            retried = sorted(committed_ids(target, "errors", data["id"].to_pylist()))
    counts["errored"] = len(errors)
    return {
        "fragments": [pickle.dumps(f) for f in fragments],
        "errors": errors,
        "retried": retried,
        "counts": counts,
        "units": units,
    }


def _error(block, i: int, stage: str, reason: str) -> dict[str, str]:
    return {
        "id": block["id"][i].as_py(),
        "source": block["source"][i].as_py(),
        "stage": stage,
        "reason": reason,
    }


def table_rows(rows, schema, kept_types: dict[str, str]):
    """The rows in the vectors table's schema (their kept values typed when read, `pipelines.kept`)."""
    import pyarrow as pa

    from pipelines.sink import kept_arrays

    kept = kept_arrays(rows, schema, list(kept_types))
    columns = [rows[c].cast(schema.field(c).type) for c in VECTOR_COLUMNS] + [kept[c] for c in kept_types]
    return pa.table(columns, schema=schema)


# -- the commit ---------------------------------------------------------------------------------------------


@dataclass
class WaveCommit:
    counts: dict[str, int]
    rows_by_unit: dict[str, int]
    commits: int = 0


def commit_wave(
    target: Target, tables, returns: list[dict[str, Any]], unit_keys: dict[str, str]
) -> WaveCommit:
    """Commit one group's write results: errors (upserted by id), retried ids out of the errors table, the
    vector fragments (one append), then the units in the progress table. `tables`: (vectors, errors, progress)
    LanceDB tables; `unit_keys`: unit number -> `WorkUnit.key` for every unit of the group."""
    import lance
    import pyarrow as pa

    from pipelines.progress import record_units
    from pipelines.table import errors_schema

    vectors, errors, progress = tables
    counts, rows_by_unit = _counts(), dict.fromkeys(unit_keys.values(), 0)
    error_rows, retried, fragments = [], [], []
    for result in returns:
        for key, value in result["counts"].items():
            counts[key] += value
        for unit, rows in result["units"].items():
            rows_by_unit[unit_keys[unit]] += rows
        error_rows.extend(result["errors"])
        retried.extend(result["retried"])
        fragments.extend(pickle.loads(f) for f in result["fragments"])
    counts["errored"] = len(error_rows)
    commits = 0
    if error_rows:
        data = pa.Table.from_pylist(error_rows, schema=errors_schema())
        errors.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        commits += 1
    for start in range(0, len(retried), LOOKUP_CHUNK):  # before the vectors: a crash between redoes them
        errors.delete(sql_in(retried[start : start + LOOKUP_CHUNK]))
        commits += 1
    if fragments:
        options = dict(target.storage_options) or None
        latest = lance.dataset(target.vectors_uri, storage_options=options)
        lance.LanceDataset.commit(
            target.vectors_uri,
            lance.LanceOperation.Append(fragments),
            read_version=latest.version,
            storage_options=options,
        )
        commits += 1
    record_units(progress, rows_by_unit)
    commits += 1
    uris = (target.vectors_uri, target.errors_uri)
    off_driver(update_id_indexes, uris, dict(target.storage_options) or None)  # grows with the table
    for table in (vectors, errors):
        table.checkout_latest()
    return WaveCommit(counts, rows_by_unit, commits)


def update_id_indexes(uris: tuple[str, ...], storage_options: dict | None) -> None:
    """The BTREE index on `id` the look-ups use, in each table: made once the table has rows, then brought up
    to date; the table compacted when a run has left it more than `MAX_FRAGMENTS` fragments. Safe to run
    twice (Ray retries it where its worker died)."""
    import lance

    for uri in uris:
        try:
            _update_id_index(lance, uri, storage_options)
        except Exception as exc:  # an index is an optimisation: the look-up scans without it
            log.warning("could not update the id index of %s: %s", uri, exc)


def _update_id_index(lance, uri: str, storage_options: dict | None) -> None:
    dataset = lance.dataset(uri, storage_options=storage_options)
    if dataset.count_rows() == 0:
        return
    names = [i["name"] if isinstance(i, dict) else i.name for i in dataset.list_indices()]
    if ID_INDEX in names:
        dataset.optimize.optimize_indices(index_names=[ID_INDEX])
    else:
        dataset.create_scalar_index("id", "BTREE", name=ID_INDEX)
    dataset = lance.dataset(uri, storage_options=storage_options)
    if len(dataset.get_fragments()) > MAX_FRAGMENTS:
        dataset.optimize.compact_files()
