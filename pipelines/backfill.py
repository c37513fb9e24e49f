"""The backfill job: sources -> Ray Data (prepare on CPUs, embed on GPUs) -> LanceDB, resumable, exactly once.

The inputs are split into work units (`pipelines.work_units`); units already recorded in the progress table
(`pipelines.progress`) are skipped unread, the rest run as one Ray Data execution whose write tasks write
Lance fragments (`pipelines.lance_write`), in groups of about `commit_rows` rows: each group's fragment
metadata is committed once all its units are back (`pipelines.commit_groups`), while the execution goes on. The driver holds O(units) state and no vectors. After the run, `pipelines.table_upkeep` compacts
and indexes the table, in a Ray worker process (its memory grows with the table; the driver's does not).

    python -m pipelines.backfill --config job.yaml            # or: vlm-embed backfill --config job.yaml
    ray job submit --working-dir . -- python -m pipelines.backfill --config job.yaml

Without `--config` it backfills the bundled sample corpus (texts, images, pairs) into ./data/lancedb with the
tiny offline model. Flags override the config file's values. Python callers use `run_backfill(config)`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from pipelines.backends import embedding_dimension
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.config_flags import add_config_flags, with_flags
from pipelines.kept import kept_types
from pipelines.ray_cluster import off_driver, ray_address, resolve_num_gpus
from pipelines.readers import is_uri

log = logging.getLogger(__name__)

EXIT_USAGE = 2
SECTIONS = {"embedder": EmbedderConfig, "table": TableConfig, "resources": ResourcesConfig}
SKIPPED_FLAGS = ("storage_options",)


@dataclass(frozen=True)
class BackfillSummary:
    """What a run did. `read == embedded + skipped + errored` (skipped: already done, or a repeated id).
    `read` includes the rows of the units skipped unread (their count is in the progress table)."""

    read: int
    embedded: int
    skipped: int
    errored: int
    already_done: int
    duplicates: int
    seconds: float
    table: str
    vectors_in_table: int
    errors_in_table: int
    indexes: tuple[str, ...] = ()
    units: int = 0
    units_skipped: int = 0
    commits: int = 0
    upkeep: str = ""
    window_wait_s: float = 0.0  # the read tasks' seconds waiting for the read-ahead window, together
    start_up: dict[str, float] = field(default_factory=dict)  # the embedding workers' (`embed_pool.start_up`)

    @property
    def adds_up(self) -> bool:
        return self.read == self.embedded + self.skipped + self.errored

    def line(self) -> str:
        return (
            f"backfill: read {self.read} = embedded {self.embedded} + skipped {self.skipped} "
            f"({self.already_done} already done, {self.duplicates} repeated ids) + errored {self.errored} "
            f"in {self.seconds:.1f} s; {self.table}: {self.vectors_in_table} vectors, "
            f"{self.errors_in_table} errors; {self.units} work units ({self.units_skipped} committed before, "
            f"not read), {self.commits} commits; upkeep: {self.upkeep or 'none'}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def sample_job_config(uri: str | None = None) -> Config:
    """The bundled sample job (`pipelines/sample_data/backfill.yaml`: texts, pairs, an image folder, the tiny
    model), with its paths made absolute so it runs from any directory; `uri` replaces its table URI."""
    from pipelines.sample import SAMPLE_DIR

    config = Config.from_yaml(SAMPLE_DIR / "backfill.yaml")
    root = SAMPLE_DIR.parent.parent  # the paths in the file are relative to the repository root
    sources = [s.model_copy(update={"path": str(root / s.path)}) for s in config.sources]
    table = config.table.model_copy(update={"uri": uri}) if uri else config.table
    return config.model_copy(update={"sources": sources, "table": table})


# -- Ray -----------------------------------------------------------------------------------------------------


def connect_ray(resources: ResourcesConfig, quiet: bool = False) -> None:
    """Join the cluster the job runs on: `ray_address`, else RAY_ADDRESS (set by `ray job submit`), else a new
    local Ray. A session that is already initialised (a notebook, a test) is used as it is. `quiet`: Ray's own
    output goes to its log files (`pipelines.ray_logs`)."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(resources.ray_address)
    if quiet:
        from pipelines.ray_logs import init_ray_quietly

        init_ray_quietly(address)
    else:
        ray.init(address=address)


def absolute_paths(config: Config, cwd: str) -> Config:
    """Local relative paths (sources, image roots, the table) made absolute against `cwd`, before Ray starts.

    Under `ray job submit --working-dir`, Ray 2.60 extracts the working dir again when the driver connects,
    replacing the directory the driver runs in, so relative paths stop resolving after `ray.init`. The
    absolute path is the same on every node (the session's directory), so workers read the same files."""

    def absolute(path: str | None) -> str | None:
        if path is None or is_uri(path):
            return path
        return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))

    sources = [
        s.model_copy(update={"path": absolute(s.path), "image_root": absolute(s.image_root), "name": s.label})
        for s in config.sources
    ]
    table = config.table.model_copy(update={"uri": absolute(config.table.uri)})
    return config.model_copy(update={"sources": sources, "table": table})


# -- the job -------------------------------------------------------------------------------------------------


def run_backfill(
    config: Config, on_batch: Callable[[int], None] | None = None, quiet: bool = False
) -> BackfillSummary:
    """Embed every source row into the vectors table or record it in the errors table, exactly once.

    `on_batch(rows)`, if given, is called after each commit with the rows it accounted for (benchmarks time
    the steady state with it). `quiet`: if this call starts Ray, Ray's own output goes to its log files."""
    from pipelines import progress
    from pipelines.image_listing import ListingPlace, remove_listings
    from pipelines.source_check import check_sources
    from pipelines.table_upkeep import upkeep
    from pipelines.work_units import plan_units, waves

    start, started = time.perf_counter(), time.time()
    if not config.sources:
        raise ValueError("the config names no sources")
    config = absolute_paths(config, os.getcwd())
    check_sources(config.sources)  # before Ray starts and before a table is touched: fail in a second
    dimension = embedding_dimension(config.embedder)
    kept = kept_types(config.sources)  # every source's kept columns, each with one type
    listings = ListingPlace(
        config.table.uri, config.table.name, tuple(sorted(config.table.storage_options.items()))
    )
    units = plan_units(config.sources, config.table.unit_bytes, config.table.unit_files, listings)
    connect_ray(config.resources, quiet)  # before LanceDB starts its threads: Ray forks its processes
    tables = open_tables(config.table, config.embedder, dimension, kept)
    recorded = {} if config.table.retry_errors else progress.committed_units(tables[2])
    todo = [(n, u) for n, u in enumerate(units) if u.key not in recorded]
    before = sum(recorded[u.key] for u in units if u.key in recorded)
    totals = {"read": before, "embedded": 0, "errored": 0, "already_done": before, "duplicates": 0}
    if len(todo) < len(units):
        log.info(
            "resuming: %d of %d work units (%d rows) are committed and will not be read",
            len(units) - len(todo),
            len(units),
            before,
        )
    commits, waited, start_up = 0, 0.0, {}
    try:
        if todo:
            groups = waves(todo, config.table.commit_rows)
            commits, waited, start_up = _run_groups(
                config, groups, tables, kept, dimension, totals, on_batch, started
            )
    finally:
        remove_listings(listings, range(len(config.sources)))
    if totals["read"] and not totals["embedded"] + totals["errored"]:
        log.info("nothing left to do: all %d rows were already in the tables", totals["read"])
    kept_up = off_driver(upkeep, config.table, bool(totals["embedded"] + totals["errored"]))
    for table in tables[:2]:
        table.checkout_latest()  # the run's commits, the compaction and the indexes were made elsewhere
    summary = BackfillSummary(
        read=totals["read"],
        embedded=totals["embedded"],
        skipped=totals["already_done"] + totals["duplicates"],
        errored=totals["errored"],
        already_done=totals["already_done"],
        duplicates=totals["duplicates"],
        seconds=time.perf_counter() - start,
        table=f"{config.table.uri}/{config.table.name}",
        vectors_in_table=tables[0].count_rows(),
        errors_in_table=tables[1].count_rows(),
        indexes=tuple(kept_up.indexes),
        units=len(units),
        units_skipped=len(units) - len(todo),
        commits=commits,
        upkeep=kept_up.phrase(),
        window_wait_s=waited,
        start_up=start_up,
    )
    if not summary.adds_up:  # the writers count every row they receive; this can only be a bug
        raise RuntimeError(f"the counts do not add up: {summary.line()}")
    return summary


def _run_groups(
    config: Config,
    groups: list,
    tables,
    kept: dict[str, str],
    dimension: int,
    totals,
    on_batch,
    started: float,
):
    """The groups' units as one Ray Data execution; each group commits as soon as all its units are back
    (`commit_groups`), while later groups are still read, prepared and embedded. The embedding workers
    (`EmbedPool`) start first and load the model while the first units are read and prepared. Adds to
    `totals`; returns the number of commits, the read tasks' seconds of waiting for the window and the
    workers' start (`embed_pool.start_up`, seconds after `started`, the run's wall-clock start)."""
    import ray

    from pipelines import lance_write
    from pipelines.commit_groups import GroupTracker, start_ledger
    from pipelines.embed_pool import EmbedPool, start_up, start_up_line
    from pipelines.stages import build_pipeline
    from pipelines.work_units import units_dataset

    # the reads' and writes' task caps are ours on purpose: a run of fewer units than the cap is no mistake
    # (Ray Data warns from its executor's thread, so the filter is global; it matches this warning only)
    warnings.filterwarnings(
        "ignore", message="The maximum number of concurrent tasks for", category=UserWarning
    )
    resources = config.resources
    num_gpus = resolve_num_gpus(resources.num_gpus_per_actor)
    pool = EmbedPool.start(
        config.embedder.model_dump_json(),
        dimension,
        resources.max_actors,
        num_gpus,
        resources.num_cpus_per_actor,
    )
    start_versions = (tables[0].version, tables[1].version)
    claims = lance_write.start_claims(CLAIM_PARTITIONS, start_versions)
    tracker = GroupTracker(groups)
    slack = resources.prepare_batch_rows + resources.batch_rows  # rows the stages' batches may hold back
    ledger = start_ledger(tracker.group_of, WINDOW_GROUPS, slack)
    target = _target(config.table, kept, claims, start_versions)
    commits = 0

    def commit(group) -> int:
        done = lance_write.commit_wave(target, tables, group.pieces, group.units)
        versions = (tables[0].version, tables[1].version)  # the commit's (commit_wave checked them out)
        lance_write.release_claims(claims, list(group.units), versions)
        ledger.commit.remote(group.index)
        for key, value in done.counts.items():
            totals[key] += value
        log.info(
            "committed group %d of %d: %d vectors, %d error rows (%d vectors, %d errors in this run; "
            "%d more group(s) under way)",
            group.index + 1,
            len(groups),
            done.counts["embedded"],
            done.counts["errored"],
            totals["embedded"],
            totals["errored"],
            tracker.in_flight(),
        )
        if on_batch is not None:
            on_batch(done.counts["read"])
        return done.commits

    try:
        todo = [pair for group in groups for pair in group]
        pipeline = build_pipeline(
            units_dataset(todo, config.sources, ledger), config, target, num_gpus, pool=pool
        )
        written = lance_write.write_stage(pipeline, target, tables[0].to_lance().schema)
        # prefetch_batches=0: with Ray Data's default of 1 the iterator hands a block on only once the next one
        # exists, so the last pieces before the window closes would wait for pieces that wait for them
        for batch in written.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            pieces = lance_write.write_results(batch)
            for piece in pieces:
                tracker.add(piece)
            ledger.wrote.remote(sum(p["counts"]["read"] for p in pieces))
            if any(p["unit"] not in tracker.rows for p in pieces):  # about once per unit
                tracker.read(ray.get(ledger.take.remote()))
            for group in tracker.ready():
                commits += commit(group)
        tracker.read(ray.get(ledger.take.remote()))
        for group in tracker.ready():  # groups of units without rows only
            commits += commit(group)
        tracker.check_finished()
        escapes = ray.get(ledger.escaped.remote())
        if escapes:
            log.info("read %d unit(s) ahead of the window, to fill the stages' last batches", escapes)
        held, waited = ray.get(ledger.held_back.remote())
        if held:
            log.info(
                "%d unit(s) waited %.1f s in all for the read-ahead window (the stages after the reads were "
                "the slower part)",
                held,
                waited,
            )
    finally:
        lance_write.stop_claims((*claims, ledger))
        loads, times = pool.stop()
    log.info(
        "%d embedding worker(s) loaded the model %s time(s) for %d group(s)",
        len(pool.workers),
        loads,
        len(groups),
    )
    figures = start_up(times, started)
    if figures:
        log.info("%s", start_up_line(figures))
    return commits, waited, figures


WINDOW_GROUPS = 3  # groups read ahead of the oldest uncommitted one (`commit_groups.UnitLedger`)
CLAIM_PARTITIONS = 2  # IdClaims actors per run, each holding the ids hashed to it of the groups in flight


def open_tables(table: TableConfig, embedder: EmbedderConfig, dimension: int, kept: dict[str, str]):
    """The vectors, errors and progress tables, checked against this job (or dropped first, with
    mode=overwrite) and made empty where missing."""

    from pipelines.kept import check_kept_types, kept_type
    from pipelines.progress import open_progress, progress_name
    from pipelines.table import TableConfigMismatch, check_matches, connect, errors_schema, vectors_schema

    db = connect(table)
    if table.mode == "overwrite":
        for name in (table.name, table.errors_name, progress_name(table)):
            db.drop_table(name, ignore_missing=True)
    vectors = _open(db, table.name)
    if vectors is None:
        fields = list(kept_type(kept))  # the readers' struct fields, as table columns
        vectors = db.create_table(table.name, schema=vectors_schema(embedder, dimension, fields))
    else:
        check_matches(vectors, embedder, dimension)
        missing = [c for c in kept if c not in vectors.schema.names]
        if missing:
            raise TableConfigMismatch(
                f"table {table.name!r} has no column(s) {missing} to keep; "
                "use mode: overwrite to rebuild it with them"
            )
        check_kept_types(vectors.schema, kept, table.name)  # the readers type values the config's way
    errors = _open(db, table.errors_name)
    if errors is None:
        errors = db.create_table(table.errors_name, schema=errors_schema())
    return vectors, errors, open_progress(db, table)


def _open(db, name: str):
    try:
        return db.open_table(name)
    except (FileNotFoundError, ValueError):
        return None


def _target(table: TableConfig, kept: dict[str, str], claims: tuple, start: tuple):
    from pipelines.lance_write import Target, dataset_uri

    return Target(
        vectors_uri=dataset_uri(table.uri, table.name),
        errors_uri=dataset_uri(table.uri, table.errors_name),
        storage_options=tuple(sorted(table.storage_options.items())),
        retry_errors=table.retry_errors,
        start_versions=start,
        kept_types=tuple(kept.items()),
        claims=claims,
    )


# -- command line --------------------------------------------------------------------------------------------


DESCRIPTION = """\
Backfill: embed sources (JSONL/CSV/Parquet tables of texts, image paths or bytes, pairs; image folders) into a
LanceDB vectors table, with an errors table beside it. Inputs are split into work units (JSONL byte ranges,
Parquet row groups, CSV files, chunks of images); the workers write, the driver commits a group of units at a
time, and rerunning the same job resumes it: committed units are skipped unread, rows already in either table
are skipped. Without --config, the bundled sample corpus is embedded with the tiny model into
./data/lancedb. Flags override the config file.

examples:
  vlm-embed backfill
  vlm-embed backfill --config job.yaml --retry-errors
  vlm-embed backfill --source jsonl:docs.jsonl --source images:photos/ --uri ./data/lancedb
  ray job submit --working-dir . -- python -m pipelines.backfill --config job.yaml
"""


def add_backfill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="JOB.YAML", help="a job config (pipelines.config.Config as YAML)")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="KIND:PATH",
        help="a source (jsonl, csv, parquet or images) instead of the config's; repeatable; columns: "
        "'id' is not used (content-hash ids), 'text' and 'image' are found by name",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's own output (start-up, Ray Data's plan and progress logs, the workers' output); "
        "without it, that goes to the Ray session's log files (/tmp/ray/session_*/logs on a local Ray)",
    )
    for section in SECTIONS.values():
        add_config_flags(parser, section, skip=SKIPPED_FLAGS)


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (or the sample job), with the flags given on the command line on top."""
    config = with_flags(Config.from_yaml(args.config) if args.config else sample_job_config(), args, SECTIONS)
    if args.source:
        sources = [_parse_source(spec).model_dump() for spec in args.source]
        config = Config.model_validate({**config.model_dump(), "sources": sources})
    return config


def _parse_source(spec: str) -> SourceConfig:
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"--source {spec!r}: expected KIND:PATH, e.g. jsonl:docs.jsonl or images:photos/")
    return SourceConfig(kind=kind, path=path)


def run_backfill_command(args: argparse.Namespace) -> int:
    """Run the job from parsed arguments and print the summary line; a bad config is one clear line, exit 2."""
    from ray.exceptions import RayError

    from pipelines.loading import ModelLoadError
    from pipelines.ray_logs import ConsoleHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[ConsoleHandler()])
    verbose = getattr(args, "verbose", False)
    if not verbose:  # before transformers is imported: its progress bars (a model's shards) read this once
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("LANCE_LOG", "error")  # Lance's Rust warnings (a table made empty) on stderr
    try:
        summary = run_backfill(config_from_args(args), quiet=not verbose)
    except (FileNotFoundError, ModelLoadError, ValueError) as exc:
        if isinstance(exc, RayError):  # a failure inside the pipeline: keep Ray's traceback
            raise
        print(f"backfill: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.line(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.backfill",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_backfill_arguments(parser)
    return run_backfill_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
