"""Retrieval metrics and labelled query sets: small pure functions over rankings, for `vlm-embed eval`.

A ranking is the list of ids a search returned, best first; a query's labels map the ids that are relevant to
a grade (> 0; a plain list of ids means grade 1 each). The metrics are the usual ones, written out here
because they are a few lines each and the project must not pull in an evaluation framework for them:

- Recall@k: the share of the relevant ids found in the first k (graded or not, every relevant id counts once).
- MRR@10: 1 / the rank of the first relevant id within the first 10, else 0.
- nDCG@10: DCG = sum over the first 10 of grade / log2(rank + 1) (linear gain, as trec_eval and BEIR compute
  it), divided by the DCG of the ideal ranking (grades sorted from high to low).

Each is averaged over the queries with equal weight. `random_baseline` gives what a shuffled ranking of the
whole corpus scores on the same labels (averaged over seeds), the honest floor to compare a model with.
Nothing here imports numpy's heavy friends, torch or LanceDB.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECALL_KS = (1, 5, 10)
CUTOFF = 10  # MRR@10, nDCG@10
METRICS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


class QuerySetError(ValueError):
    """A labelled query file that cannot be used: it names the file, the line and what is wrong."""


@dataclass(frozen=True)
class LabelledQuery:
    """One query of a labelled set: its text and/or image, and the relevant ids with their grades."""

    id: str
    relevant: dict[str, float]
    text: str | None = None
    image: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def recall_at(ranking: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """The share of the relevant ids among the first `k` of `ranking`."""
    if not relevant:
        raise ValueError("a query needs at least one relevant id")
    found = {doc for doc in ranking[:k] if relevant.get(doc, 0) > 0}
    return len(found) / len(relevant)


def reciprocal_rank(ranking: Sequence[str], relevant: Mapping[str, float], k: int = CUTOFF) -> float:
    """1 / the rank (from 1) of the first relevant id within the first `k`, else 0."""
    for rank, doc in enumerate(ranking[:k], start=1):
        if relevant.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def dcg(grades: Iterable[float]) -> float:
    """Discounted cumulative gain of grades in rank order: sum of grade / log2(rank + 1), ranks from 1."""
    return sum(grade / math.log2(rank + 1) for rank, grade in enumerate(grades, start=1))


def ndcg_at(ranking: Sequence[str], relevant: Mapping[str, float], k: int = CUTOFF) -> float:
    """DCG of the first `k` of `ranking` over the DCG of the ideal ranking (linear gain), in [0, 1]."""
    ideal = dcg(sorted((g for g in relevant.values() if g > 0), reverse=True)[:k])
    if ideal == 0:
        raise ValueError("a query needs at least one relevant id with a grade above 0")
    seen: set[str] = set()
    grades = []
    for doc in ranking[:k]:  # a repeated id earns nothing the second time
        grades.append(relevant.get(doc, 0) if doc not in seen else 0)
        seen.add(doc)
    return dcg(grades) / ideal


def query_metrics(ranking: Sequence[str], relevant: Mapping[str, float]) -> dict[str, float]:
    """Every metric of `METRICS` for one query."""
    out = {f"recall@{k}": recall_at(ranking, relevant, k) for k in RECALL_KS}
    out["mrr@10"] = reciprocal_rank(ranking, relevant, CUTOFF)
    out["ndcg@10"] = ndcg_at(ranking, relevant, CUTOFF)
    return out


def mean_metrics(per_query: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over the queries (each query weighs the same)."""
    if not per_query:
        raise ValueError("no queries to average")
    return {name: sum(q[name] for q in per_query) / len(per_query) for name in METRICS}


def score_rankings(
    rankings: Mapping[str, Sequence[str]], queries: Sequence[LabelledQuery]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(mean metrics, per-query metrics in the order of `queries`) for each query's ranking by query id."""
    per_query = [query_metrics(rankings[q.id], q.relevant) for q in queries]
    return mean_metrics(per_query), per_query


def random_baseline(
    corpus_ids: Sequence[str], queries: Sequence[LabelledQuery], seeds: Iterable[int] = range(20)
) -> dict[str, float]:
    """What a ranking that shuffles the whole corpus scores, averaged over `seeds` (each seed shuffles
    every query's ranking independently): the floor a model has to rise above."""
    seeds = list(seeds)
    runs = []
    for seed in seeds:
        rng = random.Random(seed)
        rankings = {}
        for query in queries:
            ranking = list(corpus_ids)
            rng.shuffle(ranking)
            rankings[query.id] = ranking[:CUTOFF]
        runs.append(score_rankings(rankings, queries)[0])
    return {name: sum(run[name] for run in runs) / len(runs) for name in METRICS}


# -- labelled query files ----------------------------------------------------------------------------------


def parse_relevant(value: Any, where: str) -> dict[str, float]:
    """`relevant` as {id: grade}: a list of ids (grade 1 each) or a mapping of id to a grade > 0."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise QuerySetError(f"{where}: 'relevant' must be a non-empty list of ids (strings)")
        return dict.fromkeys(value, 1.0)
    if isinstance(value, dict):
        out = {}
        for doc, grade in value.items():
            if isinstance(grade, bool) or not isinstance(grade, int | float) or not grade > 0:
                raise QuerySetError(f"{where}: the grade of {doc!r} must be a number above 0, got {grade!r}")
            out[str(doc)] = float(grade)
        if not out:
            raise QuerySetError(f"{where}: 'relevant' names no ids")
        return out
    raise QuerySetError(f"{where}: 'relevant' must be a list of ids or an {{id: grade}} object")


def read_queries(path: str | Path) -> list[LabelledQuery]:
    """The labelled queries of a JSONL file: one object a line with `id`, `text` and/or `image` (a path,
    relative to the file) and `relevant`. A bad line is a `QuerySetError` naming it: an evaluation with a
    query quietly left out would not be comparable with another."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuerySetError(f"cannot read the queries {path}: {exc}") from exc
    queries: list[LabelledQuery] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuerySetError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise QuerySetError(f"{where}: expected a JSON object")
        query_id = row.get("id")
        if not isinstance(query_id, str | int) or isinstance(query_id, bool) or str(query_id) == "":
            raise QuerySetError(f"{where}: every query needs an 'id'")
        query_id = str(query_id)
        if query_id in seen:
            raise QuerySetError(f"{where}: the id {query_id!r} is used twice")
        seen.add(query_id)
        text, image = row.get("text"), row.get("image")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise QuerySetError(f"{where}: 'text' must be a non-blank string")
        if image is not None and not isinstance(image, str):
            raise QuerySetError(f"{where}: 'image' must be a file path")
        if text is None and image is None:
            raise QuerySetError(f"{where}: a query needs a 'text' and/or an 'image'")
        if "relevant" not in row:
            raise QuerySetError(f"{where}: the query has no 'relevant' ids")
        if image is not None and not Path(image).is_absolute():
            image = str(path.parent / image)
        extra = {k: v for k, v in row.items() if k not in ("id", "text", "image", "relevant")}
        queries.append(LabelledQuery(query_id, parse_relevant(row["relevant"], where), text, image, extra))
    if not queries:
        raise QuerySetError(f"{path}: no queries")
    return queries
