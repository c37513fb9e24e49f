"""Property: whatever mix of good and bad rows the sources hold, every row is accounted for, exactly once.

Hypothesis draws rows for all four source kinds at once (JSONL, CSV, Parquet, an image folder): texts of any
script, pairs, image bytes, and every kind of bad row each kind can carry (blank or missing text, a number for
a text, a line that is not JSON or not UTF-8, a CSV row with the wrong field count, corrupt, truncated, empty or
missing images, exact repeats). One backfill per example on the session's Ray, then a rerun, must give:

- `read = embedded + skipped + errored`, `read` being every row written and `skipped` the repeats;
- each good row's id in the vectors table, each bad row's in the errors table, no id in both or twice;
- a rerun that skips them all and writes nothing.

Each example runs the real pipeline twice, so there are two: one with every kind of row in every source, and
one drawn (up to 8 rows a source); a failing example is reported as drawn, not shrunk, for the same reason.
Raise `max_examples` locally to search harder.
"""

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from pipelines.backfill import run_backfill
from pipelines.config import Config, EmbedderConfig, ResourcesConfig, SourceConfig, TableConfig
from pipelines.sink import table_ids
from pipelines.table import connect
from tests.conftest import image_bytes

TEXTS = st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=30)
KINDS = {
    "jsonl": [
        "text",
        "pair",
        "image",
        "no_text",
        "number",
        "not_json",
        "not_utf8",
        "missing_image",
        "repeat",
    ],
    "csv": ["text", "pair", "no_text", "not_utf8", "fields", "missing_image", "repeat"],
    "parquet": ["text", "pair", "image", "corrupt_image", "no_text", "repeat"],
    "images": ["png", "jpeg", "truncated", "not_image", "empty"],
}


ARGUMENTS = {"jsonl": "jsonl", "csv_rows": "csv", "parquet": "parquet", "images": "images"}
EVERY_KIND = {
    source: [(kind, text) for kind in kinds for text in ("a text", " \t")] for source, kinds in KINDS.items()
}


def rows_of(kind: str):
    return st.lists(st.tuples(st.sampled_from(KINDS[kind]), TEXTS), min_size=1, max_size=8)


@dataclass
class Expected:
    good: set = field(default_factory=set)
    bad: set = field(default_factory=set)
    anonymous: int = 0  # bad rows without an id of their own (their id is the hash of their bytes)
    read: int = 0
    repeats: int = 0

    def row(self, row_id: str | None, good: bool) -> None:
        self.read += 1
        if row_id is None:
            self.anonymous += 1
        else:
            (self.good if good else self.bad).add(row_id)


def fits(text: str) -> bool:
    return bool(text.strip())


def write_jsonl(root, rows, expected: Expected) -> SourceConfig:
    lines: list[bytes] = [json.dumps({"id": "jsonl-anchor", "text": "a text"}).encode()]  # columns to find
    expected.row("jsonl-anchor", True)
    for i, (kind, text) in enumerate(rows):
        row_id = f"jsonl-{i}"
        if kind == "repeat":
            lines.append(lines[-1])
            expected.read += 1
            expected.repeats += 1
            continue
        record = {
            "text": {"id": row_id, "text": text},
            "pair": {"id": row_id, "text": f"caption {text}", "image": "pic.png"},
            "image": {"id": row_id, "image": "pic.png"},
            "no_text": {"id": row_id},
            "number": {"id": row_id, "text": len(text)},
            "missing_image": {"id": row_id, "text": f"caption {text}", "image": f"gone-{i}.png"},
        }.get(kind)
        if record is not None:
            lines.append(json.dumps(record).encode())
            expected.row(row_id, kind in ("pair", "image") or (kind == "text" and fits(text)))
        elif kind == "not_json":
            lines.append(f'{{"id": "{row_id}", "text": @'.encode() + text.encode())  # never JSON
            expected.row(None, False)
        else:  # not_utf8
            lines.append(f'{{"id": "{row_id}", "text": "caf'.encode() + b'\xe9"}')
            expected.row(row_id, False)
    (root / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return SourceConfig(kind="jsonl", path=str(root / "rows.jsonl"), name="jsonl", id_column="id")


def write_csv(root, rows, expected: Expected) -> SourceConfig:
    import csv
    import io

    def line(*fields) -> bytes:
        out = io.StringIO()
        csv.writer(out).writerow(fields)
        return out.getvalue().encode()

    lines = [line("id", "text", "image")]
    for i, (kind, text) in enumerate(rows):
        row_id = f"csv-{i}"
        if kind == "repeat" and len(lines) > 1:
            lines.append(lines[-1])
            expected.read += 1
            expected.repeats += 1
        elif kind in ("text", "repeat"):
            lines.append(line(row_id, text, ""))
            expected.row(row_id, fits(text))  # an empty field is no text at all: a bad row too
        elif kind == "pair":
            lines.append(line(row_id, f"caption {text}", "pic.png"))
            expected.row(row_id, True)
        elif kind == "no_text":
            lines.append(line(row_id, "", ""))
            expected.row(row_id, False)
        elif kind == "missing_image":
            lines.append(line(row_id, f"caption {text}", f"gone-{i}.png"))
            expected.row(row_id, False)
        elif kind == "fields":
            lines.append(line(row_id, text, "pic.png", "one too many"))
            expected.row(None, False)
        else:  # not_utf8
            lines.append(row_id.encode() + b",caf\xe9,\r\n")
            expected.row(row_id, False)
    (root / "rows.csv").write_bytes(b"".join(lines))
    return SourceConfig(kind="csv", path=str(root / "rows.csv"), name="csv", id_column="id")


def write_parquet(root, rows, expected: Expected) -> SourceConfig:
    records: list[dict] = []
    picture = image_bytes(11, (40, 30))
    for i, (kind, text) in enumerate(rows):
        row_id = f"parquet-{i}"
        if kind == "repeat" and records:
            records.append(dict(records[-1]))
            expected.read += 1
            expected.repeats += 1
            continue
        record = {
            "text": (text, None),
            "repeat": (text, None),
            "pair": (f"caption {text}", picture),
            "image": (None, picture),
            "corrupt_image": (None, b"\x89PNG\r\n\x1a\n" + text.encode()),
            "no_text": (None, None),
        }[kind]
        records.append({"id": row_id, "text": record[0], "image": record[1]})
        expected.row(row_id, kind in ("pair", "image") or (kind in ("text", "repeat") and fits(text)))
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.binary())])
    pq.write_table(pa.Table.from_pylist(records, schema=schema), root / "rows.parquet")
    return SourceConfig(kind="parquet", path=str(root / "rows.parquet"), name="parquet", id_column="id")


def write_images(root, rows, expected: Expected) -> SourceConfig:
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for i, (kind, _) in enumerate(rows):
        name = f"sub/{i}.jpg" if kind == "jpeg" else f"{i}.png"
        whole = image_bytes(i, (32 + i, 24))
        data = {
            "png": whole,
            "jpeg": image_bytes(i, (24, 32 + i), "JPEG"),
            "truncated": whole[: len(whole) // 2],
            "not_image": b"some notes, not an image",
            "empty": b"",
        }[kind]
        (folder / name).write_bytes(data)
        expected.row(name, kind in ("png", "jpeg"))
    return SourceConfig(kind="images", path=str(folder), name="images")


@settings(
    max_examples=1,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each step would be two more pipeline runs
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(jsonl=rows_of("jsonl"), csv_rows=rows_of("csv"), parquet=rows_of("parquet"), images=rows_of("images"))
@example(**{name: EVERY_KIND[kind] for name, kind in ARGUMENTS.items()})  # every kind of row, each run
def test_every_row_of_any_mix_ends_in_exactly_one_table_also_after_a_rerun(
    tmp_path_factory, tiny_model_dir, ray_session, jsonl, csv_rows, parquet, images
):
    root = tmp_path_factory.mktemp("mix")
    (root / "pic.png").write_bytes(image_bytes(3, (36, 28)))
    expected = Expected()
    sources = [
        write_jsonl(root, jsonl, expected),
        write_csv(root, csv_rows, expected),
        write_parquet(root, parquet, expected),
        write_images(root, images, expected),
    ]
    config = Config(
        embedder=EmbedderConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"),
        sources=sources,
        table=TableConfig(uri=str(root / "db"), commit_rows=4),
        resources=ResourcesConfig(batch_rows=8, prepare_batch_rows=8),
    )
    summary = run_backfill(config)
    assert summary.adds_up and summary.read == expected.read
    assert summary.duplicates == expected.repeats and summary.already_done == 0
    db = connect(config.table)
    vectors = db.open_table("vectors").search().select(["id"]).limit(None).to_arrow()["id"].to_pylist()
    errors = db.open_table("errors").search().select(["id"]).limit(None).to_arrow()["id"].to_pylist()
    assert len(vectors) == len(set(vectors)) and len(errors) == len(set(errors))
    assert not set(vectors) & set(errors)
    assert expected.good <= set(vectors) and expected.bad <= set(errors)
    assert len(vectors) == len(expected.good)
    assert len(errors) == len(expected.bad) + expected.anonymous

    again = run_backfill(config)
    assert again.adds_up and again.read == expected.read
    assert (again.embedded, again.errored) == (0, 0)
    # committed units are skipped unread
    assert (again.units_skipped, again.already_done) == (again.units, expected.read)
    assert table_ids(db.open_table("vectors")) == set(vectors)
