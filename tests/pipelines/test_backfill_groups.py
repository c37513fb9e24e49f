"""One Ray Data execution per run: groups of units commit while later ones are still being written, and an id
repeated across groups, in flight together or one already committed, is written once."""

import json
import logging
import re

from pipelines.backfill import WINDOW_GROUPS, run_backfill
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.table import connect

AHEAD = re.compile(r"read (\d+) unit\(s\) ahead of the window")
COMMIT = re.compile(r"committed group (\d+) of (\d+): .*; (\d+) more group\(s\) under way\)")


def corpus() -> tuple[list[dict], int]:
    """400 texts in ~10 units, with ids repeated in the next unit (~60 rows on: likely in flight together)
    and at the end (long after their group committed). Returns the rows and the number of repeats."""
    rows = [{"id": f"doc-{i:04d}", "text": f"document number {i} " + "word " * (i % 30)} for i in range(400)]
    near = [dict(rows[i]) for i in range(0, 400, 10)]
    far = [dict(rows[i]) for i in range(5, 100, 10)]
    mixed = []
    for i, row in enumerate(rows):
        mixed.append(row)
        if i >= 60 and i % 10 == 0:
            mixed.append(near[(i - 60) // 10])
    return mixed + far, len(mixed) - len(rows) + len(far)


def test_groups_commit_while_later_ones_are_written_and_repeats_across_them_are_written_once(
    tmp_path, tiny_model_dir, ray_session, caplog
):
    rows, repeats = corpus()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"),
        sources=[SourceConfig(kind="jsonl", path=str(path), id_column="id")],
        table=TableConfig(uri=str(tmp_path / "db"), commit_rows=50, unit_bytes=4096),  # a group per unit
        resources=ResourcesConfig(batch_rows=32, prepare_batch_rows=32),
    )
    with caplog.at_level(logging.INFO, logger="pipelines.backfill"):
        summary = run_backfill(config)
    messages = [r.getMessage() for r in caplog.records]
    commits = [tuple(map(int, m.groups())) for message in messages if (m := COMMIT.search(message))]
    escapes = sum(int(m.group(1)) for message in messages if (m := AHEAD.search(message)))
    assert len(commits) == commits[0][1] >= 8, commits  # each group committed once
    assert sorted(c[0] for c in commits) == list(range(1, len(commits) + 1))
    assert max(c[2] for c in commits) >= 1, f"no group was committed while another was under way: {commits}"
    # the read-ahead window: the later units are read (and claim their ids) after the earlier groups commit,
    # so the repeats at the end meet released claims; without it all ~10 units are read before any commit
    under_way = max(c[2] for c in commits)
    assert under_way <= WINDOW_GROUPS + escapes, f"{under_way} groups under way at once, {escapes} escapes"
    assert summary.adds_up and summary.read == len(rows)
    assert (summary.duplicates, summary.embedded) == (repeats, 400)
    ids = connect(config.table).open_table("vectors").to_arrow()["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 400
