"""`vlm-embed rerank`: documents printed best first with the reranker's scores; bad ones reported, not fatal."""

import json

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.reranker import Reranker
from tests.conftest import make_image

QUERY = "a red car near the sea"
DOCS = ["The red car follows the long road near the sea.", "Three apples on a wooden table.", "the sea"]


@pytest.fixture(scope="module")
def reranker(tiny_reranker_dir):
    return Reranker.load(str(tiny_reranker_dir), device="cpu", dtype="float32")


def test_documents_are_printed_best_first_with_their_scores(tiny_reranker_dir, reranker, capsys):
    assert main(["rerank", QUERY, *DOCS, "--model", str(tiny_reranker_dir), "--device", "cpu"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    expected = reranker.score(QUERY, DOCS)
    order = np.argsort(-expected, kind="stable")
    assert [int(index) for _, _, index, _ in lines] == order.tolist()
    assert [float(score) for _, score, _, _ in lines] == pytest.approx(expected[order], abs=1e-4)
    assert [text for *_, text in lines] == [DOCS[i] for i in order]


def test_a_documents_file_with_ids_images_and_bad_lines(tiny_reranker_dir, reranker, tmp_path, capsys):
    make_image(1).save(tmp_path / "photo.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [
        json.dumps({"id": "doc-a", "text": DOCS[0]}),
        "{not json",
        json.dumps({"id": "doc-b", "image": "photo.png"}),
        json.dumps({"image": "bad.png"}),
        json.dumps(DOCS[1]),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["rerank", QUERY, "--documents", str(tmp_path / "docs.jsonl"), "--json", "--top-n", "2"]
    code = main([*argv, "--model", str(tiny_reranker_dir), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "error: document 1: " in err and "not valid JSON" in err and "column" in err
    assert "error: document 3: " in err and "bad.png" in err
    records = [json.loads(line) for line in out.splitlines()]
    good = [{"text": DOCS[0]}, {"image": str(tmp_path / "photo.png")}, DOCS[1]]
    expected = dict(zip([0, 2, 4], reranker.score(QUERY, good), strict=True))
    best = sorted(expected, key=lambda i: -expected[i])[:2]
    assert [r["index"] for r in records] == best and [r["rank"] for r in records] == [1, 2]
    assert [r["score"] for r in records] == pytest.approx([expected[i] for i in best], abs=1e-5)
    assert {r["index"]: r.get("id") for r in records} == {
        i: {0: "doc-a", 2: "doc-b", 4: None}[i] for i in best
    }


def test_no_query_or_no_documents_is_a_usage_error(capsys):
    assert main(["rerank"]) == 2
    assert "no query" in capsys.readouterr().err
    assert main(["rerank", QUERY]) == 2
    assert "no documents" in capsys.readouterr().err
