"""The backfill benchmark mode runs the mixed corpus through Ray Data into LanceDB and compares it to the bare
embedder on the same rows."""

import json

import pytest

from benchmarks.backfill_bench import format_result, main, steady_state, write_corpus


def test_the_corpus_is_written_as_a_real_job_reads_it(tmp_path):
    text_path, image_dir, items = write_corpus(tmp_path, texts=5, images=2, side=64)
    rows = [json.loads(line) for line in text_path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"t{i}" for i in range(5)]
    assert all(8 <= len(row["text"].split()) <= 512 for row in rows)
    assert sorted(p.name for p in image_dir.iterdir()) == ["00000.png", "00001.png"]
    assert items[:5] == [row["text"] for row in rows] and items[5] == {"image": str(image_dir / "00000.png")}


def test_the_steady_rate_leaves_out_the_first_batch_and_its_start_up():
    arrivals = [(10.0, 100), (11.0, 50), (13.0, 150)]  # 20 s of start-up before the first batch is not seen
    steady = steady_state(arrivals)
    assert steady["rows_per_s"] == pytest.approx(200 / 3.0) and steady["batches"] == 3
    assert steady_state(arrivals[:1]) is None


@pytest.mark.slow
def test_the_backfill_mode_embeds_every_row_and_reports_rows_per_second(tmp_path, ray_session, capsys):
    out = tmp_path / "result.json"
    code = main(
        [
            "--texts",
            "6",
            "--images",
            "1",
            "--packed",
            "--batch-rows",
            "2",
            "--commit-rows",
            "3",  # two groups (the texts' unit, the images'): two commits for the steady rate
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["rows"] == 7 and result["options"]["attention_layout"] == "packed"
    assert result["backfill"]["embedded"] == 7 and result["backfill"]["vectors_in_table"] == 7
    for name in ("bare_forward", "bare_end_to_end", "backfill"):
        assert result[name]["rows_per_s"] == pytest.approx(7 / result[name]["seconds"])
    assert result["backfill_over_bare_forward"] == pytest.approx(
        result["backfill"]["rows_per_s"] / result["bare_forward"]["rows_per_s"]
    )
    assert result["backfill_steady"]["batches"] >= 2
    assert result["steady_over_bare_forward"] == pytest.approx(
        result["backfill_steady"]["rows_per_s"] / result["bare_forward"]["rows_per_s"]
    )
    printed = capsys.readouterr().out
    assert format_result(result) in printed and "target >= 90%" in printed
    start = result["backfill"]["start_up"]
    assert start["ready_s"] <= start["first_batch_s"] <= result["backfill"]["seconds"]
    assert f"the first embedding worker was ready {start['ready_s']:.1f} s into the run" in printed
