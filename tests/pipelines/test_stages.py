"""The stages: done and repeated rows are marked, prepare runs without weights, the actor embeds and bisects
failures."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import Config, EmbedderConfig, ResourcesConfig
from pipelines.lance_write import Target, dataset_uri, release_claims, start_claims, stop_claims
from pipelines.prepare import PreparedItem
from pipelines.prepared_arrow import prepared_schema
from pipelines.readers import row_schema
from pipelines.stages import (
    EmbedActor,
    build_pipeline,
    build_preparer,
    mark_done,
    prepare_batch,
)
from tests.conftest import image_bytes, make_image


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")


def rows(*specs: dict) -> pa.Table:
    """Reader rows: dicts with id and some of text, image_uri, image_bytes, status, stage, reason."""
    full = [{"source": "test", "status": "todo", "origin": f"0:{n}", **spec} for n, spec in enumerate(specs)]
    return pa.Table.from_pylist(full, schema=row_schema())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage-images")
    path = folder / "photo.png"
    make_image(7, (90, 70)).save(path)
    return rows(
        {"id": "text", "text": "a plain text"},
        {"id": "image", "image_uri": str(path)},
        {"id": "pair", "text": "a caption", "image_bytes": image_bytes(8, (50, 80))},
        {"id": "blank", "text": "  "},
        {"id": "gone", "image_uri": str(folder / "missing.png")},
        {"id": "unread", "status": "error", "stage": "read", "reason": "invalid_json: x:1: not valid JSON"},
        {"id": "finished", "text": "embedded last time", "status": "done"},
    )


ITEMS = {
    "text": "a plain text",
    "pair": {"text": "a caption", "image": image_bytes(8, (50, 80))},
}


def test_the_preparer_needs_no_weights_and_prepares_what_the_embedder_does(config, embedder, inputs):
    preparer = build_preparer(config)
    path = inputs["image_uri"][1].as_py()
    for item in ("a plain text", {"image": path}, {"text": "a caption", "image": make_image(3)}):
        mine, theirs = preparer.prepare(item), embedder.prepare(item)
        np.testing.assert_array_equal(mine.input_ids, theirs.input_ids)
        np.testing.assert_array_equal(mine.position_ids, theirs.position_ids)
        if theirs.pixel_values is not None:
            np.testing.assert_array_equal(mine.pixel_values, theirs.pixel_values)


def committed_tables(root, vectors: list[str], errors: list[str], claims=(), retry_errors=False) -> Target:
    """A vectors and an errors table on disk holding these ids, as the stages see them."""
    import lancedb

    db = lancedb.connect(str(root))
    made = {}
    for name, ids in (("vectors", vectors), ("errors", errors)):
        data = pa.table({"id": pa.array(ids or ["placeholder"], pa.string())})
        table = db.create_table(name, data=data, mode="overwrite")
        if not ids:
            table.delete("true")
        made[name] = table.version
    return Target(
        vectors_uri=dataset_uri(str(root), "vectors"),
        errors_uri=dataset_uri(str(root), "errors"),
        storage_options=(),
        retry_errors=retry_errors,
        start_versions=(made["vectors"], made["errors"]),
        claims=claims,
    )


def test_ids_already_in_either_table_are_done_and_lose_their_inline_bytes(inputs, tmp_path):
    marked = mark_done(inputs, committed_tables(tmp_path, ["pair", "other"], ["blank"]))
    status = dict(zip(marked["id"].to_pylist(), marked["status"].to_pylist(), strict=True))
    assert status == {
        "text": "todo",
        "image": "todo",
        "pair": "done",
        "blank": "done",
        "gone": "todo",
        "unread": "error",
        "finished": "done",
    }
    assert marked["image_bytes"][2].as_py() is None
    assert mark_done(inputs, committed_tables(tmp_path / "empty", [], [])).equals(inputs)


def test_with_retry_errors_a_row_only_in_the_errors_table_is_done_again(inputs, tmp_path):
    marked = mark_done(inputs, committed_tables(tmp_path, ["pair"], ["blank"], retry_errors=True))
    status = dict(zip(marked["id"].to_pylist(), marked["status"].to_pylist(), strict=True))
    assert status["blank"] == "todo" and status["pair"] == "done"


def test_a_repeated_id_is_marked_once_it_was_claimed_and_a_retried_task_claims_its_own_rows(
    tmp_path, ray_session
):
    target = committed_tables(tmp_path, [], [])
    claims = start_claims(2, target.start_versions)
    target = dataclasses.replace(target, claims=claims)
    first = rows({"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "x"})
    assert mark_done(first, target)["status"].to_pylist() == ["todo", "todo", "repeat"]
    assert mark_done(first, target)["status"].to_pylist() == [
        "todo",
        "todo",
        "repeat",
    ]  # a retry: same origins
    later = pa.Table.from_pylist([{**first.to_pylist()[1], "origin": "1:0"}], schema=row_schema())
    assert mark_done(later, target)["status"].to_pylist() == ["repeat"]
    assert release_claims(claims, ["1"], target.start_versions) == 0  # unit 1 holds no claim of its own
    assert mark_done(later, target)["status"].to_pylist() == ["repeat"]  # unit 0 is in flight: still held
    stop_claims(claims)


def test_a_committed_units_ids_are_let_go_and_then_found_at_the_versions_its_commit_made(
    tmp_path, ray_session
):
    """The claim of a repeat of a committed group's id is granted only after the release, which names the
    commit's versions: the look-up there finds the id (a repeat of this run), so it is never written twice."""
    import lancedb

    target = committed_tables(tmp_path, [], [])
    claims = start_claims(2, target.start_versions)
    target = dataclasses.replace(target, claims=claims)
    first = rows({"id": "a", "text": "x"}, {"id": "b", "text": "y"})
    assert mark_done(first, target)["status"].to_pylist() == ["todo", "todo"]
    vectors = lancedb.connect(str(tmp_path)).open_table("vectors")
    vectors.add(pa.table({"id": pa.array(["a", "b"])}))  # unit 0's commit
    later = pa.Table.from_pylist(
        [{**row, "origin": f"7:{i}"} for i, row in enumerate(first.to_pylist())], schema=row_schema()
    )
    assert mark_done(later, target)["status"].to_pylist() == ["repeat", "repeat"]  # refused: still held
    assert release_claims(claims, ["0"], (vectors.version, target.start_versions[1])) == 2
    assert mark_done(later, target)["status"].to_pylist() == ["repeat", "repeat"]  # granted, found there
    stale = release_claims(claims, ["0"], target.start_versions)  # an older version never wins
    assert stale == 0 and mark_done(later, target)["status"].to_pylist() == ["repeat", "repeat"]
    stop_claims(claims)


def test_prepare_turns_bad_rows_into_errors_and_passes_the_others_through(config, embedder, inputs):
    out = prepare_batch(inputs, config.model_dump_json())
    assert out.schema == prepared_schema() and out.num_rows == inputs.num_rows
    by_id = {row["id"]: row for row in out.to_pylist()}
    assert by_id["blank"]["status"] == "error" and by_id["blank"]["stage"] == "prepare"
    assert by_id["blank"]["reason"] == "empty_text: text is empty or only whitespace"
    assert (
        by_id["gone"]["reason"].startswith("image_unreadable: ") and "missing.png" in by_id["gone"]["reason"]
    )
    assert by_id["unread"]["reason"] == "invalid_json: x:1: not valid JSON"  # untouched
    assert by_id["finished"]["status"] == "done" and by_id["finished"]["input_ids"] == []
    pair = PreparedItem.from_row(by_id["pair"] | {"pixel_shape": np.asarray(by_id["pair"]["pixel_shape"])})
    expected = embedder.prepare(ITEMS["pair"])
    assert pair.modality == "text+image"
    np.testing.assert_array_equal(pair.input_ids, expected.input_ids)
    np.testing.assert_array_equal(pair.pixel_values, expected.pixel_values)


def test_the_actor_embeds_like_embed_batch_and_isolates_an_item_that_fails_forward(
    config, embedder, inputs, ray_session
):
    prepared = prepare_batch(inputs, config.model_dump_json())
    # an out-of-vocabulary token id makes the forward pass of any batch holding it fail
    ids = prepared["input_ids"].to_pylist()
    poisoned = next(i for i, row_id in enumerate(prepared["id"].to_pylist()) if row_id == "image")
    ids[poisoned] = [10**9, *ids[poisoned][1:]]
    column = prepared.schema.get_field_index("input_ids")
    prepared = prepared.set_column(column, "input_ids", pa.array(ids, prepared.schema.field(column).type))
    actor = EmbedActor(config.model_dump_json())
    out = actor(prepared)
    by_id = {row["id"]: row for row in out.to_pylist()}
    assert out.num_rows == inputs.num_rows
    assert by_id["image"]["status"] == "error" and by_id["image"]["stage"] == "embed"
    assert by_id["image"]["reason"].startswith("forward_failed: ")
    assert {k for k, row in by_id.items() if row["status"] == "ok"} == {"text", "pair"}
    for key, item in ITEMS.items():
        np.testing.assert_allclose(by_id[key]["vector"], embedder.embed_batch([item])[0], atol=1e-5)


def test_the_pipeline_keeps_prepare_and_embed_apart_and_every_row_comes_out_once(
    config, inputs, ray_session, tmp_path
):
    import ray

    job = Config(embedder=config, resources=ResourcesConfig(batch_rows=4, prepare_batch_rows=2))
    target = committed_tables(tmp_path, ["finished"], [])
    pipeline = build_pipeline(ray.data.from_arrow(inputs), job, target, num_gpus=0)
    out = pa.concat_tables(list(pipeline.iter_batches(batch_size=None, batch_format="pyarrow")))
    assert sorted(out["id"].to_pylist()) == sorted(inputs["id"].to_pylist())
    status = dict(zip(out["id"].to_pylist(), out["status"].to_pylist(), strict=True))
    assert [k for k, s in sorted(status.items()) if s == "ok"] == ["image", "pair", "text"]
    stats = pipeline.stats()
    assert "MapBatches(prepare_batch)" in stats and "MapBatches(EmbedActor)" in stats
    assert "prepare_batch)->MapBatches(EmbedActor" not in stats  # prepare was not fused into the actors


def test_the_actor_warms_up_only_where_its_model_compiles(config, monkeypatch):
    """`compile: auto` is a truthy string: on a CPU it compiles nothing, so the actor does not warm up."""
    from pipelines.embedder import Embedder

    warmed = []
    monkeypatch.setattr(
        Embedder, "warm_up", lambda self, image_side=None: warmed.append((self.device.type, image_side))
    )
    EmbedActor(config.model_copy(update={"compile": "auto"}).model_dump_json())
    assert warmed == []
    EmbedActor(config.model_copy(update={"compile": True, "attention_layout": "packed"}).model_dump_json())
    # asked for outright: compiled (at warm-up) even on a CPU, images too (the tiny model has an image processor)
    assert warmed == [("cpu", 64)]
