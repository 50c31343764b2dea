"""An index generation's catalog (``catalog.sqlite``): what file each vector id stands for.

    >>> write_catalog(staging / "catalog.sqlite", entries)
    >>> catalog = Catalog(generation / "catalog.sqlite")
    >>> catalog[17].path, catalog.get(18), len(catalog)

A catalog is read on demand, a row at a time or a few hundred at once: a search needs the rows
of its hits, not the other ten million (reading them all into Python took 55 s and 5.5 GB at
10M images, bench/RESULTS.md). Every row is checked against its column types when read: the file
may have come from someone else.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from simsiam_embed.errors import UserError
from simsiam_embed.index.changes import sqlite_uri

if TYPE_CHECKING:
    from simsiam_embed.index.changes import FolderChanges


@dataclass(frozen=True)
class CatalogEntry:
    id: int
    path: str
    size: int
    mtime_ns: int
    label: str
    digest: str


_COLUMNS = "id, path, size, mtime_ns, label, digest"
_TYPES = (int, str, int, int, str, str)
#: Rows a query asks for at once: under SQLite's limit of bound parameters (999 in old builds).
_ROWS_PER_QUERY = 900


def write_catalog(path: Path, entries: Iterable[CatalogEntry], kept: FolderChanges | None = None) -> None:
    """A new catalog of ``entries`` and, with ``kept``, the previous catalog's unchanged rows
    (copied inside SQLite: see index/changes.py)."""
    connection = sqlite3.connect(sqlite_uri(path), uri=True)
    try:
        connection.execute(
            "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL, "
            "mtime_ns INTEGER NOT NULL, label TEXT NOT NULL, digest TEXT NOT NULL)"
        )
        if kept is not None:
            kept.copy_unchanged_into(connection)
        connection.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
            ((e.id, e.path, e.size, e.mtime_ns, e.label, e.digest) for e in entries),
        )
        connection.commit()
    finally:
        connection.close()


class Catalog:
    """A generation's catalog, read-only, looked up by id like a ``dict[int, CatalogEntry]``.

    One connection, opened now and kept: the generation's folder may be removed two updates
    later while a server still answers from it, and an open file outlives its name. Threads
    share it under a lock (a server answers requests and runs analyses at once).
    """

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(sqlite_uri(path, read_only=True), uri=True, check_same_thread=False)
        self._count: int | None = None
        try:
            self.id_range()   # a file that is no catalog fails here, not at the first lookup
        except sqlite3.Error:
            self._connection.close()
            raise

    def __len__(self) -> int:
        if self._count is None:   # SQLite counts by reading every page: 0.7 s at 10M rows
            with self._lock:
                (self._count,) = self._connection.execute("SELECT COUNT(*) FROM images").fetchone()
        return self._count

    def id_range(self) -> tuple[int, int] | None:
        """The smallest and largest id (None when empty): two lookups in the id order, whatever the size."""
        # Two statements: SQLite answers a lone MIN or MAX from the id order, but both in one
        # statement by reading every row (1.3 s at 10M).
        with self._lock:
            low = self._connection.execute("SELECT MIN(id) FROM images").fetchone()[0]
            high = self._connection.execute("SELECT MAX(id) FROM images").fetchone()[0]
        return None if low is None else (low, high)

    def ids(self) -> np.ndarray:
        """Every id, ascending: an update checks them against its vectors' before keeping any."""
        with self._lock:
            return np.fromiter((row[0] for row in self._connection.execute("SELECT id FROM images ORDER BY id")),
                               dtype=np.int64)

    def get(self, image_id: int, default: CatalogEntry | None = None) -> CatalogEntry | None:
        with self._lock:
            row = self._connection.execute(f"SELECT {_COLUMNS} FROM images WHERE id = ?", (int(image_id),)).fetchone()
        return default if row is None else self._entry(row)

    def __getitem__(self, image_id: int) -> CatalogEntry:
        entry = self.get(image_id)
        if entry is None:
            raise UserError(f"{self.path} has no image {image_id}, though its index names it: the index is "
                            "inconsistent; rebuild it with `simsiam-embed index --rebuild`")
        return entry

    def has_path(self, path: str) -> bool:
        """Whether the image at ``path`` is in the catalog (one lookup in the paths' unique index)."""
        with self._lock:
            return self._connection.execute("SELECT 1 FROM images WHERE path = ? LIMIT 1", (path,)).fetchone() is not None

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, (int, np.integer)) and self.get(int(image_id)) is not None

    def __iter__(self) -> Iterator[int]:
        return (entry.id for entry in self.values())

    def values(self) -> Iterator[CatalogEntry]:
        """Every entry in id order, a page at a time (memory stays at one page whatever the size)."""
        last = -(2**63)
        while True:
            with self._lock:
                rows = self._connection.execute(f"SELECT {_COLUMNS} FROM images WHERE id > ? ORDER BY id LIMIT ?",
                                                (last, 10_000)).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._entry(row)
            last = rows[-1][0]

    def many(self, image_ids: Sequence[int]) -> list[CatalogEntry]:
        """The entries of ``image_ids``, in that order: a few queries for hundreds of ids."""
        wanted = [int(image_id) for image_id in image_ids]
        found: dict[int, CatalogEntry] = {}
        for start in range(0, len(wanted), _ROWS_PER_QUERY):
            chunk = sorted(set(wanted[start:start + _ROWS_PER_QUERY]))
            with self._lock:
                rows = self._connection.execute(
                    f"SELECT {_COLUMNS} FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
            found.update((row[0], self._entry(row)) for row in rows)
        missing = next((image_id for image_id in wanted if image_id not in found), None)
        if missing is not None:
            self[missing]   # raises, naming it
        return [found[image_id] for image_id in wanted]

    def in_order(self, image_ids: np.ndarray) -> list[CatalogEntry]:
        """The entries of all of ``image_ids`` (a whole index's), in that order: read in one pass."""
        by_id = {entry.id: entry for entry in self.values()}
        missing = next((int(image_id) for image_id in image_ids if int(image_id) not in by_id), None)
        if missing is not None:
            self[missing]
        return [by_id[int(image_id)] for image_id in image_ids]

    def _entry(self, row: tuple) -> CatalogEntry:
        if not all(type(value) is kind for value, kind in zip(row, _TYPES)):
            raise UserError(f"{self.path}: row {row[:2]!r:.80} has values of the wrong type; the index is damaged: "
                            "rebuild it with `simsiam-embed index --rebuild`")
        return CatalogEntry(*row)
