"""A generation's ``vectors.npy``, written and read in blocks: never the whole file in memory.

    >>> with VectorWriter(path, rows=n, dim=512) as writer:
    ...     writer.write(block)                  # any number of blocks, n rows in all
    >>> vectors = VectorFile(path)               # len(), .shape, [start:stop], [positions]

The writer puts the .npy header first (the row count is known before any row is) and appends
blocks; it refuses to finish short or long. The reader returns rows by plain reads, never
through a memory map: the pages a map touches (and the kernel's readahead around each) stay
mapped into the process, counted as its memory for as long as the page cache keeps them; read
pages stay in the cache only.
"""

from __future__ import annotations

import os
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
        with open(path, "rb") as handle:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(handle))
            if read_header is None:
                raise ValueError(f"{path} is not an .npy file of version 1 or 2")
            shape, fortran_order, dtype = read_header(handle)
            self._offset = handle.tell()
        if dtype != np.float32 or fortran_order or len(shape) != 2:
            raise ValueError(f"{path} holds {dtype} of shape {shape}, not float32 rows")
        if path.stat().st_size != self._offset + shape[0] * shape[1] * 4:
            raise ValueError(f"{path} is not as long as its header says")
        self.shape, self.dtype, self.ndim = shape, dtype, 2
        self._row_bytes = shape[1] * 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(len(self))
            return self._read_range(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            position = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= position < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            return self._read_range(position, position + 1)[0]
        return self._read_rows(np.asarray(key))

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        rows = np.empty((stop - start, self.shape[1]), dtype=np.float32)
        view, done = memoryview(rows).cast("B"), 0
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self._offset + start * self._row_bytes)
            while done < len(view):   # one read returns at most ~2 GiB
                count = handle.readinto(view[done:])
                if not count:
                    raise ValueError(f"{self.path} is shorter than its header says")
                done += count
        return rows

    def _read_rows(self, positions: np.ndarray) -> np.ndarray:
        """Scattered rows, one read each in file order (a memory map would map in its readahead
        around each: a sample of 5% of the rows mapped 75% of a 20 GB file)."""
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        positions = np.where(positions < 0, positions + len(self), positions).astype(np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        rows = np.empty((len(positions), self.shape[1]), dtype=np.float32)
        order = np.argsort(positions, kind="stable")
        with open(self.path, "rb", buffering=0) as handle:
            descriptor = handle.fileno()
            for slot in order:
                data = os.pread(descriptor, self._row_bytes, self._offset + int(positions[slot]) * self._row_bytes)
                if len(data) != self._row_bytes:
                    raise ValueError(f"{self.path} is shorter than its header says")
                rows[slot] = np.frombuffer(data, dtype=np.float32)
        return rows.reshape(positions.shape + (self.shape[1],))
