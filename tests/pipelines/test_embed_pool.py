"""The backfill's embedding workers: started once per run whatever its number of groups, only loaded workers
take batches, and none of the run's actors outlives it."""

import json
import logging
import re
import time

import numpy as np
import pyarrow as pa

from pipelines.backfill import run_backfill
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.table import connect


def test_a_run_of_three_groups_loads_the_model_once(tmp_path, tiny_model_dir, ray_session, caplog):
    rows = [{"id": f"t{i}", "text": f"text number {i}"} for i in range(30)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"),
        sources=[SourceConfig(kind="jsonl", path=str(path), id_column="id")],
        # 30 rows of ~40 bytes in units of 400 bytes, ~10 rows a group: three groups or more
        table=TableConfig(uri=str(tmp_path / "db"), commit_rows=10, unit_bytes=400),
        resources=ResourcesConfig(batch_rows=8, prepare_batch_rows=8, max_actors=1),
    )
    with caplog.at_level(logging.INFO, logger="pipelines.backfill"):
        summary = run_backfill(config)
    assert summary.embedded == 30 and summary.adds_up
    assert summary.commits >= 3 * 2  # each group: its append and its units
    line = next(r.getMessage() for r in caplog.records if "embedding worker" in r.getMessage())
    workers, loads, groups = map(
        int, re.fullmatch(r"(\d+) .* the model (\d+) time\(s\) for (\d+) group\(s\)", line).groups()
    )
    assert (workers, loads) == (1, 1) and groups >= 3
    start = summary.start_up  # the one worker's, in seconds from the run's start, in the order they happen
    phases = [start[k] for k in ("process_s", "actor_s", "loaded_s", "ready_s", "first_batch_s")]
    assert phases == sorted(phases) and phases[0] >= 0 and phases[-1] <= summary.seconds, start
    assert start["last_ready_s"] == start["ready_s"]
    assert any(r.getMessage().startswith("the first embedding worker was ready") for r in caplog.records)
    assert connect(config.table).open_table("vectors").count_rows() == 30
    assert run_actors_gone(within_s=30), (
        "the run left its actors (embedding workers, id claims, unit ledger) alive"
    )


def test_the_start_up_is_the_first_ready_workers_from_the_runs_start():
    """Wall-clock times as two workers report them (`EmbedWorker.report`); the run began at 100. A process
    Ray had started before the run counts 0; a worker that never got ready (no GPU for it) is left out."""
    from pipelines.embed_pool import start_up

    early = {"process": 90.0, "actor": 101.0, "loaded": 105.5, "ready": 108.0, "first_batch": 109.25}
    late = {"process": 102.0, "actor": 103.0, "loaded": 110.0, "ready": 112.5, "first_batch": 113.0}
    stuck = {"process": 99.0, "actor": 100.5}
    assert start_up([late, stuck, early], since=100.0) == {
        "process_s": 0.0,
        "actor_s": 1.0,
        "loaded_s": 5.5,
        "ready_s": 8.0,
        "last_ready_s": 12.5,
        "first_batch_s": 9.25,
    }
    assert start_up([stuck], since=100.0) == {}


def run_actors_gone(within_s: float) -> bool:
    """No process of this machine is a run's actor (Ray names an actor's process `ray::<class>`)."""
    import psutil

    def alive() -> list[str]:
        names = []
        for process in psutil.process_iter(["cmdline"]):
            first = (process.info["cmdline"] or [""])[0]
            if first.startswith(("ray::EmbedWorker", "ray::IdClaims", "ray::UnitLedger")):
                names.append(first)
        return names

    deadline = time.monotonic() + within_s
    while alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_a_worker_ray_cannot_place_takes_no_batch(tiny_model_dir, embedder, ray_session):
    """Two workers, the second asking for a resource no node has: the batches of both clients (slots 0 and 1)
    go to the first and come back with its vectors; none waits for the worker that never starts."""
    import ray

    from pipelines.backends import embedding_dimension
    from pipelines.embed_pool import EmbedClient, EmbedWorker, Slots
    from pipelines.readers import row_schema
    from pipelines.stages import prepare_batch

    config = EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")
    config_json, dimension = config.model_dump_json(), embedding_dimension(config)
    texts = [f"text number {i}" for i in range(3)]
    reader_rows = [
        {"id": f"t{i}", "source": "test", "status": "todo", "origin": f"0:{i}", "text": text}
        for i, text in enumerate(texts)
    ]
    batch = prepare_batch(pa.Table.from_pylist(reader_rows, schema=row_schema()), config_json)
    worker = ray.remote(EmbedWorker)
    placed = worker.options(num_cpus=0).remote(config_json, dimension)
    never = worker.options(num_cpus=0, resources={"no-such-resource": 1}).remote(config_json, dimension)
    slots = ray.remote(num_cpus=0)(Slots).remote()
    workers = (placed, never)
    loading = [w.load.remote() for w in workers]
    try:
        clients = [EmbedClient(workers, loading, slots) for _ in range(2)]
        assert [c.slot for c in clients] == [0, 1]
        for client in clients:
            out = client(batch)
            assert out["status"].to_pylist() == ["ok"] * len(texts)
            np.testing.assert_allclose(
                np.stack(out["vector"].to_pylist()), embedder.embed_batch(texts), atol=1e-5
            )
        assert ray.get(placed.report.remote())["loads"] == 1
    finally:
        for actor in (placed, never, slots):
            ray.kill(actor)
