"""The reranker benchmark runs end to end on the tiny model on the CPU and reports every pass."""

import json

from benchmarks.rerank_bench import main


def test_every_pass_of_every_variant_is_reported_and_scores_match_the_official_loop(tmp_path, capsys):
    out = tmp_path / "rerank.json"
    assert main(["--pairs", "6", "--passes", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    for workload in ("text", "image"):
        mine = [r for r in rows if r["workload"] == workload]
        assert [r["recipe"] for r in mine] == ["official (one pair at a time)"] + ["padded"] * 2 + [
            "packed"
        ] * 2
        assert all(r["pairs_per_s"] > 0 and r["pairs"] == 6 for r in mine)
        assert all(r["max_score_diff"] <= 1e-5 for r in mine[1:])  # the same scores as the official loop
        assert all(r["ratio"] > 0 for r in mine[1:])
    printed = capsys.readouterr().out
    assert printed.count("\n tiny ") >= 10 and "median" in printed
