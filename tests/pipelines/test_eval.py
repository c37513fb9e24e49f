"""The retrieval metrics on hand-made rankings, with the values worked out by hand in the comments, and the
labelled query files."""

from __future__ import annotations

import json

import pytest

from pipelines.eval import (
    LabelledQuery,
    QuerySetError,
    mean_metrics,
    ndcg_at,
    query_metrics,
    random_baseline,
    read_queries,
    recall_at,
    reciprocal_rank,
)
from pipelines.sample import SAMPLE_DIR

# a, b and c are relevant (a twice as much); c comes sixth
RANKING = ["a", "x", "b", "y", "z", "c", "u", "v", "w", "t"]
GRADED = {"a": 2.0, "b": 1.0, "c": 1.0}


def test_recall_counts_the_share_of_relevant_ids_in_the_first_k():
    assert recall_at(RANKING, GRADED, 1) == pytest.approx(1 / 3)  # a
    assert recall_at(RANKING, GRADED, 5) == pytest.approx(2 / 3)  # a, b
    assert recall_at(RANKING, GRADED, 10) == 1.0  # a, b, c


def test_reciprocal_rank_is_one_over_the_rank_of_the_first_relevant_id():
    assert reciprocal_rank(RANKING, GRADED) == 1.0
    assert reciprocal_rank(["x", "y", "q"], {"q": 1.0}) == pytest.approx(1 / 3)
    assert reciprocal_rank(["x"] * 10 + ["q"], {"q": 1.0}) == 0.0  # rank 11 is past the cutoff of 10


def test_ndcg_uses_linear_gain_over_the_ideal_ordering():
    # DCG   = 2/log2(2) + 1/log2(4) + 1/log2(7)  = 2 + 0.5 + 0.35621 = 2.85621
    # ideal = 2/log2(2) + 1/log2(3) + 1/log2(4)  = 2 + 0.63093 + 0.5 = 3.13093
    assert ndcg_at(RANKING, GRADED) == pytest.approx(2.85621 / 3.13093, abs=1e-5)  # 0.91226
    assert ndcg_at(["x", "y", "q"], {"q": 1.0}) == pytest.approx(0.5)  # 1/log2(4)
    assert ndcg_at(["a", "b", "c"], GRADED) == pytest.approx(1.0)


def test_a_repeated_relevant_id_earns_nothing_the_second_time():
    assert ndcg_at(["q", "q"], {"q": 1.0, "r": 1.0}) == pytest.approx(1 / (1 + 1 / 1.5849625), abs=1e-6)


def test_a_ranking_without_relevant_ids_scores_zero_everywhere():
    assert set(query_metrics(["x", "y"], {"q": 1.0}).values()) == {0.0}


def test_metrics_are_averaged_with_equal_weight_per_query():
    first = query_metrics(RANKING, GRADED)
    second = query_metrics(["x", "y", "q"], {"q": 1.0})
    mean = mean_metrics([first, second])
    assert mean["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
    assert mean["recall@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert mean["recall@5"] == pytest.approx((2 / 3 + 1) / 2)


def test_a_query_without_relevant_ids_is_refused():
    with pytest.raises(ValueError, match="relevant"):
        ndcg_at(["a"], {})


def test_the_random_baseline_matches_the_expectation_of_a_uniform_rank():
    # one relevant id among four: it is at rank 1, 2, 3 or 4 with probability 1/4 each, so
    # nDCG@10 = (1 + 1/log2(3) + 1/log2(4) + 1/log2(5)) / 4 = 0.64040 and recall@1 = 0.25
    queries = [LabelledQuery(str(i), {"d1": 1.0}) for i in range(50)]
    baseline = random_baseline(["d1", "d2", "d3", "d4"], queries, seeds=range(40))
    assert baseline["ndcg@10"] == pytest.approx(0.6404, abs=0.02)
    assert baseline["recall@1"] == pytest.approx(0.25, abs=0.03)
    assert baseline["recall@10"] == 1.0


def test_query_files_take_a_list_of_ids_or_graded_ids(tmp_path):
    path = tmp_path / "queries.jsonl"
    lines = [
        {"id": "q1", "text": "red things", "relevant": ["a", "b"]},
        {"id": 2, "text": "blue things", "relevant": {"c": 2, "d": 1}},
        {"id": "q3", "image": "photo.png", "relevant": ["e"]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    queries = read_queries(path)
    assert [q.id for q in queries] == ["q1", "2", "q3"]
    assert queries[0].relevant == {"a": 1.0, "b": 1.0}
    assert queries[1].relevant == {"c": 2.0, "d": 1.0}
    assert queries[2].image == str(tmp_path / "photo.png")  # relative to the file


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", ":1: not valid JSON"),
        ('{"text": "x", "relevant": ["a"]}', "needs an 'id'"),
        ('{"id": "q", "relevant": ["a"]}', "'text' and/or an 'image'"),
        ('{"id": "q", "text": "x"}', "no 'relevant'"),
        ('{"id": "q", "text": "x", "relevant": []}', "non-empty list"),
        ('{"id": "q", "text": "x", "relevant": {"a": 0}}', "above 0"),
        ('{"id": "q", "text": "   ", "relevant": ["a"]}', "non-blank"),
    ],
)
def test_a_bad_query_line_is_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "queries.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(QuerySetError, match=message):
        read_queries(path)


def test_a_repeated_query_id_is_refused(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text(
        '{"id": "q", "text": "a", "relevant": ["a"]}\n{"id": "q", "text": "b", "relevant": ["b"]}\n'
    )
    with pytest.raises(QuerySetError, match=r"queries.jsonl:2: the id 'q' is used twice"):
        read_queries(path)


def test_the_bundled_labelled_set_is_large_enough_and_every_label_names_a_passage():
    directory = SAMPLE_DIR / "retrieval"
    passages = [json.loads(line) for line in (directory / "passages.jsonl").read_text().splitlines()]
    ids = [p["id"] for p in passages]
    assert len(ids) >= 200 and len(set(ids)) == len(ids)
    assert len({p["topic"] for p in passages}) >= 20
    queries = read_queries(directory / "queries.jsonl")
    assert len(queries) >= 50
    assert all(set(q.relevant) <= set(ids) for q in queries)
    assert sum(len(set(q.relevant.values())) > 1 for q in queries) >= 10  # graded ones
