"""The compile cache shared through storage: a fresh process on another machine's empty compiler caches loads
what a first process compiled and saved (a directory store, an S3 store on 127.0.0.1), hits torch's caches
and gives the same vectors; a corrupt or unwritable store is a warning and the model still compiles.

Each process is a subprocess with its own `TORCHINDUCTOR_CACHE_DIR` (a new node's empty local caches): in one
process, compiled functions and in-memory caches would hide whether anything was loaded. One process compiles
from nothing (the tiny model, texts only: one graph); the others start from caches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.compile_cache import SUFFIX
from tests.s3_server import (
    KEY_ID,
    REGION,
    SECRET,
    s3_server,  # noqa: F401 (a fixture)
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["short", "a much longer sentence about the old ship near the sea, again and again", "42 and 294"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler"
    ),
]


def child(model_dir: str, store: str, image_side: int | None = None) -> None:
    """The subprocess: load, warm up (compiling, with the store; images too with `image_side`), embed; print
    what happened as JSON."""
    from dataclasses import asdict

    from pipelines.embedder import Embedder

    compiled = Embedder.load(model_dir, attention_layout="packed", compile=True, compile_cache=store)
    warm_up_s = compiled.warm_up(image_side=image_side)
    eager = Embedder(
        compiled.model,
        compiled.tokenizer,
        image_processor=compiled.image_processor,
        attention_layout="packed",
    )
    report = compiled.engine.compile_cache_report
    print(
        json.dumps(
            {
                "report": asdict(report),
                "warm_up_s": warm_up_s,
                "compiled": compiled.embed_batch(TEXTS).tolist(),
                "eager": eager.embed_batch(TEXTS).tolist(),
            }
        )
    )


def run_child(
    model_dir, store: str, inductor_dir: Path, env: dict | None = None, image_side: int | None = None
) -> tuple[dict, str]:
    """(the child's JSON, its stderr), run with `inductor_dir` as its machine's compiler cache."""
    arguments = f"{str(model_dir)!r}, {store!r}, {image_side!r}"
    code = f"from tests.pipelines.test_compile_cache import child; child({arguments})"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), **(env or {})},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def assert_same_vectors(*outputs: dict) -> None:
    for out in outputs:
        np.testing.assert_allclose(out["compiled"], out["eager"], atol=1e-5, rtol=0)
    first = outputs[0]["compiled"]
    for out in outputs[1:]:
        np.testing.assert_allclose(out["compiled"], first, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """A first node: empty local caches, an empty directory store; it compiles and saves."""
    base = tmp_path_factory.mktemp("compile-cache")
    store, inductor = base / "store", base / "inductor-first"
    out, _ = run_child(tiny_model_dir, str(store), inductor)
    return store, inductor, out


def test_a_first_process_compiles_and_saves_one_whole_blob_under_its_key(saved):
    store, _, out = saved
    report = out["report"]
    assert report["state"] == "miss" and report["cache_hits"] == 0 and report["compiled"] > 0
    assert report["key"].endswith(SUFFIX)
    assert [p.name for p in store.iterdir()] == [report["key"]]  # no partial file left
    assert report["saved_bytes"] == (store / report["key"]).stat().st_size > 0


def test_a_fresh_process_loads_the_directory_store_hits_the_caches_and_gives_the_same_vectors(
    saved, tiny_model_dir, tmp_path
):
    store, _, first = saved
    before = (store / first["report"]["key"]).read_bytes()
    out, _ = run_child(tiny_model_dir, str(store), tmp_path / "inductor-second")
    report = out["report"]
    assert report["key"] == first["report"]["key"]
    assert report["state"] == "hit" and report["artifacts"] > 0
    assert report["loaded_bytes"] == first["report"]["saved_bytes"]
    assert report["cache_hits"] > 0 and report["compiled"] == 0
    assert report["saved_bytes"] == 0  # the stored blob is kept, not rewritten
    assert (store / report["key"]).read_bytes() == before
    assert_same_vectors(first, out)


def test_a_warm_up_that_compiles_graphs_the_store_lacks_saves_a_superset_a_later_node_hits_entirely(
    saved, tiny_model_dir, tmp_path
):
    """A backfill saved texts only; a Serve replica warming up images compiles the vision block and saves
    both; a replica on another new node then compiles nothing from scratch."""
    store, _, first = saved
    store_copy = tmp_path / "store"
    shutil.copytree(store, store_copy)
    path = store_copy / first["report"]["key"]
    images, _ = run_child(tiny_model_dir, str(store_copy), tmp_path / "inductor-images", image_side=64)
    assert images["report"]["state"] == "hit" and images["report"]["compiled"] > 0
    assert images["report"]["saved_bytes"] == path.stat().st_size > first["report"]["saved_bytes"]
    later, _ = run_child(tiny_model_dir, str(store_copy), tmp_path / "inductor-later", image_side=64)
    assert later["report"]["state"] == "hit" and later["report"]["compiled"] == 0
    assert later["report"]["cache_hits"] > images["report"]["cache_hits"]
    assert later["report"]["saved_bytes"] == 0
    assert_same_vectors(first, images, later)


def test_the_same_through_an_s3_store(saved, tiny_model_dir, tmp_path, s3_server):  # noqa: F811
    _, first_inductor, first = saved
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": s3_server.endpoint,
    }
    store = s3_server.uri("compile-cache")
    # a node with warm local caches (the first one's) fills the empty bucket: what it read from them is saved
    saving, _ = run_child(tiny_model_dir, store, first_inductor, env)
    assert saving["report"]["state"] == "miss" and saving["report"]["saved_bytes"] > 0
    key = f"compile-cache/{saving['report']['key']}"
    assert [k for k in s3_server.keys("compile-cache/") if not k.endswith("/")] == [key]
    # a new node with empty local caches loads it from the bucket
    out, _ = run_child(tiny_model_dir, store, tmp_path / "inductor-new-node", env)
    assert out["report"]["state"] == "hit" and out["report"]["cache_hits"] > 0
    assert out["report"]["loaded_bytes"] == saving["report"]["saved_bytes"]
    assert_same_vectors(first, saving, out)


def test_a_corrupt_store_is_a_warning_the_model_compiles_and_a_whole_blob_replaces_it(
    saved, tiny_model_dir, tmp_path
):
    _, first_inductor, first = saved
    store = tmp_path / "store"
    store.mkdir()
    corrupt = store / first["report"]["key"]
    corrupt.write_bytes(b"not a cache" * 100)
    out, stderr = run_child(tiny_model_dir, str(store), first_inductor)
    assert out["report"]["state"] == "error" and "cannot load" in out["report"]["error"]
    assert "could not be read" in stderr
    assert_same_vectors(first, out)
    assert out["report"]["saved_bytes"] == corrupt.stat().st_size > 0
    assert b"not a cache" not in corrupt.read_bytes()


def test_an_unwritable_store_is_a_warning_and_the_model_still_compiles(saved, tiny_model_dir, tmp_path):
    _, first_inductor, first = saved
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the store's directory would be")
    out, stderr = run_child(tiny_model_dir, str(blocker / "store"), first_inductor)
    assert out["report"]["saved_bytes"] == 0 and out["report"]["error"].startswith("written")
    assert "could not be written" in stderr
    assert_same_vectors(first, out)


@pytest.mark.parametrize(
    "uri", ["s3://bucket/cache?region=us-west-2&access_key=AKIA&secret_key=s3cr3t", "s3://user:pw@host/cache"]
)
def test_a_cache_uri_with_credentials_is_refused_as_it_would_be_recorded_with_the_table(uri):
    from pydantic import ValidationError

    from pipelines.config import EmbedderConfig

    with pytest.raises(ValidationError, match="must not carry credentials"):
        EmbedderConfig(compile_cache=uri)
    assert EmbedderConfig(compile_cache="s3://bucket/cache?region=us-west-2").compile_cache.endswith(
        "us-west-2"
    )
