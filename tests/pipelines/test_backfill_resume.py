"""Resume by work unit: kill -9 of the whole local cluster at random points, of the driver alone (its cluster
lives on and the rerun joins it), of an embedding worker, and on S3 (moto's server on 127.0.0.1); every rerun
ends with each input row exactly once in vectors-or-errors."""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.backfill import run_backfill
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.progress import committed_units, progress_name
from pipelines.table import connect
from tests.pipelines.ray_head import RayHead, ray_head
from tests.s3_server import s3_server  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
KILL_SEED = int(os.environ.get("VLM_EMBED_KILL_SEED", "1515"))

DRIVER = """
import json, logging, sys, ray
from pipelines.backfill import run_backfill
from pipelines.config import Config
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
config = Config.from_yaml(sys.argv[1])
if config.resources.ray_address is None:  # a local Ray of its own, in the driver's process group
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[2], log_to_driver=False)
summary = run_backfill(config)  # else it joins the cluster at resources.ray_address
print(summary.line(), flush=True)
print("summary", json.dumps(summary.to_dict()), flush=True)
"""


def corpus_rows(n: int = 400) -> list[dict]:
    rows = [{"id": f"doc-{i:04d}", "text": f"document number {i} " + "word " * (i % 30)} for i in range(n)]
    for row in rows[::7]:
        row["text"] = "   "  # bad rows: both tables are written to
    rows.append(dict(rows[3]))  # a repeated row, in another unit
    return rows


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def job(model, uri, sources, storage_options=None, ray_address=None, commit_rows=100) -> Config:
    return Config(
        embedder=EmbedderConfig(model=str(model), device="cpu", dtype="float32"),
        sources=sources,
        table=TableConfig(
            uri=str(uri), commit_rows=commit_rows, unit_bytes=4096, storage_options=storage_options or {}
        ),
        resources=ResourcesConfig(batch_rows=32, prepare_batch_rows=32, ray_address=ray_address),
    )


def assert_exactly_once(table_config: TableConfig, expected: set[str]) -> None:
    db = connect(table_config)
    vector_ids = db.open_table(table_config.name).to_arrow()["id"].to_pylist()
    error_ids = db.open_table(table_config.errors_name).to_arrow()["id"].to_pylist()
    assert len(vector_ids) == len(set(vector_ids)), "an id is twice in the vectors table"
    assert len(error_ids) == len(set(error_ids)), "an id is twice in the errors table"
    assert not set(vector_ids) & set(error_ids), "an id is in both tables"
    assert set(vector_ids) | set(error_ids) == expected


def committed(table_config: TableConfig) -> int:
    db = connect(table_config)
    with contextlib.suppress(Exception):
        return sum(committed_units(db.open_table(progress_name(table_config))).values())
    return 0


def start_driver(config_file: Path, temp_dir: str, head: RayHead | None) -> subprocess.Popen:
    env = head.env if head else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(config_file), temp_dir],
        cwd=ROOT,
        env=env | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def run_and_kill(config_file: Path, commits: int, delay_s: float, head: RayHead | None = None) -> bool:
    """The job's driver in its own process group, killed -9 `delay_s` seconds after its `commits`-th commit
    line (0: after its start). Without `head` the driver runs its own local Ray and the kill takes the whole
    group (the driver, the raylet, the workers: the whole cluster); with `head` (the config's ray_address)
    only the driver dies and the cluster lives on. True when it finished before the kill."""
    import select

    temp_dir = f"/tmp/rr{os.getpid()}"
    driver = start_driver(config_file, temp_dir, head)
    try:
        seen, deadline = 0, time.monotonic() + 600
        while seen < commits and time.monotonic() < deadline and driver.poll() is None:
            if select.select([driver.stdout], [], [], 0.5)[0]:
                line = driver.stdout.readline()
                seen += line.startswith("committed ") and " vectors " in line
        try:
            driver.wait(timeout=delay_s)
        except subprocess.TimeoutExpired:
            return False
        return driver.returncode == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            if head:
                os.kill(driver.pid, signal.SIGKILL)
            else:
                os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        gone_by = time.monotonic() + 30  # the rest of the group (the raylet, the workers) dies after it
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < gone_by:
                os.killpg(driver.pid, signal.SIGKILL)
                time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)  # else a process still dying could write there again


def run_to_end(config_file: Path, head: RayHead) -> dict:
    """The job's driver on the cluster of `head`, to its end: the run's summary (BackfillSummary.to_dict)."""
    driver = start_driver(config_file, "-", head)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("summary "))
    return json.loads(line.removeprefix("summary "))


def kill_at_random_points_then_finish(
    config: Config,
    tmp_path: Path,
    points: int,
    seed: int = KILL_SEED,
    head: RayHead | None = None,
    commits: int = 2,
    seconds: float = 8,
) -> list[tuple]:
    """Run and kill the job `points` times at points drawn with `seed`: after 0 to `commits` commits, then 0 to
    `seconds` seconds (in the start-up, mid-group, mid-commit or between groups). The points, for the
    assertion messages."""
    rnd = random.Random(seed)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(config.to_yaml())
    killed_at = []
    for _ in range(points):
        point = (rnd.randint(0, commits), round(rnd.uniform(0, seconds), 1))
        finished = run_and_kill(config_file, *point, head=head)
        killed_at.append((*point, committed(config.table), "finished" if finished else "killed"))
        if finished:
            break
    return killed_at


@pytest.mark.slow
def test_kill_9_of_the_whole_cluster_at_random_points_then_a_rerun_has_every_row_exactly_once(
    tmp_path, tiny_model_dir, ray_session
):
    rows = corpus_rows()
    (tmp_path / "docs.jsonl").write_bytes(jsonl(rows))
    config = job(
        tiny_model_dir,
        tmp_path / "db",
        [SourceConfig(kind="jsonl", path=str(tmp_path / "docs.jsonl"), id_column="id")],
        commit_rows=50,  # a group per unit: ten commits to be killed between
    )
    killed_at = kill_at_random_points_then_finish(config, tmp_path, points=2)
    before = committed(config.table)
    summary = run_backfill(config)
    where = f"(commits, seconds, rows committed, outcome) {killed_at}, seed {KILL_SEED}; {before} rows before"
    assert summary.adds_up and summary.read == len(rows), where
    assert summary.embedded + summary.errored + summary.already_done + summary.duplicates == len(rows), where
    assert summary.units > 1 and summary.already_done >= before, where
    assert_exactly_once(config.table, {r["id"] for r in rows})
    again = run_backfill(config)
    assert (again.embedded, again.errored, again.units_skipped) == (0, 0, again.units), where


@pytest.mark.slow
def test_kill_9_of_the_driver_alone_then_a_rerun_on_the_same_cluster_has_every_row_exactly_once(
    tmp_path, tiny_model_dir
):
    rows = corpus_rows(300)
    (tmp_path / "docs.jsonl").write_bytes(jsonl(rows))
    source = SourceConfig(kind="jsonl", path=str(tmp_path / "docs.jsonl"), id_column="id")
    seed = KILL_SEED + 2
    with ray_head(num_cpus=2) as head:  # outlives the killed driver; the rerun joins it
        config = job(tiny_model_dir, tmp_path / "db", [source], ray_address=head.address, commit_rows=50)
        killed_at = kill_at_random_points_then_finish(config, tmp_path, points=1, seed=seed, head=head)
        before = committed(config.table)
        summary = run_to_end(tmp_path / "job.yaml", head)
    where = f"(commits, seconds, rows committed, outcome) {killed_at}, seed {seed}; {before} rows before"
    read, embedded, errored = summary["read"], summary["embedded"], summary["errored"]
    assert read == embedded + summary["skipped"] + errored and read == len(rows), where
    assert embedded + errored + summary["already_done"] + summary["duplicates"] == len(rows), where
    assert summary["units"] > 1 and summary["already_done"] >= before, where
    assert_exactly_once(config.table, {r["id"] for r in rows})


@pytest.mark.slow
def test_kill_9_of_an_embedding_worker_mid_run_loses_no_row_and_repeats_none(
    tmp_path, tiny_model_dir, ray_session
):
    import psutil
    import ray

    rows = corpus_rows(300)
    (tmp_path / "docs.jsonl").write_bytes(jsonl(rows))
    config = job(
        tiny_model_dir,
        tmp_path / "db",
        [SourceConfig(kind="jsonl", path=str(tmp_path / "docs.jsonl"), id_column="id")],
    )
    delay = round(random.Random(KILL_SEED + 1).uniform(3, 20), 1)
    killed: list[int] = []

    def kill_a_worker() -> None:
        """kill -9 of the embedding actor's process, found among this test's own Ray processes."""
        deadline = time.monotonic() + 300
        time.sleep(delay)
        while time.monotonic() < deadline and not killed:
            for process in psutil.Process(os.getpid()).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "EmbedWorker" in " ".join(process.cmdline()):
                        os.kill(process.pid, signal.SIGKILL)
                        killed.append(process.pid)
                        return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    with contextlib.suppress(ray.exceptions.RayError):  # the run may fail with its worker; the rerun finishes
        run_backfill(config)
    killer.join(timeout=320)
    assert killed, f"no embedding worker was found to kill ({delay} s in, seed {KILL_SEED + 1})"
    summary = run_backfill(config)
    assert summary.adds_up and summary.read == len(rows)
    assert_exactly_once(config.table, {r["id"] for r in rows})


@pytest.mark.slow
def test_on_s3_inputs_and_table_a_killed_run_resumes_and_every_row_is_there_once(
    tmp_path,
    tiny_model_dir,
    ray_session,
    s3_server,  # noqa: F811
):
    rows = corpus_rows(300)
    half = len(rows) // 2
    s3_server.put("inputs/part-0.jsonl", jsonl(rows[:half]))
    s3_server.put("inputs/part-1.jsonl", jsonl(rows[half:]))
    options = s3_server.storage_options
    source = SourceConfig(
        kind="jsonl", path=s3_server.uri("inputs/"), id_column="id", storage_options=options
    )
    config = job(tiny_model_dir, s3_server.uri("db"), [source], storage_options=options)
    # three groups on S3: the kill comes in the start-up or the first two groups
    killed_at = kill_at_random_points_then_finish(config, tmp_path, points=1, commits=1, seconds=3)
    summary = run_backfill(config)
    assert summary.adds_up and summary.read == len(rows), f"{killed_at}, seed {KILL_SEED}"
    assert_exactly_once(config.table, {r["id"] for r in rows})
    assert any(key.startswith("db/vectors.lance/data/") for key in s3_server.keys("db/"))
    assert "text" in summary.indexes
