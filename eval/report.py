"""Results on disk: the per-row cache that makes sweeps resumable, and the CSV / JSON / Markdown / PNG reports.

Every write is atomic (a temporary file in the same folder, then `os.replace`), so a killed sweep leaves either
a finished row or nothing, never half a file.
"""

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, data: str | bytes):
    """Write `data` to `path` through a temporary file and `os.replace`; the file gets the permissions a plain
    `open(path, "w")` gives (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_savefig(figure, path):
    """Save a matplotlib figure as PNG atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buffer.getvalue())


class RowCache:
    """One JSON file per finished row under `directory`, named by a hash of everything the row depends on."""

    def __init__(self, directory):
        self.directory = Path(directory)

    @staticmethod
    def key(**fields) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str) -> dict | None:
        path = self.directory / f"{key}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # not ours (atomic writes never leave half a row): recompute it
            return None

    def put(self, key: str, row: dict):
        atomic_write(self.directory / f"{key}.json", json.dumps(row))


class MemoryCache(RowCache):
    """The same interface, in memory: for sweeps run without a results folder."""

    def __init__(self):
        self.rows = {}

    def get(self, key):
        return self.rows.get(key)

    def put(self, key, row):
        self.rows[key] = row


def write_csv(path, rows, columns):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def write_json(path, payload):
    atomic_write(path, json.dumps(payload, indent=1, default=str) + "\n")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return "" if value is None else str(value)


class Table(NamedTuple):
    """A table of a report: its Markdown section title, header and body (rows of cells)."""

    title: str
    header: list
    body: list
    caption: str | None = None  # the heading printed on the terminal, where it differs from `title`


def markdown_table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines)


def text_table(header: list[str], body: list[list]) -> str:
    cells = [header] + [[fmt(v) for v in row] for row in body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def pivot(rows, row_key, column_key, cell) -> tuple[list, list, list[list]]:
    """(row labels, column labels, cells) of `cell(row)` arranged by `row_key` × `column_key`, in first-seen order."""
    row_labels = list(dict.fromkeys(r[row_key] for r in rows))
    column_labels = list(dict.fromkeys(r[column_key] for r in rows))
    table = {(r[row_key], r[column_key]): cell(r) for r in rows}
    return row_labels, column_labels, [[table.get((a, b), "–") for b in column_labels] for a in row_labels]


def protocol_markdown(protocol: dict) -> str:
    return "\n".join(f"- **{key}**: {fmt(value) if not isinstance(value, dict) else json.dumps(value)}"
                     for key, value in protocol.items())
