"""CUDA graphs for small packed text steps: one replay instead of a step's hundreds of kernel launches.

Why: a small step is host-bound. On an H200 Serve's model replica spent ~33 ms of Python launching per step
(2 compiled regions and a flash call per layer, 28 layers), whatever the step's size (benchmarks/NOTES.md,
third lease), so c=1 latency and the steps per second at c=8-64 are the host's, not the GPU's.

A graph has fixed shapes, so a step is padded to a `Bucket`: `tokens` tokens in `segments` sequences
(`bucket_for`: the smallest segment count above the step's items, then the smallest token count with room).
`pad_step` appends dummy sequences after the items (every dummy at least one token; the last takes the rest).
Attention runs within each sequence and every other op of a layer token by token, so the dummies change no
real token's state; pooling gives one row per sequence, and the dummy rows are dropped before anything leaves
the engine. The flash kernel takes the bucket's token count as its `max_seqlen` (an upper bound is correct).

`StepGraphs.capture()` records one graph per bucket at warm-up, largest first, all in one memory pool: a
smaller bucket's step reuses the memory of the larger ones, so the pool is about the largest bucket's
activations; it is measured (`memory_bytes`) and bounded (`max_memory_bytes`: a bucket whose capture goes
past it is dropped). A graph is replayed with the step's ids, positions and offsets copied into its input
buffers, and its vectors copied out at once (the next replay may reuse their memory). Steps with images, or
too large for every bucket, run as before. Capture needs CUDA and the flash backend (the other backends read
the sequence lengths on the host, which a graph would freeze); the bucketing, the padding and the padded step
itself (`run` before `capture`) run anywhere, which is how the CPU tests check the vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipelines.varlen import Segments

TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048)
SEGMENT_BUCKETS = (2, 4, 8, 16, 32, 64)  # sequences per step, the dummies included (so up to 63 items)
# the graphs' memory pool: ~the largest bucket's activations (2B, 2,048 tokens: ~0.1-0.3 GiB expected)
MAX_MEMORY_BYTES = 2 * 2**30
PAD_TOKEN_ID = 0  # any id: a dummy token's state reaches no real token


@dataclass(frozen=True, order=True)
class Bucket:
    tokens: int
    segments: int


def bucket_for(
    lengths: Sequence[int],
    token_buckets: Sequence[int] = TOKEN_BUCKETS,
    segment_buckets: Sequence[int] = SEGMENT_BUCKETS,
) -> Bucket | None:
    """The smallest bucket a step of these item lengths fits with at least one dummy token, or None.

    Segments first (the smallest count above the items), then tokens: room for one token per dummy."""
    count, total = len(lengths), sum(lengths)
    segments = next((s for s in sorted(segment_buckets) if s > count), None)
    if segments is None or count == 0:
        return None
    tokens = next((t for t in sorted(token_buckets) if t - total >= segments - count), None)
    return None if tokens is None else Bucket(tokens, segments)


def dummy_lengths(bucket: Bucket, lengths: Sequence[int]) -> list[int]:
    """The dummy sequences that fill `bucket` after items of `lengths`: one token each, the last the rest."""
    dummies, room = bucket.segments - len(lengths), bucket.tokens - sum(lengths)
    if dummies < 1 or room < dummies:
        raise ValueError(f"a step of {len(lengths)} items, {sum(lengths)} tokens does not fit {bucket}")
    return [1] * (dummies - 1) + [room - dummies + 1]


def pad_step(batch, bucket: Bucket, pad_token_id: int = PAD_TOKEN_ID):
    """`batch` (a text `PackedBatch` on the host) with dummy sequences after its items, filling `bucket`.

    A dummy's positions count from 0 like a text's; its tokens are `pad_token_id`."""
    from pipelines.packed import PackedBatch

    if batch.pixel_values is not None:
        raise ValueError("only text steps are padded to buckets (images run as they are)")
    dummies = dummy_lengths(bucket, batch.lengths)
    pad = bucket.tokens - sum(batch.lengths)
    ids = torch.full((pad,), pad_token_id, dtype=batch.input_ids.dtype)
    positions = torch.cat([torch.arange(n, dtype=batch.position_ids.dtype) for n in dummies])
    return PackedBatch(
        input_ids=torch.cat([batch.input_ids, ids]),
        position_ids=torch.cat([batch.position_ids, positions.expand(3, pad)], dim=1),
        lengths=[*batch.lengths, *dummies],
    )


def offsets(lengths: Sequence[int]) -> torch.Tensor:
    """`cu_seqlens` of `lengths` (int32 `[S+1]`, on the host)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0, out=out[1:])
    return out


@dataclass
class Captured:
    """One bucket's graph: its input buffers (written before each replay) and its output (`[segments, D]`)."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pooled: torch.Tensor


@dataclass
class GraphReport:
    buckets: list[Bucket] = field(default_factory=list)  # captured
    dropped: list[Bucket] = field(default_factory=list)  # past the memory bound
    memory_bytes: int = 0  # GPU memory the capture reserved (the pool, the buffers)
    seconds: float = 0.0
    replays: int = 0
    uncaptured: int = 0  # steps padded to a bucket without a graph, run eagerly
    unbucketed: int = 0  # steps that fit no bucket (or had images), run as before


class StepGraphs:
    """Bucketed steps of a packed engine, padded, through captured CUDA graphs (see the module docstring).

    `engine` gives `device`, `dtype`, `backend` and `pooled(batch, segments)`: a step's pooled rows, one per
    sequence, the dummies' included."""

    def __init__(
        self,
        engine,
        token_buckets: Sequence[int] = TOKEN_BUCKETS,
        segment_buckets: Sequence[int] = SEGMENT_BUCKETS,
        max_memory_bytes: int = MAX_MEMORY_BYTES,
    ):
        self.engine = engine
        self.token_buckets = tuple(sorted(token_buckets))
        self.segment_buckets = tuple(sorted(segment_buckets))
        self.max_memory_bytes = max_memory_bytes
        self.graphs: dict[Bucket, Captured] = {}
        self.report = GraphReport()

    def bucket(self, batch) -> Bucket | None:
        """The bucket of a host `PackedBatch`, or None: images, or too large for every bucket."""
        if batch.pixel_values is not None:
            return None
        return bucket_for(batch.lengths, self.token_buckets, self.segment_buckets)

    def buckets(self) -> list[Bucket]:
        """Every bucket a step can land in (segments <= tokens), largest first: the order of capture."""
        pairs = [Bucket(t, s) for t in self.token_buckets for s in self.segment_buckets if s <= t]
        return sorted(pairs, reverse=True)

    @torch.inference_mode()
    def run(self, batch, bucket: Bucket) -> torch.Tensor:
        """Pooled `[items, D]` float32 of a host text batch, padded to `bucket`: replayed where it was
        captured, else run eagerly (the same padded function the graph holds)."""
        count = batch.num_items
        padded = pad_step(batch, bucket)
        captured = self.graphs.get(bucket)
        if captured is None:
            self.report.uncaptured += 1
            device = self.engine.device
            step = padded.to(device)
            segments = Segments.from_lengths(padded.lengths, device)
            segments.max_seqlen = bucket.tokens  # as captured: the bucket bounds every sequence
            return self.engine.pooled(step, segments)[:count]
        for buffer, host in (
            (captured.input_ids, padded.input_ids),
            (captured.position_ids, padded.position_ids),
            (captured.cu_seqlens, offsets(padded.lengths)),
        ):
            buffer.copy_(host.pin_memory(), non_blocking=True)
        captured.graph.replay()
        self.report.replays += 1
        return captured.pooled[:count].clone()  # now: a later replay may reuse the pool's memory

    # -- capture (CUDA only) -------------------------------------------------------------------------------

    def capture(self) -> GraphReport:
        """Capture every bucket's graph (largest first, one shared pool), within `max_memory_bytes`."""
        import time

        engine = self.engine
        if engine.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {engine.device}")
        if engine.backend != "flash":
            raise RuntimeError(
                f"CUDA graphs need the flash varlen backend (got {engine.backend!r}: it reads sequence lengths "
                "on the host, which a graph would freeze)"
            )
        began = time.perf_counter()
        torch.cuda.synchronize(engine.device)
        reserved = torch.cuda.memory_reserved(engine.device)
        pool = torch.cuda.graph_pool_handle()
        for bucket in self.buckets():
            if bucket in self.graphs:
                continue
            self.graphs[bucket] = self._capture_one(bucket, pool)
            used = torch.cuda.memory_reserved(engine.device) - reserved
            if used > self.max_memory_bytes:
                del self.graphs[bucket]
                self.report.dropped.append(bucket)
            else:
                self.report.memory_bytes = used
        torch.cuda.synchronize(engine.device)
        self.report.buckets = sorted(self.graphs)
        self.report.seconds = time.perf_counter() - began
        return self.report

    @torch.inference_mode()
    def _capture_one(self, bucket: Bucket, pool) -> Captured:
        device = self.engine.device
        lengths = [1] * (bucket.segments - 1) + [bucket.tokens - bucket.segments + 1]
        input_ids = torch.full((bucket.tokens,), PAD_TOKEN_ID, dtype=torch.long, device=device)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).expand(3, -1).contiguous().to(device)
        cu_seqlens = offsets(lengths).to(device)
        segments = Segments(cu_seqlens=cu_seqlens, lengths=lengths, max_seqlen=bucket.tokens)

        def step() -> torch.Tensor:
            from pipelines.packed import PackedBatch

            batch = PackedBatch(input_ids=input_ids, position_ids=position_ids, lengths=lengths)
            return self.engine.pooled(batch, segments)

        side = torch.cuda.Stream(device)  # a run before capture, off the capture stream (lazy init, tuning)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            pooled = step()
        return Captured(graph, input_ids, position_ids, cu_seqlens, pooled)
