"""What each commit of a LanceDB table did: the rows every version added (negative for a delete)."""

from __future__ import annotations


def rows_added_per_version(db, name: str) -> list[int]:
    table = db.open_table(name)
    counts = []
    for version in sorted(v["version"] for v in table.list_versions()):
        past = db.open_table(name)
        past.checkout(version)
        counts.append(past.count_rows())
    return [after - before for before, after in zip([0, *counts], counts, strict=False)]
