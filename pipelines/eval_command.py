"""`vlm-embed eval`: retrieval quality of a table on labelled queries, as a terminal table, JSON and a chart.

The work is `pipelines.eval_run.evaluate` (the Python API); this module parses the command line, prints the
runs side by side with their differences from the first, writes `--json` and draws `--plot` (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipelines.config import DEFAULT_TABLE_NAME, EmbedderConfig, TableConfig
from pipelines.config_flags import add_config_flags, config_from_flags
from pipelines.eval import METRICS

EXIT_USAGE = 2
MODES = ("vector", "text", "hybrid")

DESCRIPTION = """\
Measure retrieval on labelled queries: each query of QUERIES.jsonl is searched in the table (as `vlm-embed
search` would: the table's own embedder, its query prompt) and scored against its labels: Recall@1/5/10,
MRR@10 and nDCG@10, next to what a shuffled ranking of the same table scores, and the query latency (one
query's embedding and search; mean, p50, p95).

A query line is {"id": ..., "text": ... and/or "image": FILE, "relevant": [ids] or {id: grade}}; a grade is a
number above 0 (higher: more relevant), a plain list means grade 1 each.

Either --table (a table made by `vlm-embed backfill`) or --corpus FILE (a JSONL, Parquet or CSV file with ids
and texts, embedded on the fly by the normal backfill on a local Ray into a temporary table, with the
embedder options given here). Give --mode more than once to compare search modes on one table.
--compare A.json B.json ... prints earlier runs side by side instead, with each one's difference from the first.

examples:
  vlm-embed eval queries.jsonl --table ./data/lancedb --json vector.json
  vlm-embed eval queries.jsonl --corpus passages.jsonl --backend sentence-transformers --model DIR
  vlm-embed eval queries.jsonl --table ./data/lancedb --mode vector --mode hybrid --plot modes.png
  vlm-embed eval --compare minilm.json tiny.json --plot compare.png
"""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queries", nargs="?", type=Path, metavar="QUERIES.jsonl", help="the labelled queries")
    where = parser.add_argument_group("what to evaluate")
    where.add_argument("--table", metavar="URI", help="a LanceDB made by vlm-embed backfill")
    where.add_argument(
        "--name", default=DEFAULT_TABLE_NAME, help="the vectors table's name (default: %(default)s)"
    )
    where.add_argument(
        "--corpus",
        type=Path,
        metavar="FILE",
        help="embed this JSONL/Parquet/CSV corpus into a temporary table first (the embedder options below)",
    )
    where.add_argument("--id-column", default="id", help="the corpus's id column (default: %(default)s)")
    where.add_argument("--text-column", help="the corpus's text column (default: text)")
    where.add_argument(
        "--keep-table", type=Path, metavar="DIR", help="with --corpus: build the table here and keep it"
    )
    where.add_argument(
        "--mode",
        action="append",
        choices=MODES,
        help="search mode (repeatable: one run each; default: vector)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--label", help="the run's name in tables and charts (default: model and mode)")
    out.add_argument("--json", type=Path, metavar="OUT.json", help="write the runs (metrics, per query) here")
    out.add_argument("--plot", type=Path, metavar="OUT.png", help="draw the runs' metrics side by side")
    out.add_argument(
        "--compare", nargs="+", type=Path, metavar="RUN.json", help="print (and --plot) earlier runs instead"
    )
    add_config_flags(parser, EmbedderConfig)


def run_eval_command(args: argparse.Namespace) -> int:
    from pipelines.eval import QuerySetError
    from pipelines.loading import ModelLoadError
    from pipelines.table import TableConfigMismatch, TableNotFound

    try:
        if args.compare:
            if args.queries or args.table or args.corpus:
                raise UsageError("--compare takes run files only (no QUERIES, --table or --corpus)")
            runs = [run for path in args.compare for run in read_runs(path)]
        else:
            runs = _evaluate(args)
    except (UsageError, QuerySetError, TableNotFound, TableConfigMismatch, ModelLoadError, ValueError) as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_runs(runs))
    if args.json and not args.compare:
        args.json.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            plot_runs(runs, args.plot)
        except UsageError as exc:
            print(f"eval: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


class UsageError(ValueError):
    """A wrong combination of options."""


def _evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from pipelines.eval import read_queries
    from pipelines.eval_run import evaluate, evaluate_corpus

    if args.queries is None:
        raise UsageError("give the labelled queries (QUERIES.jsonl), or --compare RUN.json ...")
    if (args.table is None) == (args.corpus is None):
        raise UsageError("give exactly one of --table URI and --corpus FILE")
    from pipelines.table import RUNTIME_OPTIONS

    embedder_flags = {n for n in EmbedderConfig.model_fields if getattr(args, n, None) is not None}
    if args.table is not None and embedder_flags - set(RUNTIME_OPTIONS):
        raise UsageError(
            f"--table is searched with the embedder it records; "
            f"{sorted(embedder_flags - set(RUNTIME_OPTIONS))} apply to --corpus only"
        )
    queries = read_queries(args.queries)
    modes = args.mode or ["vector"]
    if args.label and len(modes) > 1:
        raise UsageError("--label names one run; leave it out with several --mode")

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            print(f"\reval: {done}/{total} queries", end="\n" if done == total else "", file=sys.stderr)

    options = {"label": args.label, "progress": progress}
    if args.corpus is not None:
        if len(modes) > 1 and args.keep_table is None:
            raise UsageError(
                "several --mode with --corpus need --keep-table DIR (the table is searched again)"
            )
        config = config_from_flags(args, EmbedderConfig)
        first = evaluate_corpus(
            args.corpus,
            config,
            queries,
            id_column=args.id_column,
            text_column=args.text_column,
            workdir=args.keep_table,
            mode=modes[0],
            **options,
        )
        rest = [
            evaluate(TableConfig(uri=str(args.keep_table / "lancedb")), queries, mode=m, **options)
            for m in modes[1:]
        ]
        return [first, *rest]
    table = TableConfig(uri=args.table, name=args.name)
    runtime = {"device": args.device, "dtype": args.dtype}
    return [evaluate(table, queries, mode=mode, **runtime, **options) for mode in modes]


def read_runs(path: Path) -> list[dict[str, Any]]:
    """The runs of a file written by `--json`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "metrics" in r for r in runs):
        raise UsageError(f"{path}: not a file written by vlm-embed eval --json")
    return runs


# -- the terminal table ------------------------------------------------------------------------------------


def table_rows(runs: list[dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    """(row name, one value per run): the metrics, the random baseline's nDCG@10, latency and vector size."""
    rows: list[tuple[str, list[float | None]]] = [(m, [r["metrics"][m] for r in runs]) for m in METRICS]
    rows.append(("random ndcg@10", [r.get("random", {}).get("ndcg@10") for r in runs]))
    rows.append(("latency p50 ms", [r.get("latency_ms", {}).get("p50") for r in runs]))
    rows.append(("latency p95 ms", [r.get("latency_ms", {}).get("p95") for r in runs]))
    rows.append(("bytes/vector", [r.get("bytes_per_vector") for r in runs]))
    rows.append(("dimensions", [r.get("vector_dimension") for r in runs]))
    return rows


def format_runs(runs: list[dict[str, Any]]) -> str:
    """The runs side by side (one column each) and, for each run after the first, its difference from the
    first (Δ columns)."""
    labels = [str(r.get("label") or f"run {i + 1}") for i, r in enumerate(runs)]
    header = ["", *labels, *(f"Δ {label}" for label in labels[1:])]
    lines = []
    for name, values in table_rows(runs):
        cells = [name, *(_cell(name, v) for v in values)]
        base = values[0]
        cells += [_delta(name, v, base) for v in values[1:]]
        lines.append(cells)
    corpus = ", ".join(
        f"{r.get('queries')} queries / {r.get('table', {}).get('rows')} rows" for r in runs[:1]
    )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = [f"eval: {corpus}"]
    for row in [header, *lines]:
        out.append(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    missing = sorted({doc for r in runs for doc in r.get("missing_relevant", [])})
    if missing:
        out.append(
            f"note: {len(missing)} labelled ids are not in the table (they count as not found): {missing[:5]}"
        )
    return "\n".join(out)


def _cell(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name in ("bytes/vector", "dimensions"):
        return f"{int(value)}"
    return f"{value:.1f}" if "ms" in name else f"{value:.4f}"


def _delta(name: str, value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    diff = value - base
    if name in ("bytes/vector", "dimensions"):
        return f"{int(diff):+d}"
    return f"{diff:+.1f}" if "ms" in name else f"{diff:+.4f}"


# -- the chart -----------------------------------------------------------------------------------------------


def plot_runs(runs: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars, one group per metric and one bar per run, the random baseline's nDCG@10 as a dashed
    line, and each run's p50 latency in its legend entry (matplotlib's Agg backend, no display)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'vlm-embed[eval]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(runs)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(METRICS)), 4.0))
    for i, run in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(METRICS))]
        p50 = run.get("latency_ms", {}).get("p50")
        label = str(run.get("label") or f"run {i + 1}") + (f" (p50 {p50:.0f} ms)" if p50 is not None else "")
        bars = axes.bar(xs, [run["metrics"][m] for m in METRICS], width, label=label)
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    randoms = [r.get("random", {}).get("ndcg@10") for r in runs if r.get("random")]
    if randoms:
        axes.axhline(max(randoms), color="grey", linestyle="--", linewidth=1, label="random ranking nDCG@10")
    axes.set_xticks(range(len(METRICS)), METRICS)
    axes.set_ylim(0, 1.25)  # room for the legend above bars that reach 1
    axes.set_ylabel("score")
    first = runs[0]
    axes.set_title(f"retrieval on {first.get('queries')} queries, {first.get('table', {}).get('rows')} rows")
    axes.legend(fontsize=8, loc="upper center", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
