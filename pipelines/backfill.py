"""The backfill job: sources -> Ray Data (prepare on CPUs, embed on GPUs) -> LanceDB, resumable, exactly once.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pipelines.backends import embedding_dimension
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.config_flags import add_config_flags, with_flags
from pipelines.ray_cluster import ray_address, resolve_num_gpus
from pipelines.readers import is_uri

log = logging.getLogger(__name__)

EXIT_USAGE = 2
SECTIONS = {"embedder": EmbedderConfig, "table": TableConfig, "resources": ResourcesConfig}
SKIPPED_FLAGS = ("storage_options",)


@dataclass(frozen=True)
class BackfillSummary:
    """What a run did. `read == embedded + skipped + errored` (skipped: already done, or a repeated id)."""

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

    @property
    def adds_up(self) -> bool:
        return self.read == self.embedded + self.skipped + self.errored

    def line(self) -> str:
        return (
            f"backfill: read {self.read} = embedded {self.embedded} + skipped {self.skipped} "
            f"({self.already_done} already done, {self.duplicates} repeated ids) + errored {self.errored} "
            f"in {self.seconds:.1f} s; {self.table}: {self.vectors_in_table} vectors, "
            f"{self.errors_in_table} errors"
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

    `on_batch(rows)`, if given, is called after each output batch reaches the sink (benchmarks time the steady
    state with it). `quiet`: if this call starts Ray, Ray's own output goes to its log files."""
    from pipelines.readers import read_source
    from pipelines.sink import BackfillSink
    from pipelines.source_check import check_sources
    from pipelines.stages import build_pipeline, done_set

    start = time.perf_counter()
    if not config.sources:
        raise ValueError("the config names no sources")
    config = absolute_paths(config, os.getcwd())
    check_sources(config.sources)  # before Ray starts and before a table is touched: fail in a second
    dimension = embedding_dimension(config.embedder)
    kept = kept_columns(config)
    connect_ray(config.resources, quiet)  # before LanceDB starts its threads: Ray forks its processes
    sink = BackfillSink(config.table, config.embedder, dimension, kept)
    done = sink.open()
    datasets = [read_source(source) for source in config.sources]
    if done:
        log.info("resuming: %d ids are already in the tables and will be skipped", len(done))
    num_gpus = resolve_num_gpus(config.resources.num_gpus_per_actor)
    pipeline = build_pipeline(datasets, config, done_set(sorted(done)), num_gpus, dimension)
    try:
        for batch in pipeline.iter_batches(batch_size=None, batch_format="pyarrow"):
            sink.write(batch)
            if on_batch is not None:
                on_batch(batch.num_rows)
    except BaseException:
        _commit_what_is_done(sink)
        raise
    counts = sink.close()
    if counts.read and not counts.embedded + counts.errored:
        log.info("nothing left to do: all %d rows were already in the tables", counts.read)
    summary = BackfillSummary(
        read=counts.read,
        embedded=counts.embedded,
        skipped=counts.skipped,
        errored=counts.errored,
        already_done=counts.already_done,
        duplicates=counts.duplicates,
        seconds=time.perf_counter() - start,
        table=f"{config.table.uri}/{config.table.name}",
        vectors_in_table=sink.vectors.count_rows(),
        errors_in_table=sink.errors.count_rows(),
        indexes=tuple(sink.indexes),
    )
    if not summary.adds_up:  # the sink counts every row it receives; this can only be a bug
        raise RuntimeError(f"the counts do not add up: {summary.line()}")
    return summary


def kept_columns(config: Config) -> dict[str, str]:
    """Every source's kept columns with their types; one column kept by two sources must have one type."""
    kept: dict[str, str] = {}
    for source in config.sources:
        for name in source.keep_columns:
            kind = source.keep_types.get(name, "string")
            if kept.setdefault(name, kind) != kind:
                raise ValueError(f"kept column {name!r} is {kept[name]} in one source and {kind} in another")
    return kept


def _commit_what_is_done(sink) -> None:
    """A failing pipeline still commits the finished rows it handed over, so a rerun has less to do."""
    try:
        sink.flush_vectors()
        sink.flush_errors()
    except Exception as exc:
        log.warning("could not commit the buffered rows: %s", exc)


# -- command line --------------------------------------------------------------------------------------------


DESCRIPTION = """\
Backfill: embed sources (JSONL/CSV/Parquet tables of texts, image paths or bytes, pairs; image folders) into a
LanceDB vectors table, with an errors table beside it. Rows already in either table are skipped, so rerunning
the same job resumes it. Without --config, the bundled sample corpus is embedded with the tiny model into
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
