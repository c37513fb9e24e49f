"""The backfill's write path: Ray Data tasks write Lance fragments, the driver commits their metadata.

Lance's documented distributed write: workers write data files (fragments) straight to the table's storage,
then one process commits the fragments' metadata as one new table version. Here:

- `write_blocks` (a Ray Data task of the write stage, on any node) turns the embedded rows into the vectors
  table's schema (the kept columns as the readers typed them), writes them as fragments with
  `lance.fragment.write_fragments`, and returns the fragments' metadata, the task's error rows (small: no
  vectors), its counts and the rows it saw per work unit. No vector passes through the driver.
- `commit_wave` (the driver, once per group of units, as soon as every unit of the group has come back:
  `pipelines.commit_groups`): upserts the error rows into the errors table, deletes the retried ids that now
  have a vector from it, appends the fragments to the vectors table in one commit, records the units in the
  progress table (`pipelines.progress`), and brings the `id` index up to date (in a Ray worker process: its
  memory grows with the table).

One Ray Data execution runs all of a run's pending units; the write stage (`write_stage`) is a `map_batches`
whose few-byte output rows (the write results) stream to the driver, so a group commits while later groups
are still read, prepared and embedded: no barrier between groups.

Why our own write stage and not `lance_ray.LanceDatasink` (lance-ray 0.5 works with pylance 14 and Ray 2.60
here, Ray's own `write_lance` does not): lance-ray's sink writes one table and commits once, in its
`on_write_complete` at the end of the execution; a backfill's rows go to two tables (vectors, errors), the
commit has to record which work units it completes, and it has to come per group while the execution goes on
(a `Datasink` hands its results over only when the whole execution has ended). We use the same pylance calls
lance-ray makes (`write_fragments`, `LanceDataset.commit` with `LanceOperation.Append`).

Exactly once, and repeated ids (the guarantee and its cost): before any work, each row is
1. claimed in an `IdClaims` actor (hash-partitioned by id over `claim_partitions` actors): the first
   occurrence of an id among the groups not yet committed wins, a repeat is counted and dropped; a task that
   Ray retries claims its own rows again (the claim is keyed by the row's origin). A group's claims are
   released once the group has committed (`release_claims`), together with the table versions that commit
   made, so the actors hold the ids of the groups in flight only (a few times `commit_rows` ids, ~100 bytes
   each, split over the partitions);
2. looked up by id (`DoneLookup`, a BTREE index on `id`) in the vectors and errors tables at the newest
   version the claim's answer names: a claim granted after a release was answered after that group's
   commit, with its versions, so a repeat of a committed group's id is found there and one of a group still
   in flight is refused by its claim; found and already there when the run started: `done`, else `repeat`.
A crash at any point leaves the uncommitted groups' units unrecorded; the rerun reads them again and the
look-up finds what was committed. Cost: one claim call and one indexed look-up per block of 256 rows, and
the id index updated after each commit.
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
    """Where a run's units go, as the workers need it (picklable, small)."""

    vectors_uri: str
    errors_uri: str
    storage_options: tuple  # sorted (key, value) pairs
    retry_errors: bool
    start_versions: tuple  # (vectors, errors) when the run started: found there = already done
    kept_types: tuple = ()  # (name, type) pairs
    claims: tuple = field(default=(), compare=False)  # IdClaims actor handles

    def dataset(self, which: str, version: int | None = None):
        """The table at `version` (default: as the run started); `version=LATEST`: the newest, read now."""
        vectors = which == "vectors"
        uri = self.vectors_uri if vectors else self.errors_uri
        if version == LATEST:
            import lance

            return lance.dataset(uri, storage_options=dict(self.storage_options) or None)
        if version is None:
            version = self.start_versions[0 if vectors else 1]
        return _dataset(uri, self.storage_options, version)


LATEST = -1  # Target.dataset: the newest version (opened afresh, never cached)


# -- before the work: claims and look-ups -------------------------------------------------------------------


class IdClaims:
    """The ids of the groups of units in flight, each with the origin of its first occurrence (a Ray actor).

    Ids are held by unit (the origin's "<unit>:" prefix) until their group commits and `release` drops them;
    `versions` is the newest (vectors, errors) table versions a release named, which every claim's answer
    carries: a look-up there sees every group whose ids this actor no longer holds."""

    def __init__(self, versions: tuple = (0, 0)):
        self.owner: dict[str, str] = {}
        self.held: dict[str, list[str]] = {}
        self.versions = tuple(versions)

    def claim(self, ids: list[str], origins: list[str]) -> tuple[list[bool], tuple]:
        granted = []
        for row_id, origin in zip(ids, origins, strict=True):
            first = self.owner.get(row_id)
            if first is None:
                self.owner[row_id] = origin
                self.held.setdefault(origin.split(":", 1)[0], []).append(row_id)
            granted.append(first is None or first == origin)  # equal: a retried task's own row
        return granted, self.versions

    def release(self, units: list[str], versions: tuple) -> int:
        """Drop the ids of these (committed) units; later look-ups use `versions` or newer."""
        dropped = 0
        for unit in units:
            for row_id in self.held.pop(unit, ()):
                del self.owner[row_id]
                dropped += 1
        self.versions = tuple(max(a, b) for a, b in zip(self.versions, versions, strict=True))
        return dropped

    def holding(self) -> int:
        return len(self.owner)


def start_claims(partitions: int, versions: tuple) -> tuple:
    """The run's claim actors; `versions`: the tables' (vectors, errors) versions as the run starts."""
    import ray

    actor = ray.remote(num_cpus=0)(IdClaims)
    return tuple(actor.remote(versions) for _ in range(partitions))


def release_claims(claims: tuple, units: list[str], versions: tuple) -> int:
    """After a group's commit: its units' ids are let go, and look-ups move to `versions` (the commit's)."""
    import ray

    return sum(ray.get([c.release.remote(units, versions) for c in claims]))


def stop_claims(claims: tuple) -> None:
    """End the run's claim actors, or any of its small actors (a driver that runs several backfills, a
    notebook, would keep them all)."""
    import ray

    for actor in claims:
        ray.kill(actor)


def _partition(row_id: str, partitions: int) -> int:
    import zlib

    return zlib.crc32(row_id.encode("utf-8", "surrogatepass")) % partitions


def claim(target: Target, ids: list[str], origins: list[str]) -> tuple[list[bool], tuple]:
    """Whether each row is its id's first occurrence among the groups in flight, and the (vectors, errors)
    versions its look-up is to use (the newest any of the answering actors named)."""
    import ray

    if not target.claims:
        return [True] * len(ids), target.start_versions
    parts = len(target.claims)
    positions: dict[int, list[int]] = {}
    for i, row_id in enumerate(ids):
        positions.setdefault(_partition(row_id, parts), []).append(i)
    refs = {
        p: target.claims[p].claim.remote([ids[i] for i in where], [origins[i] for i in where])
        for p, where in positions.items()
    }
    granted = [True] * len(ids)
    versions = target.start_versions
    for p, (answer, known) in zip(refs, ray.get(list(refs.values())), strict=True):
        for i, ok in zip(positions[p], answer, strict=True):
            granted[i] = ok
        versions = tuple(max(a, b) for a, b in zip(versions, known, strict=True))
    return granted, versions


def committed_ids(target: Target, which: str, ids: list[str], version: int | None = None) -> set[str]:
    """The ids among `ids` that the table held at `version` (default: when the run started; `LATEST`)."""
    dataset = target.dataset(which, version)
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


RESULT = "write_result"  # the write stage's one output column: a pickled piece (`write_blocks`) per row


WRITE_TASKS = 4  # write tasks at once; they ask Ray Data for no CPU (`stages.build_pipeline` says why)


def write_stage(ds, target: Target, schema):
    """`ds` (the embed stage's rows) written: a row per piece (`write_blocks`: a task's rows of one unit), for
    `write_results`; `schema`: the vectors table's Arrow schema."""
    import ray

    return ds.map_batches(
        _write_batch,
        batch_format="pyarrow",
        batch_size=None,  # a task per embedded block, as a Datasink's write tasks have
        fn_kwargs={"target": target, "schema": schema},
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=WRITE_TASKS),
    )


def _write_batch(batch, target: Target, schema):
    import pyarrow as pa

    pieces = write_blocks(target, schema, [batch])
    return pa.table({RESULT: pa.array([pickle.dumps(p) for p in pieces], pa.binary())})


def write_results(batch) -> list[dict[str, Any]]:
    """The pieces in a batch of the write stage's output."""
    return [pickle.loads(b) for b in batch[RESULT].to_pylist()]


def write_blocks(target: Target, schema, blocks) -> list[dict[str, Any]]:
    """One write task: its blocks' vectors as fragments of the vectors table, the rest accounted for; one piece
    per work unit its rows come from (a block may hold rows of several units, and of several groups, which
    commit apart): the unit, its fragments' metadata, error rows, retried ids and counts."""
    import pyarrow as pa

    by_unit: dict[str, list] = {}  # unit -> [(block, row numbers)]
    for block in blocks:
        if block.num_rows == 0:
            continue
        rows: dict[str, list[int]] = {}
        for i, origin in enumerate(block["origin"].to_pylist()):
            rows.setdefault(origin.split(":", 1)[0], []).append(i)
        for unit, taken in rows.items():
            part = block if len(taken) == block.num_rows else block.take(pa.array(taken, pa.int64()))
            by_unit.setdefault(unit, []).append(part)
    return [_piece(target, schema, unit, parts) for unit, parts in by_unit.items()]


def _piece(target: Target, schema, unit: str, blocks) -> dict[str, Any]:
    import lance
    import pyarrow as pa

    counts, errors, parts = _counts(), [], []
    for block in blocks:
        take = []
        for i, (row_id, state) in enumerate(
            zip(block["id"].to_pylist(), block["status"].to_pylist(), strict=True)
        ):
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
            parts.append(table_rows(block.take(take), schema, dict(target.kept_types)))
    fragments, retried = [], []
    if parts:
        data = pa.concat_tables(parts)
        counts["embedded"] = data.num_rows
        options = dict(target.storage_options) or None
        fragments = lance.fragment.write_fragments(
            data, target.vectors_uri, schema=schema, storage_options=options
        )
        if target.retry_errors:
            # the newest errors table: an earlier group of this run may have recorded one of these ids
            retried = sorted(committed_ids(target, "errors", data["id"].to_pylist(), LATEST))
    counts["errored"] = len(errors)
    return {
        "unit": unit,
        "fragments": [pickle.dumps(f) for f in fragments],
        "errors": errors,
        "retried": retried,
        "counts": counts,
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
    target: Target, tables, pieces: list[dict[str, Any]], unit_keys: dict[str, str]
) -> WaveCommit:
    """Commit one group's pieces (`write_results`): errors (upserted by id), retried ids out of the errors
    table, the vector fragments (one append), then the units in the progress table. `tables`: (vectors,
    errors, progress) LanceDB tables; `unit_keys`: unit number -> `WorkUnit.key` for every unit of the group
    (a unit without pieces had no rows)."""
    import lance
    import pyarrow as pa

    from pipelines.progress import record_units
    from pipelines.table import errors_schema

    vectors, errors, progress = tables
    counts, rows_by_unit = _counts(), dict.fromkeys(unit_keys.values(), 0)
    error_rows, retried, fragments = [], [], []
    for result in pieces:
        for key, value in result["counts"].items():
            counts[key] += value
        rows_by_unit[unit_keys[result["unit"]]] += result["counts"]["read"]
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
