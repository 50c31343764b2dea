"""What an index update has to do: the folder's files against the previous catalog, compared in SQLite.

    >>> with folder_changes(paths, previous_catalog, index_dir / ".changes.sqlite") as changes:
    ...     changes.unchanged_ids, changes.to_embed, changes.changed, changes.removed
    ...     write_catalog(staging / "catalog.sqlite", new_entries, kept=changes)

Each file's size and modification time go to a table on disk as they are read, and the
comparison with the previous catalog is a join; the unchanged rows go from the old catalog to
the new one inside SQLite. So an update of ten million files holds no entry of either side in
Python: the dicts it used to build took ~5.5 GB a 10M-row catalog (bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

#: Scanned files written to the table per statement.
_SCAN_ROWS = 50_000

#: A previous row stays as it is when its file has the size and time it recorded, and every value
#: has its column's type (a row of another type, from a damaged or foreign catalog, is re-embedded).
_UNCHANGED = """COALESCE(o.size = s.size AND o.mtime_ns = s.mtime_ns AND typeof(o.size) = 'integer'
    AND typeof(o.mtime_ns) = 'integer' AND typeof(o.label) = 'text' AND typeof(o.digest) = 'text', 0)"""


def sqlite_uri(path: Path, read_only: bool = False) -> str:
    """``path`` as an SQLite URI (percent-encoded: a folder named ``a#b?c`` stays that folder)."""
    return Path(path).resolve().as_uri() + ("?mode=ro" if read_only else "")


@dataclass
class FolderChanges:
    """A folder scanned against the previous catalog (None: nothing to keep)."""

    database: Path
    previous: Path | None
    unchanged_ids: np.ndarray      # previous ids whose files are as they were, ascending
    to_embed: list[Path]           # new or changed files, in the folder's order
    sizes: np.ndarray              # of to_embed, as read by the scan
    mtimes_ns: np.ndarray
    was_indexed: np.ndarray        # of to_embed: True for a changed file, False for a new one
    removed: int
    failures: list[tuple[str, str]]

    @property
    def unchanged(self) -> int:
        return len(self.unchanged_ids)

    @property
    def changed(self) -> int:
        return int(self.was_indexed.sum())

    def copy_unchanged_into(self, connection: sqlite3.Connection) -> None:
        """Insert the unchanged rows of the previous catalog into ``connection``'s ``images``."""
        if self.previous is None:
            return
        connection.execute("ATTACH DATABASE ? AS changes", (sqlite_uri(self.database, read_only=True),))
        connection.execute("ATTACH DATABASE ? AS old", (sqlite_uri(self.previous, read_only=True),))
        connection.execute(f"INSERT INTO main.images SELECT o.id, o.path, o.size, o.mtime_ns, o.label, o.digest "
                           f"FROM changes.scan s JOIN old.images o ON o.path = s.path WHERE {_UNCHANGED}")
        connection.commit()
        connection.execute("DETACH DATABASE old")
        connection.execute("DETACH DATABASE changes")


@contextlib.contextmanager
def folder_changes(paths: Sequence[Path], previous: Path | None, database: Path) -> Iterator[FolderChanges]:
    """The changes from the catalog ``previous`` to the files ``paths``, worked out in ``database``
    (a file inside the index folder, removed afterwards). Files that cannot be read are failures."""
    database.unlink(missing_ok=True)
    connection = sqlite3.connect(sqlite_uri(database), uri=True)
    try:
        connection.execute("PRAGMA journal_mode = OFF")   # a scratch file: nothing to recover
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("CREATE TABLE scan (position INTEGER PRIMARY KEY, path TEXT NOT NULL, "
                           "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL)")
        failures: list[tuple[str, str]] = []
        for start in range(0, len(paths), _SCAN_ROWS):
            connection.executemany("INSERT INTO scan VALUES (?, ?, ?, ?)",
                                   _stat_rows(paths, start, min(start + _SCAN_ROWS, len(paths)), failures))
        connection.commit()
        if previous is None:
            unchanged_ids = np.zeros(0, np.int64)
            rows = connection.execute("SELECT position, size, mtime_ns, 0 FROM scan ORDER BY position")
            removed = 0
        else:
            connection.execute("ATTACH DATABASE ? AS old", (sqlite_uri(previous, read_only=True),))
            unchanged_ids = np.fromiter(
                (row[0] for row in connection.execute(
                    f"SELECT o.id FROM scan s JOIN old.images o ON o.path = s.path WHERE {_UNCHANGED} ORDER BY o.id")),
                dtype=np.int64)
            rows = connection.execute(
                f"SELECT s.position, s.size, s.mtime_ns, o.id IS NOT NULL FROM scan s "
                f"LEFT JOIN old.images o ON o.path = s.path WHERE o.id IS NULL OR NOT {_UNCHANGED} ORDER BY s.position")
        blocks = []
        while block := rows.fetchmany(_SCAN_ROWS):
            blocks.append(np.array(block, dtype=np.int64))
        embed = np.concatenate(blocks) if blocks else np.zeros((0, 4), np.int64)
        if previous is not None:
            (count,) = connection.execute("SELECT COUNT(*) FROM old.images").fetchone()
            removed = count - len(unchanged_ids) - int(embed[:, 3].sum())
            connection.execute("DETACH DATABASE old")
        yield FolderChanges(database, previous, unchanged_ids, [paths[int(position)] for position in embed[:, 0]],
                            embed[:, 1].copy(), embed[:, 2].copy(), embed[:, 3].astype(bool), removed, failures)
    finally:
        connection.close()
        database.unlink(missing_ok=True)


def _stat_rows(paths: Sequence[Path], start: int, stop: int,
               failures: list[tuple[str, str]]) -> Iterator[tuple[int, str, int, int]]:
    """Size and mtime of each file; dangling and looping links are listed as failures, not fatal."""
    for position in range(start, stop):
        try:
            stat = os.stat(paths[position])
        except OSError as error:
            failures.append((str(paths[position]), f"cannot open ({error.strerror or error})"))
            continue
        yield position, str(paths[position]), stat.st_size, stat.st_mtime_ns
