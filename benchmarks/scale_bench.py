"""The backfill at scale (issue 15): millions of rows through the pipeline with a near-free embedder, so what is
measured is the pipeline itself (reading, preparing, moving rows, writing, resuming), on 1 and 2 local nodes.

    python -m benchmarks.scale_bench --rows 1000000 --nodes 1 2        # about 10 minutes a pass here
    python -m benchmarks.scale_bench --rows 300 --nodes 1              # a smoke run (what the test runs)

For each corpus size and node count it starts a local Ray cluster (`cluster/local.sh up N-1`: a head and N-1
workers on 127.0.0.1, 2 CPUs each; with `--pin-cores`, node i runs on core i only and the driver on the head's
core, so that on a 2-core machine 2 nodes have twice the cores of 1), runs two passes as separate driver
processes, and prints one table row each:
- `full`: a fresh table, every row of the corpus embedded;
- `resume`: the same job again with a new source of `--new-rows` rows beside the corpus: every corpus row is
  already done, so this is a resume of the full table; its first new row shows how long a resume takes to
  get going.
Per pass: seconds (`run_backfill`'s own, after Ray is connected), rows/s (embedded / seconds), commits (table
versions the pass added to the vectors and errors tables, index builds included), the driver's peak RSS
(`getrusage` in the driver process), the worst peak RSS of any Ray worker process of the cluster (sampled every
`--sample-s`), the seconds from `run_backfill`'s start to the first batch the embedder finished (the stand-in's
trace), and below it each Ray Data operator's busy time: the sum of its tasks' wall time (Ray Data's stats,
taken by an execution callback in the driver), and `driver sink`: the time the driver spent in
`pipelines.sink.BackfillSink.write`/`close`, where the design writes every row from the driver (the old one);
then the driver's RSS at the run's start, its peak up to the last commit and its peak after it (the upkeep),
sampled every 0.25 s, and the peak of each kind of resident memory (`rss_parts`: its own heap, mapped files,
and the pages of Ray's shared object store it has touched, which RSS and `getrusage` count too), and the
read tasks' seconds of waiting for the read-ahead window, taken out of the read stage's busy time; last, the
CPU seconds the cluster's processes used, by node and by what they ran (`ClusterCpu`), and the driver's own:
where busy time is wall time (a task waiting for a core counts), these say where the cores went.

The corpus is generated deterministically into `--workdir` and cached there (Parquet files of
`--rows-per-file` rows: ids `r000000000`..., short texts of 4 to 24 words from the bundled sample texts'
vocabulary, and every 100th row an image-only row naming one of 16 small PNGs). The embedder is
`backend: stand-in` on the tiny checkpoint (`pipelines.stand_in`: the real CPU stage, tokenizer and image
processor; vectors from the token ids, 64-d). `--pythonpath-tree` runs the passes against another checkout of
the project (the design being replaced, in a git worktree), with this script's measuring unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

CORPUS_VERSION = 1
IMAGE_EVERY = 100  # 1% of the rows are images
IMAGE_COUNT = 16
IMAGE_SIDE = 64
MIN_WORDS, MAX_WORDS = 4, 24
REPO = Path(__file__).resolve().parents[1]
STARTS = 8  # attempts at starting the local cluster
COLUMNS = (
    "design",
    "rows",
    "nodes",
    "pass",
    "seconds",
    "rows/s",
    "embedded",
    "skipped",
    "errored",
    "commits",
    "driver peak MiB",
    "worker peak MiB",
    "first row s",
    "busiest stage",
)


# -- the corpus --------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """The words of the bundled sample texts (a vocabulary the tiny tokenizer knows), sorted."""
    from pipelines.sample import SAMPLE_DIR

    lines = (SAMPLE_DIR / "texts.jsonl").read_text().splitlines()
    return sorted({word for line in lines if line.strip() for word in json.loads(line)["text"].split()})


def corpus_rows(start: int, count: int, seed: int, words: list[str], prefix: str = "r") -> dict[str, list]:
    """Rows `start..start+count` of a corpus: `id`, `text` (None on an image row) and `image` (a relative path,
    None on a text row). The same arguments give the same rows on any machine."""
    rng = np.random.default_rng([seed, start])
    vocab = np.array(words, dtype=object)
    lengths = rng.integers(MIN_WORDS, MAX_WORDS + 1, count)
    picks = vocab[rng.integers(0, len(vocab), (count, MAX_WORDS))]
    ids, texts, images = [], [], []
    for offset in range(count):
        index = start + offset
        ids.append(f"{prefix}{index:09d}")
        if index % IMAGE_EVERY == IMAGE_EVERY - 1:
            texts.append(None)
            images.append(f"images/{index % IMAGE_COUNT:02d}.png")
        else:
            texts.append(" ".join(picks[offset, : lengths[offset]]))
            images.append(None)
    return {"id": ids, "text": texts, "image": images}


def write_images(folder: Path, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 999])
    for i in range(IMAGE_COUNT):
        pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{i:02d}.png")


def ensure_corpus(
    folder: Path, rows: int, rows_per_file: int, seed: int, prefix: str = "r", log=print
) -> Path:
    """`folder/part-NNNNN.parquet` files holding `rows` rows, and `folder/images/`; reused when its manifest
    says it was made with the same arguments (a partly written corpus has no manifest and is made again)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = {
        "version": CORPUS_VERSION,
        "rows": rows,
        "rows_per_file": rows_per_file,
        "seed": seed,
        "prefix": prefix,
    }
    marker = folder / "MANIFEST.json"
    if marker.exists() and json.loads(marker.read_text()) == manifest:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    write_images(folder / "images", seed)
    words = vocabulary()
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.string())])
    began = time.perf_counter()
    for number, start in enumerate(range(0, rows, rows_per_file)):
        count = min(rows_per_file, rows - start)
        table = pa.table(corpus_rows(start, count, seed, words, prefix), schema=schema)
        pq.write_table(table, folder / f"part-{number:05d}.parquet", row_group_size=min(count, 65536))
        if number % 10 == 9:
            log(f"scale_bench: corpus {folder.name}: {start + count} of {rows} rows written")
    marker.write_text(json.dumps(manifest))
    log(f"scale_bench: corpus {folder.name}: {rows} rows in {time.perf_counter() - began:.0f} s")
    return folder


# -- one pass, in its own driver process -------------------------------------------------------------------


def execution_callback_class():
    """A Ray Data execution callback that keeps every finished execution's stats summary (in the driver)."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class StatsRecorder(ExecutionCallback):
        summaries: list = []

        def after_execution_succeeds(self, executor) -> None:
            StatsRecorder.summaries.append(executor.get_stats().to_summary())

    return StatsRecorder


StatsRecorder = None  # the class, in a pass process: RAY_DATA_EXECUTION_CALLBACKS names it


def stage_times(summaries: list) -> dict[str, float]:
    """Busy seconds per Ray Data operator (sum of its tasks' wall time), plus the driver's time in user code
    while it iterated the output (`driver loop`), over every execution of the pass."""
    busy: dict[str, float] = {}
    seen: set[int] = set()
    for summary in summaries:
        user = getattr(getattr(summary, "iter_stats", None), "user_time", None)
        seconds = user.get() if user is not None else 0.0
        if seconds:
            busy["driver loop"] = busy.get("driver loop", 0.0) + float(seconds)
        stack = [summary]  # an execution's summary holds its last operator; the ones before are its parents
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for op in node.operators_stats:
                if op.wall_time is not None and op.wall_time.sum:
                    busy[op.operator_name] = busy.get(op.operator_name, 0.0) + float(op.wall_time.sum)
            stack.extend(node.parents)
    return busy


def table_versions(uri: str, names: list[str]) -> int:
    import lancedb

    db = lancedb.connect(uri)
    total = 0
    for name in names:
        with contextlib.suppress(FileNotFoundError, ValueError):
            total += len(db.open_table(name).list_versions())
    return total


def time_driver_sink() -> dict[str, float]:
    """Time the driver-side sink (`pipelines.sink.BackfillSink.write` and `close`) where the design has one:
    the old design writes every row from the driver's loop over the output, which Ray Data's operator stats do
    not cover. Where the driver never calls it, nothing is recorded."""
    timer = {"seconds": 0.0}
    try:
        from pipelines.sink import BackfillSink
    except ImportError:
        return timer
    for name in ("write", "close"):
        method = getattr(BackfillSink, name, None)
        if method is None:
            continue

        def timed(self, *args, _method=method, **kwargs):
            began = time.perf_counter()
            try:
                return _method(self, *args, **kwargs)
            finally:
                timer["seconds"] += time.perf_counter() - began

        setattr(BackfillSink, name, timed)
    return timer


def pass_config(spec: dict[str, Any]):
    from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig

    sources = [
        SourceConfig(
            kind="parquet", path=path, name=name, id_column="id", text_column="text", image_column="image"
        )
        for name, path in spec["sources"]
    ]
    return Config(
        embedder=EmbedderConfig(model="tiny", backend="stand-in", max_pixels=128 * 128),
        sources=sources,
        table=TableConfig(uri=spec["table_uri"], mode=spec["mode"], **spec.get("table_options", {})),
        resources=ResourcesConfig(min_actors=1, max_actors=spec["actors"]),
    )


def code_location() -> dict[str, Any]:
    """Where `pipelines` comes from in the driver and in a Ray worker (the tree a pass measures), and the CPU
    cores each may run on (one, with `--pin-cores`)."""
    import ray

    import pipelines

    @ray.remote(num_cpus=0)
    def where() -> tuple[str, list[int]]:
        import pipelines

        return os.path.dirname(pipelines.__file__), sorted(os.sched_getaffinity(0))

    worker, worker_cores = ray.get(where.remote(), timeout=120)
    return {
        "driver": os.path.dirname(pipelines.__file__),
        "worker": worker,
        "driver_cores": sorted(os.sched_getaffinity(0)),
        "worker_cores": worker_cores,
    }


class Sampler:
    """`sample()` every `period_s` in a thread, while the `with` block runs. Kept here, not shared with
    backfill_bench's GpuSampler: this script's pass processes run against older checkouts (`--pythonpath-tree`),
    whose `benchmarks` package it cannot import from, so it imports nothing of the project's at the top."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def sample(self) -> None:
        raise NotImplementedError


def rss_parts() -> dict[str, int]:
    """This process's resident memory by kind (Linux `/proc/self/status`, bytes): `anon` (its own heap),
    `file` (mapped files: libraries), `shmem` (shared memory it has touched: Ray's object store, which
    Ray maps into every process that reads an object from it). RSS is their sum."""
    parts = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                parts[key[3:].lower()] = int(value.split()[0]) * 1024
    return parts


class DriverRss(Sampler):
    """This process's RSS; its peak in each interval between `mark()`s (a commit), and the peak of each kind
    of resident memory (`rss_parts`) over the run."""

    def __init__(self, period_s: float = 0.25):
        import psutil

        super().__init__(period_s)
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peaks = [self.start]
        self.commits: list[float] = []  # time.time() of each commit
        self.part_peaks: dict[str, int] = {}

    def sample(self) -> None:
        self.peaks[-1] = max(self.peaks[-1], self.process.memory_info().rss)
        for kind, size in rss_parts().items():
            self.part_peaks[kind] = max(self.part_peaks.get(kind, 0), size)

    def mark(self, rows: int = 0) -> None:
        self.commits.append(time.time())
        self.peaks.append(self.process.memory_info().rss)

    def phases(self) -> dict[str, float]:
        """MiB: at the start of the run, the peak up to its last commit, the peak after it (the upkeep)."""
        mib = [p / 2**20 for p in self.peaks]
        parts = {f"peak_{kind}": size / 2**20 for kind, size in self.part_peaks.items()}
        return {"start": self.start / 2**20, "commits": max(mib[:-1] or mib), "after": mib[-1], **parts}


def run_pass(spec: dict[str, Any]) -> dict[str, Any]:
    """One backfill pass (this process is its driver); the figures it can see from here."""
    from pipelines.backfill import connect_ray, run_backfill

    config = pass_config(spec)
    names = [config.table.name, config.table.errors_name]
    versions_before = table_versions(config.table.uri, names) if spec["mode"] == "append" else 0
    connect_ray(config.resources, quiet=True)
    code = code_location()
    sink = time_driver_sink()
    started = time.time()
    with DriverRss() as rss:
        summary = run_backfill(config, on_batch=rss.mark, quiet=True)
    stages = stage_times(StatsRecorder.summaries if StatsRecorder is not None else [])
    if sink["seconds"]:
        stages["driver sink"] = sink["seconds"]
    waited = getattr(summary, "window_wait_s", 0.0)  # older checkouts (--pythonpath-tree) have no window
    for name in [n for n in stages if n.startswith("Read")][:1]:
        stages[name] = max(stages[name] - waited, 0.0)  # a read task's wall time includes its wait
    return {
        "started": started,
        "seconds": summary.seconds,
        "read": summary.read,
        "embedded": summary.embedded,
        "skipped": summary.skipped,
        "errored": summary.errored,
        "already_done": summary.already_done,
        "vectors_in_table": summary.vectors_in_table,
        "errors_in_table": summary.errors_in_table,
        "commits": table_versions(config.table.uri, names) - versions_before,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver_cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),  # user + system, all threads
        "driver_rss_mib": rss.phases(),
        "commit_s": [round(t - started, 1) for t in rss.commits],  # when each group committed
        "window_wait_s": waited,
        "stages": stages,
        "code": code,
        "line": summary.line(),
    }


# -- the cluster and what runs on it -----------------------------------------------------------------------


class LocalCluster:
    """`cluster/local.sh` with its own directory and ports; `env` points a driver at it."""

    def __init__(self, nodes: int, directory: Path, port: int, trace_dir: Path, log=print, pin: bool = False):
        self.nodes, self.directory, self.port, self.log, self.pin = nodes, directory, port, log, pin
        self.script = REPO / "cluster" / "local.sh"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},  # never another cluster's
            "VLM_EMBED_CLUSTER_DIR": str(directory),
            "VLM_EMBED_CLUSTER_PORT": str(port),
            "VLM_EMBED_CLUSTER_CPUS": "2",
            "RAY": str(Path(sys.executable).with_name("ray")),
            "VLM_EMBED_STAND_IN_TRACE": str(trace_dir),  # the nodes' workers inherit it
            "VLM_EMBED_CLUSTER_PIN": "1" if pin else "0",
        }

    def __enter__(self) -> LocalCluster:
        self._local_sh("down")  # a cluster left by an interrupted run of ours
        began = time.perf_counter()
        for attempt in range(1, STARTS + 1):
            out = self._up()
            if out.returncode == 0:
                break
            self._local_sh("down")
            # a loaded machine can miss Ray's start-up deadlines (30 s for a raylet to register): try again
            self.log(f"scale_bench: cluster start {attempt} of {STARTS} failed: {out.stderr.strip()[-300:]}")
        else:
            raise RuntimeError(f"cluster/local.sh up failed {STARTS} times: {out.stderr[-2000:]}")
        for line in out.stdout.splitlines():  # export NAME=VALUE
            name, _, value = line.removeprefix("export ").partition("=")
            self.env[name] = value
        self.log(f"scale_bench: {self.nodes} node(s) up in {time.perf_counter() - began:.0f} s")
        return self

    def __exit__(self, *exc) -> None:
        self._local_sh("down")

    def _up(self) -> subprocess.CompletedProcess:
        """`local.sh up`, given up as soon as a node's `ray start` has died (local.sh itself would wait for it
        for 5 minutes)."""
        command = ["bash", str(self.script), "up", str(self.nodes - 1)]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=err, text=True)
            deadline = time.monotonic() + 600
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
                if self._a_node_died():
                    break
            if process.poll() is None:
                process.kill()
                process.wait()
                returncode = 1
            else:
                returncode = process.returncode
            out.seek(0)
            err.seek(0)
            error = err.read() or "".join(self._node_log_tails())
            return subprocess.CompletedProcess(command, returncode, out.read(), error)

    def _a_node_died(self) -> bool:
        for pidfile in self.directory.glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), 0)
            except (OSError, ValueError):
                return True
        return False

    def _node_log_tails(self) -> list[str]:
        return [log.read_text(errors="replace")[-300:] for log in sorted(self.directory.glob("*.log"))]

    def _local_sh(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(self.script), *args], env=self.env, capture_output=True, text=True, timeout=600
        )

    def node_pids(self) -> list[int]:
        pids = []
        for pidfile in self.directory.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pidfile.read_text().strip()))
        return pids


class WorkerRss(Sampler):
    """The peak RSS of every Ray worker process (`ray::...`) under the cluster's nodes."""

    def __init__(self, roots: list[int], period_s: float):
        super().__init__(period_s)
        self.roots = roots
        self.peaks: dict[int, int] = {}

    def sample(self) -> None:
        import psutil

        for root in self.roots:
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.Error:
                continue
            for process in children:
                try:
                    if process.name().startswith("ray::") or "ray::" in " ".join(process.cmdline()[:1]):
                        rss = process.memory_info().rss
                        self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
                except psutil.Error:
                    continue

    @property
    def worst_mib(self) -> float | None:
        return max(self.peaks.values()) / 2**20 if self.peaks else None


def process_label(command: list[str]) -> str:
    """`ray::MapBatches(prepare_batch) ...` -> `MapBatches(prepare_batch)`; `python .../dashboard.py ...` ->
    `dashboard.py`; `/.../raylet ...` -> `raylet`."""
    if command[0].startswith("ray::"):
        return command[0][5:].split(" ")[0]
    name = os.path.basename(command[0].split(" ")[0])
    if name.startswith("python"):
        args = [a for a in command[1:] if not a.startswith("-")]
        return os.path.basename(args[0]) if args else name
    return name


class ClusterCpu(Sampler):
    """CPU seconds (user + system) of every process under the cluster's nodes, by node and by what each
    process was running when sampled: a Ray worker by its title (`ray::MapBatches(prepare_batch)`,
    `ray::IDLE`, an actor's class), anything else by its name (`raylet`, `gcs_server`). Each sample's
    increase is put down to the title the process has then, so a worker that ran two kinds of task within
    one period counts all of it as the later: a profile at the sampling period's resolution. What the
    processes used before the pass (the first sweep) is not counted; a process started since counts whole."""

    def __init__(self, roots: list[int], period_s: float):
        super().__init__(period_s)
        self.roots = roots
        self.last: dict[int, float] = {}
        self.by_node: dict[int, float] = {}
        self.by_what: dict[str, float] = {}
        self.baseline = True  # the first sweep only notes what the processes had used before the pass

    def sample(self) -> None:
        import psutil

        counting, self.baseline = not self.baseline, False

        for node, root in enumerate(sorted(self.roots)):
            try:
                top = psutil.Process(root)
                processes = [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                try:
                    times = process.cpu_times()
                    what = process_label(process.cmdline() or [process.name()])
                except psutil.Error:
                    continue
                used = times.user + times.system
                delta = used - self.last.get(process.pid, 0.0)
                self.last[process.pid] = used
                if counting:
                    self.by_node[node] = self.by_node.get(node, 0.0) + delta
                    self.by_what[what] = self.by_what.get(what, 0.0) + delta

    def figures(self) -> dict[str, Any]:
        top = sorted(self.by_what.items(), key=lambda kv: -kv[1])
        return {
            "by_node": [round(self.by_node.get(n, 0.0), 1) for n in range(len(self.roots))],
            "by_what": {what: round(seconds, 1) for what, seconds in top if seconds >= 0.5},
        }


def free_port_block(start: int = 6590) -> int:
    """A GCS port whose whole block of ports (see cluster/local.sh, for 2 nodes) is free on this machine."""
    import socket

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    for base in range(start, start + 3000, 97):
        block = [base, base + 1, base + 2, *range(base + 10, base + 26), base + 20000, base + 20200]
        if all(free(p) for p in block):
            return base
    raise RuntimeError(f"no free port block for the local cluster from {start}")


def first_embedded(trace_dir: Path, since: float) -> tuple[float | None, int]:
    """(the earliest batch the stand-in finished at or after `since`, unix time; the rows it embedded since)."""
    first, rows = None, 0
    for path in trace_dir.glob("*.trace"):
        for line in path.read_text().splitlines():
            stamp, _, count = line.partition(" ")
            try:
                when, n = float(stamp), int(count)
            except ValueError:
                continue
            if when >= since:
                first = when if first is None else min(first, when)
                rows += n
    return first, rows


def run_pass_process(spec: dict[str, Any], cluster: LocalCluster, tree: Path, args, log) -> dict[str, Any]:
    """One pass in a fresh driver process (run from `tree`, so driver and workers import that tree's
    `pipelines`), with the cluster's workers sampled meanwhile."""
    with tempfile.TemporaryDirectory(prefix="scale-pass-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = {
            **cluster.env,
            "RAY_DATA_EXECUTION_CALLBACKS": "benchmarks.scale_bench.StatsRecorder",
            "PYTHONPATH": os.pathsep.join([str(tree), str(REPO)]),
        }
        command = [sys.executable, str(REPO / "benchmarks" / "scale_bench.py"), "--one-pass", str(spec_path)]
        if cluster.pin:  # the driver shares the head node's core
            command = ["taskset", "-c", "0", *command]
        command += ["--one-pass-out", str(out_path)]
        roots = cluster.node_pids()
        with WorkerRss(roots, args.sample_s) as workers, ClusterCpu(roots, args.sample_s) as cpu:
            done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
        if done.returncode != 0 or not out_path.exists():
            raise RuntimeError(
                f"the {spec['pass']} pass failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
            )
        result = json.loads(out_path.read_text())
    result["worker_peak_mib"] = workers.worst_mib
    result["cluster_cpu_s"] = cpu.figures()
    first, traced = first_embedded(Path(cluster.env["VLM_EMBED_STAND_IN_TRACE"]), result["started"])
    result["first_row_s"] = None if first is None else first - result["started"]
    result["traced_rows"] = traced
    log(f"scale_bench: {spec['pass']} pass: {result['line']}")
    return result


# -- the runs ----------------------------------------------------------------------------------------------


def table_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TableConfig options given on the command line (none by default: an older design may lack them)."""
    return {} if args.commit_rows is None else {"commit_rows": args.commit_rows}


def run(args: argparse.Namespace, log=print) -> list[dict[str, Any]]:
    workdir = Path(args.workdir)
    tree = Path(args.pythonpath_tree).resolve() if args.pythonpath_tree else REPO
    results = []
    for rows in args.rows:
        corpus = ensure_corpus(workdir / f"corpus-{rows}", rows, args.rows_per_file, args.seed, log=log)
        new = ensure_corpus(workdir / "new", args.new_rows, args.rows_per_file, args.seed + 1, "n", log=log)
        for nodes in args.nodes:
            table_uri = workdir / "tables" / f"{args.design}-{rows}-{nodes}n"
            shutil.rmtree(table_uri, ignore_errors=True)
            trace_dir = workdir / "trace"
            shutil.rmtree(trace_dir, ignore_errors=True)
            cluster_dir = Path(args.cluster_dir)
            port = args.cluster_port or free_port_block()
            with LocalCluster(nodes, cluster_dir, port, trace_dir, log, args.pin_cores) as cluster:
                base = {"table_uri": str(table_uri), "actors": nodes, "table_options": table_options(args)}
                passes = [
                    {"pass": "full", "mode": "overwrite", "sources": [["corpus", str(corpus)]]},
                    {
                        "pass": "resume",
                        "mode": "append",
                        "sources": [["corpus", str(corpus)], ["new", str(new)]],
                    },
                ]
                for spec in passes:
                    result = run_pass_process(base | spec, cluster, tree, args, log)
                    result |= {"design": args.design, "rows": rows, "nodes": nodes, "pass": spec["pass"]}
                    results.append(result)
                    print(format_rows([result]), flush=True)
            if not args.keep_tables:
                shutil.rmtree(table_uri, ignore_errors=True)
    return results


def busiest(stages: dict[str, float]) -> str:
    if not stages:
        return "-"
    name = max(stages, key=stages.get)
    return f"{name} ({stages[name] / sum(stages.values()):.0%})"


def row_cells(result: dict[str, Any]) -> list[str]:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    rate = result["embedded"] / result["seconds"] if result["seconds"] else None
    return [
        str(result["design"]),
        str(result["rows"]),
        str(result["nodes"]),
        str(result["pass"]),
        number(result["seconds"], ".1f"),
        number(rate, ".0f"),
        str(result["embedded"]),
        str(result["skipped"]),
        str(result["errored"]),
        str(result["commits"]),
        number(result["driver_peak_mib"], ".0f"),
        number(result["worker_peak_mib"], ".0f"),
        number(result["first_row_s"], ".1f"),
        busiest(result["stages"]),
    ]


def cpu_profile(result: dict[str, Any]) -> str:
    cpu = result.get("cluster_cpu_s")
    if not cpu:
        return ""
    nodes = ", ".join(f"node {n} {seconds:.0f}" for n, seconds in enumerate(cpu["by_node"]))
    what = ", ".join(f"{name} {seconds:.0f}" for name, seconds in list(cpu["by_what"].items())[:10])
    driver = result.get("driver_cpu_s")
    mine = f"; the driver {driver:.0f}" if driver is not None else ""
    return f"; CPU s: {nodes}{mine}; by what ran: {what}"


def kinds(phases: dict[str, float]) -> str:
    peaks = [
        f"{kind} {phases[f'peak_{kind}']:.0f}"
        for kind in ("anon", "file", "shmem")
        if f"peak_{kind}" in phases
    ]
    return f" (peaks by kind: {', '.join(peaks)})" if peaks else ""


def format_rows(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the passes, each followed by its per-stage busy seconds."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in results]
    for r in results:
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in r["stages"].items()) or "-"
        phases = r.get("driver_rss_mib")
        driver = (
            f"; driver RSS MiB: {phases['start']:.0f} at the start, peak {phases['commits']:.0f} up to the "
            f"last commit, {phases['after']:.0f} after it{kinds(phases)}"
            if phases
            else ""
        )
        commits = r.get("commit_s")
        when = f"; commits at s: {', '.join(f'{t:.0f}' for t in commits)}" if commits else ""
        waited = r.get("window_wait_s")
        wait = (
            f"; the read tasks waited {waited:.1f} s for the read-ahead window (not busy time)"
            if waited
            else ""
        )
        lines.append(
            f"- {r['design']} {r['rows']} rows, {r['nodes']} node(s), {r['pass']}: busy: {stages}{wait}{driver}"
            f"{when}{cpu_profile(r)}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[1_000_000],
        help="corpus sizes, one run each (default 1000000)",
    )
    p.add_argument(
        "--nodes", type=int, nargs="+", default=[1, 2], help="node counts, one run each (default 1 2)"
    )
    p.add_argument("--new-rows", type=int, default=1000, help="rows of the new source of the resume pass")
    p.add_argument("--rows-per-file", type=int, default=100_000, help="rows per Parquet file of the corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir", default="/tmp/vlm-embed-scale", help="corpora (cached), tables and traces go here"
    )
    p.add_argument("--design", default="current", help="the label of the design measured, in the table")
    p.add_argument(
        "--pythonpath-tree",
        metavar="DIR",
        help="run the passes against the project checkout in DIR (e.g. a worktree of an older commit)",
    )
    p.add_argument("--cluster-dir", default="/tmp/vsb", help="local.sh's directory (keep it short)")
    p.add_argument(
        "--cluster-port", type=int, help="local.sh's GCS port (default: the first free block from 6590)"
    )
    p.add_argument("--sample-s", type=float, default=1.0, help="how often worker RSS is sampled")
    p.add_argument(
        "--pin-cores",
        action="store_true",
        help="node i runs on core i only, the driver on the head's core 0 (cluster/local.sh's "
        "VLM_EMBED_CLUSTER_PIN), so that 2 nodes on a 2-core machine have twice the cores of 1 node",
    )
    p.add_argument(
        "--commit-rows",
        type=int,
        help="the table's commit_rows (rows per group of work units, one Ray Data job and commit each); "
        "default: the design's own",
    )
    p.add_argument("--keep-tables", action="store_true", help="keep the tables after each run")
    p.add_argument("--json", type=Path, help="also write every pass's figures here")
    p.add_argument("--one-pass", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--one-pass-out", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one_pass:  # the driver process of one pass
        global StatsRecorder
        StatsRecorder = execution_callback_class()
        result = run_pass(json.loads(args.one_pass.read_text()))
        args.one_pass_out.write_text(json.dumps(result))
        return 0
    results = run(args, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(format_rows(results))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file (the pass processes): importable as benchmarks.scale_bench
        sys.modules.setdefault("benchmarks.scale_bench", sys.modules["__main__"])
    sys.exit(main())
