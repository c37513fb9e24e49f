"""The Ray Data stages of a backfill, between the readers and the sink.

1. `mark_done` (CPU, fused into the read tasks): each row claims its id among the groups of work units in
   flight (a repeat becomes `repeat`) and is looked up by id in the vectors and errors tables as committed
   (found: `done`, or `repeat` where this run committed it), so
   nothing is prepared, embedded or written twice (`pipelines.lance_write`).
2. `prepare_batch` (CPU, Ray Data tasks): `Preparer.prepare` on every `todo` row: image read and decode, EXIF
   orientation, RGB, resize, prompt template, tokenization, positions. Only the tokenizer and the image
   processor are loaded here, never the weights, and only for a batch with such rows. A bad row becomes an
   `error` row (stage `prepare`).
3. `EmbedActor` (GPU, an actor pool): holds one `Embedder`, loaded on the first batch with rows to embed (a
   rerun with nothing left to do loads none); runs `embed_prepared` on the batch's prepared rows.
   A failing forward pass is bisected down to the failing items, which become `error` rows (stage `embed`),
   so one bad item never loses the rest of its batch.

Every stage returns exactly one row per input row (checked), with the status `todo`/`done`/`repeat`/`error`/
`ok`, so the writer (`lance_write.write_stage`) can account for every input row. Blocks are Arrow tables
with fixed schemas end to end (`pipelines.prepared_arrow`: the schemas, and the prepared items as columns).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from pipelines.config import Config, EmbedderConfig
from pipelines.metrics import PipelineMetrics
from pipelines.prepared_arrow import (
    PASS_COLUMNS,
    output_schema,
    prepared_items,
    prepared_table,
    vector_column,
)
from pipelines.readers import is_uri, read_image_uri
from pipelines.work_units import READ_TASKS


def _check_count(batch, out) -> Any:
    if out.num_rows != batch.num_rows:  # a stage that loses or duplicates rows is a bug, never silent
        raise RuntimeError(f"stage produced {out.num_rows} rows for {batch.num_rows}")
    return out


# -- 1. resume: mark rows already done ---------------------------------------------------------------------


def mark_done(batch, target):
    """Rows whose id another row of the groups in flight claimed first become `repeat`, rows whose id the
    tables hold (`target`: `lance_write.Target`) become `done` (held when the run started) or `repeat` (an
    earlier group of this run committed it); both drop their inline image bytes. With `retry_errors`, a row
    found only in the errors table is done again."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.lance_write import claim, committed_ids

    if batch.num_rows == 0:
        return batch
    ids = batch["id"].to_pylist()
    granted, (vectors, errors) = claim(target, ids, batch["origin"].to_pylist())
    wanted = [i for i, ok in zip(ids, granted, strict=True) if ok]
    found = committed_ids(target, "vectors", wanted, vectors)
    if not target.retry_errors:
        found |= committed_ids(target, "errors", [i for i in wanted if i not in found], errors)
    # found, but committed by an earlier group of this run: a repeat of a row this run wrote
    before = committed_ids(target, "vectors", sorted(found))
    if not target.retry_errors:
        before |= committed_ids(target, "errors", sorted(found - before))
    status = [
        "repeat" if not ok or (i in found and i not in before) else ("done" if i in found else s)
        for i, s, ok in zip(ids, batch["status"].to_pylist(), granted, strict=True)
    ]
    skipped = pa.array([s in ("done", "repeat") for s in status])
    image_bytes = pc.if_else(skipped, pa.scalar(None, pa.binary()), batch["image_bytes"])
    out = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    return out.set_column(out.schema.get_field_index("image_bytes"), "image_bytes", image_bytes)


# -- 2. prepare on CPUs ------------------------------------------------------------------------------------


def build_preparer(config: EmbedderConfig):
    """The same preparer the backend's embedder builds (`backends.load_preparer`): for Qwen3-VL from the
    tokenizer and image processor only (no weights)."""
    from pipelines.backends import load_preparer

    return load_preparer(config)


@functools.lru_cache(maxsize=4)
def _cached_preparer(config_json: str):
    return build_preparer(EmbedderConfig.model_validate_json(config_json))


def _item(row: dict[str, Any], storage: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """The embedder's item of a row; `storage`: each source's object-store options, by source label."""
    item: dict[str, Any] = {}
    if row["text"] is not None:
        item["text"] = row["text"]
    if row["image_bytes"] is not None:
        item["image"] = row["image_bytes"]
    elif row["image_uri"] is not None:
        uri = row["image_uri"]
        options = (storage or {}).get(row["source"])
        item["image"] = read_image_uri(uri, options) if is_uri(uri) else uri
    return item


def prepare_batch(batch, config_json: str, storage: dict[str, dict[str, str]] | None = None):
    """CPU stage: `todo` rows -> token ids, positions and pixels; bad rows -> `error` (stage `prepare`)."""
    from pipelines.items import ItemError

    status = batch["status"].to_pylist()
    stage, reason = batch["stage"].to_pylist(), batch["reason"].to_pylist()
    todo = [i for i, s in enumerate(status) if s == "todo"]
    # a batch of done and unreadable rows only (a rerun) loads no tokenizer
    preparer = _cached_preparer(config_json) if todo else None
    items: list = [None] * batch.num_rows
    if todo:
        fields = ("text", "image_bytes", "image_uri", "source")
        rows = batch.select(fields).take(todo).to_pylist()
        for i, row in zip(todo, rows, strict=True):
            try:
                items[i] = preparer.prepare(_item(row, storage))
                continue
            except ItemError as exc:
                message = f"{exc.kind}: {exc.reason}"
            except Exception as exc:  # a decoder bug on one odd file must not fail the other rows
                message = f"unexpected: {type(exc).__name__}: {exc}"
            status[i], stage[i], reason[i] = "error", "prepare", message
    metrics = PipelineMetrics()
    metrics.errors("read", sum(s == "error" for s in batch["status"].to_pylist()))
    metrics.errors("prepare", sum(status[i] == "error" for i in todo))
    rows = _with_status(batch.select(list(PASS_COLUMNS)), status, stage, reason)
    return _check_count(batch, prepared_table(rows, items))


def _with_status(table, status: list, stage: list, reason: list):
    import pyarrow as pa

    for name, values in (("status", status), ("stage", stage), ("reason", reason)):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


# -- 3. embed on GPUs --------------------------------------------------------------------------------------


class EmbedActor:
    """One `Embedder` per actor (on its GPU, or the CPU when the pool has `num_gpus=0`).

    Given the vector size (`dimension`, which the driver reads from the checkpoint's config), the actor loads
    the model on its first batch with rows to embed, not when it starts: a rerun whose rows are all done
    passes them through without ever loading (or compiling) a model."""

    def __init__(self, config_json: str, dimension: int | None = None):
        self.config = EmbedderConfig.model_validate_json(config_json)
        self.embedder = None
        self._dimension = dimension
        self.metrics = PipelineMetrics()
        if dimension is None:
            self._load()

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._load()
        return self._dimension

    def _load(self) -> None:
        from pipelines.backends import load_embedder

        began = time.perf_counter()
        self.embedder = load_embedder(self.config)
        loaded = self.embedder.get_embedding_dimension()
        if self._dimension is not None and loaded != self._dimension:
            raise RuntimeError(f"the model gives {loaded}-d vectors, the table expects {self._dimension}")
        self._dimension = loaded
        self.load_s = time.perf_counter() - began  # imports, weights; the warm-up (compiling) apart
        device = self.embedder.device  # a torch.device, or "cpu" (the stand-in)
        device_type = getattr(device, "type", str(device).split(":")[0])
        if self.config.resolved_compile(device_type, warmed_up=True):
            # compile before the first batch's items, not inside their forward pass; with an image processor the
            # vision blocks too, as Serve's replica does (and the shared compile cache then holds both)
            has_images = getattr(self.embedder, "image_processor", None) is not None
            self.embedder.warm_up(image_side=64 if has_images else None)
        self.warm_up_s = time.perf_counter() - began - self.load_s

    def __call__(self, batch):
        status = batch["status"].to_pylist()
        stage, reason = batch["stage"].to_pylist(), batch["reason"].to_pylist()
        todo = [i for i, s in enumerate(status) if s == "todo"]
        vectors = np.zeros((batch.num_rows, self.dimension), np.float32)
        if todo:
            if self.embedder is None:
                self._load()
            prepared = prepared_items(batch, todo)
            embedded = []
            for i, item, result in zip(todo, prepared, self._embed(prepared), strict=True):
                if isinstance(result, str):
                    status[i], stage[i], reason[i] = "error", "embed", result
                else:
                    status[i], vectors[i] = "ok", result
                    embedded.append(item)
            self._record(embedded, errors=len(todo) - len(embedded))
        rows = _with_status(batch.select([*PASS_COLUMNS, "modality"]), status, stage, reason)
        out = rows.append_column("vector", vector_column(vectors))
        return _check_count(batch, out.cast(output_schema(self.dimension, batch.schema.field("kept").type)))

    def _record(self, embedded: list, errors: int) -> None:
        for modality in {item.modality for item in embedded}:
            self.metrics.items_embedded(modality, sum(item.modality == modality for item in embedded))
        self.metrics.tokens(sum(item.num_tokens for item in embedded))
        self.metrics.images(sum(item.pixel_values is not None for item in embedded))
        self.metrics.errors("embed", errors)

    def _embed(self, items: list) -> list[np.ndarray | str]:
        """Vectors for the items, or for each the model cannot embed the reason (`Embedder.try_embed_prepared`:
        a failing forward pass is split until the failing items are found, a non-finite vector is an error)."""
        start = time.perf_counter()
        result = self.embedder.try_embed_prepared(items)
        self.metrics.batch(time.perf_counter() - start, len(items))
        return result.per_item(len(items))


# -- the pipeline ------------------------------------------------------------------------------------------


def prepare_memory(config: Config) -> int:
    """Bytes one prepare task may hold at its peak: the worker with its tokenizer, and every row an image at
    `max_pixels` as float32 patches (a text-only backend, sentence-transformers: its model on the CPU and no
    images)."""
    if config.embedder.backend == "sentence-transformers":
        return 1024 * 2**20 + config.resources.prepare_batch_rows * 2**20
    # channels x temporal patch x float32, + text
    per_row = config.embedder.resolved_max_pixels * 3 * 2 * 4 + 2**20
    return 512 * 2**20 + config.resources.prepare_batch_rows * per_row


def build_pipeline(ds, config: Config, target, num_gpus: float, dimension: int | None = None, pool=None):
    """The rows of a run's work units (`work_units.units_dataset`) -> mark done (claims, look-ups) ->
    prepare (CPU tasks) -> embed (actor pool), one lazy Dataset; `target`: `lance_write.Target`.

    The prepare tasks declare the memory they may need, so Ray does not pack more decoders on a node than it
    can hold. As their resources differ from the read's and the actors', Ray Data also keeps them a separate
    operator: a large file is prepared by many tasks, and the actors never decode while their GPU waits.
    With `dimension` given, the actors load their model only once rows reach them that need it. With `pool`
    (`embed_pool.EmbedPool`, the backfill's), the embed stage hands its batches to the run's long-lived workers.

    Only the prepare stage asks Ray Data for CPUs (the reads with mark_done, the embed clients and the
    writes ask for none, with a cap on their tasks): Ray Data's allocator reserves an operator's minimum
    CPUs upstream first and leaves a downstream one that does not fit with nothing until the upstream ones
    finish. With 1-CPU reads and a 0.5-CPU write stage on a 2-CPU node, the writes waited for the last
    prepare task, so no group could commit before the end of the run (and, under the read-ahead window
    that waits for commits, the run hung).
    """
    import ray

    resources = config.resources
    embedder_json = config.embedder.model_dump_json()
    storage = {s.label: s.storage_options for s in config.sources if s.storage_options}
    ds = ds.map_batches(
        mark_done,
        batch_format="pyarrow",
        fn_kwargs={"target": target},
        udf_modifying_row_count=False,
        num_cpus=0,  # as the reads' (the docstring says why)
        compute=ray.data.TaskPoolStrategy(size=READ_TASKS),  # the reads' cap: so Ray Data fuses the two
    )
    ds = ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=resources.prepare_batch_rows,
        fn_kwargs={"config_json": embedder_json, "storage": storage or None},
        udf_modifying_row_count=False,
        num_cpus=1,
        memory=prepare_memory(config),
    )
    if pool is not None:
        return pool.stage(ds, resources.batch_rows)
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs={"config_json": embedder_json, "dimension": dimension},
        compute=ray.data.ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors),
        batch_size=resources.batch_rows,
        batch_format="pyarrow",
        num_gpus=num_gpus,
        num_cpus=resources.num_cpus_per_actor,
        udf_modifying_row_count=False,
    )
