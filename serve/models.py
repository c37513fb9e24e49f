"""The model deployments: the embedder (`EmbeddingModel`) and the reranker (`RerankModel`), each behind a batch queue.

A model replica (a GPU, where the cluster has them) loads its model once, warms it up, and then puts the
prepared items of concurrent calls into one forward pass through its `@serve.batch` queue, up to a
padded-token budget, the forward pass on its own thread. HTTP, checks, tokenizing and responses stay on the
ingress replicas (`serve.app`), so this process's one Python thread of control goes to forming batches and
launching the forward pass: on a GPU a forward pass takes milliseconds, and per-request Python work here
(one interpreter lock) would otherwise cap the requests per second and keep batches small. Both deployments
share that machinery (`_BatchingReplica`); they differ in the model they load and what one item gives back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve as ray_serve

from pipelines.config import Config, EmbedderConfig
from pipelines.metrics import ServeMetrics
from serve.autoscaling import PENDING_ITEMS
from serve.coalesce import Rows

MODEL_DEPLOYMENT = "EmbeddingModel"  # the embedder and its batch queue (GPU replicas, where there are GPUs)
RERANK_DEPLOYMENT = "RerankModel"  # the reranker and its batch queue
GENERATIONS_PER_REPLICA = 1  # answers generated at once by one EmbeddingModel replica (serve.chat)


@dataclass
class _Pending:
    """Prepared items of one call waiting together for a server batch; `longest` is their longest item's
    token count, capped at the budget. A call's items enter the batch queue as one entry, not one each:
    Serve's batch queue costs Python time per entry (it recomputes `batch_size_fn` over the whole batch for
    every entry it adds), time the model replica's one thread of control owes the forward pass."""

    prepared: list[Any]
    longest: int


def padded_tokens(batch: list[_Pending]) -> int:
    """The `batch_size_fn`: what a batch costs once padded, items x the longest item's tokens."""
    return sum(len(p.prepared) for p in batch) * max(p.longest for p in batch)


def within_budget(prepared: list[Any], budget: int) -> list[_Pending]:
    """One call's items as queue entries, in order, each within `budget` padded tokens (an item alone always
    is: its cost is capped at the budget)."""
    entries: list[_Pending] = []
    chunk: list[Any] = []
    longest = 0
    for item in prepared:
        cost = min(item.num_tokens, budget)
        if chunk and (len(chunk) + 1) * max(longest, cost) > budget:
            entries.append(_Pending(chunk, longest))
            chunk, longest = [], 0
        chunk.append(item)
        longest = max(longest, cost)
    if chunk:
        entries.append(_Pending(chunk, longest))
    return entries


@dataclass
class BatchStats:
    """Counts of this replica's server batches (reported by /healthz; the metrics go to Prometheus)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    calls: int = 0  # calls from the ingress replicas (each carries one or more requests' items)
    # the forward passes' wall time, and the CPU time of the thread that runs them (on a GPU: launching kernels
    # and waiting for them; on a CPU: the model's arithmetic too): what the rest of this process's CPU time is
    # not (benchmarks/load_test.py tells them apart per request)
    forward_s: float = 0.0
    forward_cpu_s: float = 0.0

    def record(self, size: int, forward_s: float = 0.0, forward_cpu_s: float = 0.0) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        self.forward_s += forward_s
        self.forward_cpu_s += forward_cpu_s

    def as_dict(self) -> dict[str, int | float]:
        return {
            "batches": self.batches,
            "batched_items": self.items,
            "largest_batch": self.largest,
            "model_calls": self.calls,
            "forward_s": round(self.forward_s, 6),
            "forward_cpu_s": round(self.forward_cpu_s, 6),
        }


class _TokenBudgetWarningFilter(logging.Filter):
    """Serve warns when max_batch_size exceeds max_ongoing_requests, counting requests; ours counts tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_batch_size" not in record.getMessage()


def check_servable(config: EmbedderConfig) -> None:
    """Serve only embedders whose vectors mean something: the pipeline-benchmark stand-in is refused."""
    if config.backend == "stand-in":
        raise ValueError(
            "embedder backend 'stand-in' is a pipeline-benchmark stand-in (pipelines.stand_in): its vectors "
            "mean nothing, so Serve refuses it; use backend 'transformers' or 'sentence-transformers'"
        )


class _BatchingReplica:
    """A model, a batch queue of prepared items, and the forward pass on a thread of its own."""

    def _start(self, config: dict[str, Any], budget_tokens: int) -> None:
        self.config = Config.model_validate(config)
        self.metrics = ServeMetrics()
        self.stats = BatchStats()
        self.pending_items = 0
        self._budget = budget_tokens
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="forward")
        logging.getLogger("ray.serve").addFilter(_TokenBudgetWarningFilter())
        self._run_batch.set_max_batch_size(self._budget)
        self._run_batch.set_batch_wait_timeout_s(self.config.serve.batch_wait_timeout_s)

    def _forward(self, prepared: list[Any]) -> list[Any]:
        """One server batch's results, in order (runs on the forward thread): a row per item, or for an item
        the model cannot embed the reason (a str), so that it fails its own request only."""
        raise NotImplementedError

    def _timed_forward(self, prepared: list[Any]) -> tuple[list[Any], float, float]:
        """`_forward` with its wall time and its thread's CPU time (on the forward thread)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        results = list(self._forward(prepared))
        return results, time.perf_counter() - wall, time.thread_time() - cpu

    @staticmethod
    def _rows(results: list[Any], width: int | None) -> Rows:
        errors = {i: r for i, r in enumerate(results) if isinstance(r, str)}
        filler = np.zeros(width, np.float32) if width else np.float32(0)
        return Rows(np.stack([filler if i in errors else r for i, r in enumerate(results)]), errors)

    async def _gather(self, prepared: list[Any]) -> list[Any]:
        """One call's prepared items join the items of concurrent calls; their results, in order."""
        self.stats.calls += 1
        self._queue_changed(len(prepared))
        try:
            entries = within_budget(prepared, self._budget)
            if len(entries) == 1:
                return await self._run_batch(entries[0])
            parts = await asyncio.gather(*(self._run_batch(entry) for entry in entries))
            return [result for part in parts for result in part]
        finally:
            self._queue_changed(-len(prepared))

    @ray_serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, batch_size_fn=padded_tokens)
    async def _run_batch(self, batch: list[_Pending]) -> list[list[Any]]:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        items = [item for entry in batch for item in entry.prepared]
        results, forward_s, forward_cpu_s = await loop.run_in_executor(
            self._forward_pool, self._timed_forward, items
        )
        self.stats.record(len(items), forward_s, forward_cpu_s)
        self.metrics.batch(len(items), time.perf_counter() - start)
        out, start = [], 0
        for entry in batch:
            out.append(results[start : start + len(entry.prepared)])
            start += len(entry.prepared)
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What `serve.autoscaling`'s policy scales on: the items this replica holds (queued or in a batch)."""
        return {PENDING_ITEMS: float(self.pending_items)}

    def _queue_changed(self, delta: int) -> None:
        self.pending_items += delta
        self.metrics.queue_depth(self.pending_items)

    def _health(self, **extra: Any) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else "loading",
            "replica": ray_serve.get_replica_context().replica_id.unique_id,
            "pending_items": self.pending_items,
            "warm_up_s": round(self.warm_up_s, 3),
            **extra,
            **self.stats.as_dict(),
        }

    def check_health(self) -> None:
        """Serve's periodic replica health check: the model is loaded and its thread can still run."""
        if not self.ready or self._forward_pool._shutdown:
            raise RuntimeError("the model is not ready")


@ray_serve.deployment(name=MODEL_DEPLOYMENT)
class EmbeddingModel(_BatchingReplica):
    """One embedder replica: it only embeds prepared items."""

    def __init__(self, config: dict[str, Any]):
        from pipelines.backends import load_embedder

        full = Config.model_validate(config)
        embedder_config = full.embedder
        check_servable(embedder_config)
        self.generator = None
        if full.answer is not None:  # POST /v1/chat/completions: the generation class, its base model embeds
            from pipelines.generation import Generator

            self.generator = Generator.from_config(embedder_config)
            self.embedder = self.generator.embedder
        else:
            self.embedder = load_embedder(embedder_config)
        self._generations = asyncio.Semaphore(GENERATIONS_PER_REPLICA)
        self._start(config, max(embedder_config.max_batch_tokens, embedder_config.max_length))
        self._warm_up()
        self.ready = True

    async def embed(self, prepared: list[Any]) -> Rows:
        """Vectors `[n, D]` for one call's prepared items, with the errors of those the model cannot embed."""
        return self._rows(await self._gather(prepared), self.embedder.get_embedding_dimension())

    def _forward(self, prepared: list[Any]) -> list[Any]:
        return self.embedder.try_embed_prepared(prepared).per_item(len(prepared))

    async def generate(self, prompt, options):
        """Stream one answer (`serve.chat`): `{"text": piece}` per text piece, then `{"finish_reason",
        "prompt_tokens", "completion_tokens"}`, from the generation class whose base model the embedder runs on.
        Answers go one at a time per replica (no continuous batching); embedding batches go on meanwhile."""
        if self.generator is None:
            raise RuntimeError("this replica was started without an answer: section; it does not generate")
        async with self._generations:
            stream = self.generator.stream(prompt, options)
            pieces = iter(stream)
            loop = asyncio.get_running_loop()
            try:
                while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
                    yield {"text": piece}
            finally:
                stream.close()  # the client went away: stop generating at the next token
            end = stream.completion
            yield {
                "finish_reason": end.finish_reason,
                "prompt_tokens": end.prompt_tokens,
                "completion_tokens": end.completion_tokens,
            }

    def _warm_up(self) -> None:
        """The embedder's own warm-up (compiles, with `compile=True`), then one text and, with an image
        processor, one image through all three steps: a broken model fails the replica, not a request."""
        from PIL import Image

        has_images = self.embedder.image_processor is not None
        self.warm_up_s = self.embedder.warm_up(image_side=64 if has_images else None)
        items: list[Any] = ["warm up"]
        if has_images:
            items.append({"text": "warm up", "image": Image.new("RGB", (64, 64), (128, 64, 32))})
        vectors = self.embedder.embed_batch(items)
        if not np.isfinite(vectors).all():
            raise RuntimeError("the warm-up batch gave non-finite vectors: the model is broken")
        if self.generator is not None:
            from pipelines.generation import SamplingOptions

            prompt = self.generator.prompt([{"role": "user", "content": "warm up"}])
            self.generator.generate(prompt, SamplingOptions(max_new_tokens=2, temperature=0))

    def health(self) -> dict[str, Any]:
        return self._health(
            dimension=self.embedder.get_embedding_dimension(), device=str(self.embedder.device)
        )


@ray_serve.deployment(name=RERANK_DEPLOYMENT)
class RerankModel(_BatchingReplica):
    """One reranker replica: it only scores prepared (query, document) pairs."""

    def __init__(self, config: dict[str, Any]):
        from pipelines.reranker import Reranker

        reranker_config = Config.model_validate(config).reranker
        self.reranker = Reranker.from_config(reranker_config)
        self._start(config, max(reranker_config.max_batch_tokens, reranker_config.max_length + 16))
        self.warm_up_s = self.reranker.warm_up()
        self.ready = True

    async def score(self, prepared: list[Any]) -> Rows:
        """Scores `[n]` for one call's prepared pairs, with the errors of those the model cannot score."""
        return self._rows(await self._gather(prepared), None)

    def _forward(self, prepared: list[Any]) -> list[Any]:
        return self.reranker.try_score_prepared(prepared).per_item(len(prepared))

    def health(self) -> dict[str, Any]:
        return self._health(device=str(self.reranker.device))
