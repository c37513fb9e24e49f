"""The `vlm-embed` command line, run as a real subprocess through its console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import image_bytes

VLM_EMBED = str(Path(sys.executable).with_name("vlm-embed"))


def run(*args, cwd=None, timeout=180):
    return subprocess.run(
        [VLM_EMBED, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=os.environ
    )


def records(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.parametrize("command", [[], ["embed"], ["demo"], ["make-tiny-model"]])
def test_every_command_explains_itself_with_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: vlm-embed" in result.stdout and len(result.stdout.splitlines()) > 5


def test_embed_writes_one_json_line_per_item_matching_the_python_api(tiny_model_dir, embedder, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes(3))
    result = run(
        "embed", "--model", str(tiny_model_dir), "a red circle", "a blue square", "--image", str(image)
    )
    assert result.returncode == 0, result.stderr
    out = records(result.stdout)
    assert [r["index"] for r in out] == [0, 1, 2]
    expected = embedder.embed_batch(["a red circle", "a blue square", {"image": str(image)}])
    np.testing.assert_allclose(np.array([r["embedding"] for r in out]), expected, atol=1e-5)


def test_embed_pair_makes_text_plus_image_items_and_options_apply(tiny_model_dir, embedder, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes(4))
    result = run(
        "embed",
        "--model",
        str(tiny_model_dir),
        "--pair",
        "--image",
        str(image),
        "a caption",
        "--pooling",
        "last",
        "--layer",
        "2",
        "--dimensions",
        "8",
        "--no-normalize",
    )
    assert result.returncode == 0, result.stderr
    from pipelines.embedder import Embedder

    same = Embedder(
        embedder.model,
        embedder.tokenizer,
        image_processor=embedder.image_processor,
        pooling="last",
        layer=2,
        dimensions=8,
        normalize=False,
    )
    np.testing.assert_allclose(
        records(result.stdout)[0]["embedding"], same.embed_multimodal("a caption", str(image)), atol=1e-5
    )


def test_embed_reads_jsonl_and_reports_bad_items_on_stderr_without_losing_the_others(
    tiny_model_dir, tmp_path
):
    (tmp_path / "ok.png").write_bytes(image_bytes(5))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [
        '"plain text"',
        '{"id": "a", "text": "with id"}',
        '{"text": "   "}',
        "{not json",
        '{"image": "ok.png", "text": "pair"}',
        '{"image": "broken.png"}',
        '{"caption": "x"}',
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    result = run("embed", "--model", str(tiny_model_dir), "--input", str(tmp_path / "items.jsonl"))
    assert result.returncode == 1
    out = records(result.stdout)
    assert [r["index"] for r in out] == [0, 1, 4]
    assert out[1]["id"] == "a"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == "error: item 2: text is empty or only whitespace"
    assert errors[1].startswith("error: item 3:") and "not valid JSON" in errors[1]
    assert errors[2].startswith("error: item 5:") and "broken.png is not a readable image" in errors[2]
    assert errors[3].startswith("error: item 6: unknown keys ['caption']")


def test_embed_without_items_or_with_a_bad_model_fails_clearly(tmp_path):
    result = run("embed")
    assert result.returncode == 2 and "nothing to embed" in result.stderr
    result = run("embed", "--model", str(tmp_path / "missing"), "text")
    assert result.returncode == 2 and "not a checkpoint directory" in result.stderr
    result = run("embed", "--pooling", "median", "text")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_make_tiny_model_builds_a_loadable_checkpoint(tmp_path):
    result = run("make-tiny-model", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    again = run("make-tiny-model", str(tmp_path / "tiny"))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    embedded = run("embed", "--model", str(tmp_path / "tiny"), "hello")
    assert embedded.returncode == 0 and len(records(embedded.stdout)[0]["embedding"]) == 64


def test_demo_with_a_text_only_backend_embeds_the_texts_and_names_each_skipped_image():
    from tests.minilm import minilm_dir

    result = run("demo", "--backend", "sentence-transformers", "--model", str(minilm_dir()))
    assert result.returncode == 0, result.stderr
    assert "embedded 6 of 18 sample items" in result.stdout and "vectors of shape (6, 384)" in result.stdout
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 12 and all("sentence-transformers" in line for line in skipped)


def test_demo_prints_the_shape_and_a_similarity_matrix(tiny_model_dir):
    result = run("demo", "--model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    assert "vectors of shape (18, 64)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.rstrip().endswith("]")]
    assert len(rows) == 18 and all("1.00" in row for row in rows)
