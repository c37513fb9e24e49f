"""Embedding workers that live for the whole backfill run, started before its Ray Data execution.

Built when each group of units was its own Ray Data job (a Ray Data actor pool lives only as long as its
job, so every group loaded, and on a GPU compiled, the model again: ~20 s per group on an H200). A run is now
one execution (`pipelines.backfill`), and the pool stays for what Ray Data's own pool does not do: the model
loads as the run starts, overlapping the first units' reading and preparing (not when the first batch
reaches an actor), and only a worker whose model has loaded takes batches, so one Ray cannot place yet (no
free GPU until the cluster grows) holds none back. It is made of plain Ray actors:

- `EmbedWorker` (the model; on a GPU when the run has them): started once per run, loading its model at once,
  so the load overlaps with the first units' reading and preparing. Ray restarts one that dies
  (`max_restarts`) and retries its call (`max_task_retries`), as Ray Data does for its own actors.
- `EmbedClient`: the run's Ray Data embed stage, a light CPU actor pool of the same size that hands its batches to
  one loaded worker each (a slot taken from a counter, so the workers share the batches evenly) and passes the
  worker's rows on. Ray Data's backpressure and accounting see this stage as the embed stage.

The batch travels once more through the object store than with Ray Data's own actors (client -> worker ->
client): a few MB per batch, small beside a forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipelines.stages import EmbedActor

WORKER_RESTARTS = -1  # Ray restarts a dead worker as often as needed ...
CALL_RETRIES = 3  # ... and retries a batch a few times: a batch that kills every worker fails the run
CLIENT_CPUS = 0  # a client only waits on its worker; its worker holds the CPUs (a fraction here would leave a
# 2-CPU node one short of a prepare task beside a 1-CPU worker)
STOP_TIMEOUT_S = 10  # how long the stop waits for the workers' load counts


class EmbedWorker(EmbedActor):
    """The stage's `EmbedActor` as a long-lived Ray actor: `load` at start, then `embed` per batch.

    It keeps the wall-clock times of its start (`report`): its process started, its actor began, its model
    loaded, warmed up (`ready`), and its first batch with rows to embed was done."""

    def __init__(self, config_json: str, dimension: int | None = None):
        import psutil

        self.loads = 0  # model loads of this actor (a restarted actor counts again from 0)
        self.times = {"process": psutil.Process().create_time(), "actor": time.time()}
        super().__init__(config_json, dimension)

    def _load(self) -> None:
        began = time.time()
        super()._load()
        self.loads += 1
        self.times.setdefault("loaded", began + self.load_s)
        self.times.setdefault("ready", began + self.load_s + self.warm_up_s)

    def report(self) -> dict:
        """{"loads": model loads, "times": the start's wall-clock times (the class docstring)}."""
        return {"loads": self.loads, "times": dict(self.times)}

    def load(self) -> int:
        """Load the model now (not on the first batch) and give the vector size."""
        if self.embedder is None:
            self._load()
        return self.dimension

    def embed(self, batch):
        out = self(batch)
        if "first_batch" not in self.times and "todo" in batch["status"].to_pylist():
            self.times["first_batch"] = time.time()
        return out


PHASES = (("process", "process"), ("actor", "actor"), ("loaded", "model loaded"), ("ready", "warmed up"))


def start_up(times: list[dict[str, float]], since: float) -> dict[str, float]:
    """The workers' start in seconds after `since` (the run's start, wall clock), from their `report()`
    times: the phases of the worker that was ready first (a process Ray had started before the run counts
    0), when the last one was ready, and when the first batch was embedded. Empty if none was ready."""
    ready = [t for t in times if "ready" in t]
    if not ready:
        return {}
    first = min(ready, key=lambda t: t["ready"])
    figures = {f"{key}_s": round(max(first[key] - since, 0.0), 2) for key, _ in PHASES}
    figures["last_ready_s"] = round(max(t["ready"] for t in ready) - since, 2)
    batches = [t["first_batch"] for t in ready if "first_batch" in t]
    if batches:
        figures["first_batch_s"] = round(min(batches) - since, 2)
    return figures


def start_up_line(figures: dict[str, float]) -> str:
    """`start_up`'s figures as one log line."""
    phases = ", ".join(f"{name} {figures[f'{key}_s']:.1f} s" for key, name in PHASES)
    line = (
        f"the first embedding worker was ready {figures['ready_s']:.1f} s into the run ({phases}), "
        f"the last {figures['last_ready_s']:.1f} s"
    )
    if "first_batch_s" in figures:
        line += f"; the first batch was embedded at {figures['first_batch_s']:.1f} s"
    return line


class Slots:
    """Hands out 0, 1, 2, ...: each client's worker is `slot % workers` (a Ray actor)."""

    def __init__(self):
        self.next = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


class EmbedClient:
    """A Ray Data stage actor: its batches go to one loaded `EmbedWorker` (by slot) and come back as they are.

    Only workers whose model has loaded take batches: a worker Ray cannot place yet (no free GPU until the
    cluster grows) never holds a batch back."""

    def __init__(self, workers: tuple, loading: list, slots):
        import ray

        self.workers, self.loading = workers, loading
        self.slot = ray.get(slots.take.remote())

    def __call__(self, batch):
        import ray

        ready, _ = ray.wait(self.loading, num_returns=len(self.loading), timeout=0)
        if not ready:
            ready, _ = ray.wait(self.loading, num_returns=1)
        loaded = [w for w, ref in zip(self.workers, self.loading, strict=True) if ref in ready]
        return ray.get(loaded[self.slot % len(loaded)].embed.remote(batch))


@dataclass
class EmbedPool:
    """The run's workers, and what the run's Ray Data stage needs to use them."""

    workers: tuple
    slots: Any
    loading: list  # each worker's `load` call

    @classmethod
    def start(
        cls, config_json: str, dimension: int, size: int, num_gpus: float, num_cpus: float
    ) -> EmbedPool:
        """`size` workers, each loading its model at once (a worker Ray cannot place yet waits for room)."""
        import ray

        worker = ray.remote(EmbedWorker).options(
            num_gpus=num_gpus,
            num_cpus=num_cpus,
            max_restarts=WORKER_RESTARTS,
            max_task_retries=CALL_RETRIES,
            scheduling_strategy="SPREAD",  # over the nodes, as Ray Data's own actor pools are placed
        )
        workers = tuple(worker.remote(config_json, dimension) for _ in range(size))
        slots = ray.remote(num_cpus=0)(Slots).remote()
        return cls(workers, slots, [w.load.remote() for w in workers])

    def stage(self, ds, batch_rows: int):
        """`ds` with the embed stage: one client per worker, using no CPU of its own."""
        import ray

        return ds.map_batches(
            EmbedClient,
            fn_constructor_kwargs={"workers": self.workers, "loading": self.loading, "slots": self.slots},
            compute=ray.data.ActorPoolStrategy(size=len(self.workers)),
            batch_size=batch_rows,
            batch_format="pyarrow",
            num_cpus=CLIENT_CPUS,
            udf_modifying_row_count=False,
        )

    def stop(self) -> tuple[int | None, list[dict[str, float]]]:
        """Stop the workers; returns how many times they loaded the model (None if one did not answer) and
        each answering worker's start times (`EmbedWorker.report`)."""
        import ray

        try:
            reports = ray.get([w.report.remote() for w in self.workers], timeout=STOP_TIMEOUT_S)
            loads, times = sum(r["loads"] for r in reports), [r["times"] for r in reports]
        except Exception:  # a worker that died or hangs: its count is lost, the stop goes on
            loads, times = None, []
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        ray.kill(self.slots, no_restart=True)
        return loads, times
