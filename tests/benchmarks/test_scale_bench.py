"""The scale benchmark generates its corpus deterministically, and on a tiny corpus prints a table with a full and
a resume pass whose figures add up (a local.sh cluster of one node pinned to core 0, the stand-in embedder)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from benchmarks.scale_bench import (
    COLUMNS,
    IMAGE_EVERY,
    MAX_WORDS,
    MIN_WORDS,
    corpus_rows,
    ensure_corpus,
    first_embedded,
    main,
    process_label,
    vocabulary,
)


def test_the_corpus_is_the_same_every_time_with_one_image_row_in_a_hundred():
    words = vocabulary()
    rows = corpus_rows(0, 1000, seed=3, words=words)
    assert rows == corpus_rows(0, 1000, seed=3, words=words)
    assert rows != corpus_rows(0, 1000, seed=4, words=words)
    assert rows["id"][:2] == ["r000000000", "r000000001"] and len(set(rows["id"])) == 1000
    images = [i for i, image in enumerate(rows["image"]) if image is not None]
    assert len(images) == 1000 // IMAGE_EVERY and all(rows["text"][i] is None for i in images)
    texts = [t for t in rows["text"] if t is not None]
    assert all(MIN_WORDS <= len(t.split()) <= MAX_WORDS for t in texts)


def test_a_cached_corpus_is_reused_and_a_different_one_is_made_again(tmp_path):
    folder = ensure_corpus(tmp_path / "c", rows=250, rows_per_file=100, seed=0, log=lambda _: None)
    parts = sorted(folder.glob("part-*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [100, 100, 50]
    assert len(list((folder / "images").glob("*.png"))) == 16
    stamp = parts[0].stat().st_mtime_ns
    ensure_corpus(tmp_path / "c", rows=250, rows_per_file=100, seed=0, log=lambda _: None)
    assert parts[0].stat().st_mtime_ns == stamp
    ensure_corpus(tmp_path / "c", rows=120, rows_per_file=100, seed=0, log=lambda _: None)
    assert sum(pq.read_metadata(p).num_rows for p in folder.glob("part-*.parquet")) == 120


def test_the_first_embedded_batch_is_the_earliest_trace_line_of_the_pass(tmp_path):
    (tmp_path / "1.trace").write_text("100.0 5\n205.5 7\n")
    (tmp_path / "2.trace").write_text("201.0 3\nnot a line\n")
    assert first_embedded(tmp_path, since=200.0) == (201.0, 10)
    assert first_embedded(tmp_path, since=300.0) == (None, 0)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(1800)  # a loaded machine may need several tries to start the cluster
def test_a_process_is_named_by_its_ray_task_its_python_script_or_its_program():
    assert process_label(["ray::MapBatches(prepare_batch)", ""]) == "MapBatches(prepare_batch)"
    assert process_label(["ray::IDLE"]) == "IDLE"
    assert (
        process_label(["/usr/bin/python3.11", "-u", "/x/ray/dashboard/dashboard.py", "--port=1"])
        == "dashboard.py"
    )
    assert process_label(["/x/ray/core/src/ray/raylet/raylet", "--node=1"]) == "raylet"


def test_a_tiny_run_prints_a_full_and_a_resume_pass_with_sane_figures(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = [
        "--rows",
        "300",
        "--nodes",
        "1",
        "--new-rows",
        "40",
        "--workdir",
        str(tmp_path / "w"),
        "--pin-cores",
        "--rows-per-file",
        "100",
        "--commit-rows",
        "100",  # three units of 100 rows, each its own group: three commits of rows timed in the full pass
    ]
    argv += ["--cluster-dir", f"/tmp/vsbt{tmp_path.name[-6:]}", "--json", str(out)]
    assert main(argv) == 0
    full, resume = json.loads(out.read_text())
    assert (full["pass"], resume["pass"]) == ("full", "resume")
    assert full["embedded"] + full["errored"] == 300 and full["skipped"] == 0 and full["errored"] == 0
    assert resume["embedded"] == 40 and resume["skipped"] == 300 and resume["vectors_in_table"] == 340
    assert len(full["commit_s"]) == 3 and len(resume["commit_s"]) == 1
    for result in (full, resume):
        assert result["commit_s"] == sorted(result["commit_s"]) and result["commit_s"][0] > 0
        assert result["commit_s"][-1] <= result["seconds"] + 0.1
        assert result["code"]["driver"] == result["code"]["worker"]  # both ran the tree being measured
        assert result["traced_rows"] == result["embedded"]  # the stand-in embedded each row once
        assert 0 < result["first_row_s"] < result["seconds"]
        assert result["commits"] >= 1
        assert 50 < result["driver_peak_mib"] < 4096 and 50 < result["worker_peak_mib"] < 4096
        phases = result["driver_rss_mib"]
        assert 50 < phases["start"] <= phases["commits"] <= result["driver_peak_mib"] + 1
        # its own heap, mapped files and the object store's pages it touched: each at most the whole RSS
        assert 30 < phases["peak_anon"] <= result["driver_peak_mib"] + 1 and phases["peak_file"] > 1
        assert 0 <= phases["peak_shmem"] <= result["driver_peak_mib"] + 1
        assert result["window_wait_s"] >= 0 and all(seconds >= 0 for seconds in result["stages"].values())
        cpu = result[
            "cluster_cpu_s"
        ]  # one node's processes' CPU, most of it in the prepare tasks and workers
        assert len(cpu["by_node"]) == 1 and 0 < sum(cpu["by_what"].values()) <= cpu["by_node"][0] + 0.1
        assert any("prepare_batch" in what for what in cpu["by_what"])
        # the node runs on one core: no more CPU than the pass' time (and its process' start), so nothing
        # used before the pass (the full pass, for the resume) is counted in it
        assert cpu["by_node"][0] < result["seconds"] + 15
        assert 0 < result["driver_cpu_s"] < 2 * result["seconds"] + 60
        assert result["code"]["driver_cores"] == result["code"]["worker_cores"] == [0]  # one node: core 0
        assert any("EmbedClient" in name for name in result["stages"])
        assert any("prepare_batch" in name for name in result["stages"])
    printed = capsys.readouterr().out
    assert "driver RSS MiB:" in printed and "commits at s:" in printed and "peaks by kind: anon" in printed
    assert "; CPU s: node 0 " in printed and "by what ran: " in printed
    header = printed.splitlines()[0]
    assert all(f" {column} |" in header for column in COLUMNS)
    row = next(line for line in printed.splitlines() if line.startswith("| current | 300 | 1 | full |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[COLUMNS.index("rows/s")]) == pytest.approx(300 / full["seconds"], abs=1)
    assert "busy:" in printed
