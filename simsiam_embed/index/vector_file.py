"""A generation's ``vectors.npy``, written and read in blocks: never the whole file in memory.

    >>> with VectorWriter(path, rows=n, dim=512) as writer:
    ...     writer.write(block)                  # any number of blocks, n rows in all
    >>> vectors = VectorFile(path)               # len(), .shape, [start:stop], [positions]

The writer puts the .npy header first (the row count is known before any row is) and appends
blocks; it refuses to finish short or long. The reader returns a range of rows by plain reads,
and scattered rows through a memory map: a pass over a memory map would leave every page of
the file mapped into the process, counted as its memory for as long as the page cache keeps
them; plain reads leave them in the cache only, and a few scattered rows touch a few pages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class VectorWriter:
    def __init__(self, path: Path, rows: int, dim: int):
        self.path, self.rows, self.dim, self.written = path, rows, dim, 0
        self._file = open(path, "wb")
        np.lib.format.write_array_header_2_0(
            self._file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                         "fortran_order": False, "shape": (rows, dim)})

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=np.float32).reshape(-1, self.dim)
        if self.written + len(block) > self.rows:
            raise ValueError(f"{self.path}: more than the {self.rows} rows announced")
        self._file.write(block.data)
        self.written += len(block)

    def __enter__(self) -> "VectorWriter":
        return self

    def __exit__(self, error_type, *_details) -> None:
        self._file.close()
        if error_type is None and self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} rows written of the {self.rows} announced")


class VectorFile:
    """A float32 (rows, dim) .npy file, read on demand (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self._map = np.load(path, mmap_mode="r")   # numpy parses and checks the header
        if self._map.dtype != np.float32 or self._map.ndim != 2:
            raise ValueError(f"{path} holds {self._map.dtype} of {self._map.ndim} dimensions, not float32 rows")
        self.shape, self.dtype, self.ndim = self._map.shape, self._map.dtype, 2
        self._offset = self._map.offset

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            return self._read(start, max(start, stop))
        return np.array(self._map[key])

    def _read(self, start: int, stop: int) -> np.ndarray:
        rows = np.empty((stop - start, self.shape[1]), dtype=np.float32)
        view, done = memoryview(rows).cast("B"), 0
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self._offset + start * self.shape[1] * 4)
            while done < len(view):   # one read returns at most ~2 GiB
                count = handle.readinto(view[done:])
                if not count:
                    raise ValueError(f"{self.path} is shorter than its header says")
                done += count
        return rows

