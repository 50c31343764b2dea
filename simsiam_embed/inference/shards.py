"""Embedding in shards that outlive the process: any number of files in bounded memory, resumable.

    >>> shards = embed_in_shards(paths, embed_slice, work_dir, dim=512, job={"encoder": digest})
    >>> for shard in shards:             # in order, one shard in memory at a time
    ...     shard.rows, shard.vectors, shard.failures

The files are cut into fixed slices of ``rows_per_shard`` (in the order given; about
:data:`SHARD_BYTES` of vectors each). Each slice is embedded on its own and written atomically,
once complete, as ``shard-NNNNNN.npz``: its vectors, the positions (in ``paths``) of the files
they belong to, its unreadable files with their reasons, and the digest of its files' names,
sizes and modification times, and the SHA-256 of its arrays' bytes (vectors replaced after the
fact are embedded again, not used); plain arrays, read back without unpickling and checked field
by field, never through a symbolic link (the folder is the run's own: a link in it is removed).
``job.json`` says what the shards are of: the file list's digest, the slice size, the
vectors' width and the caller's ``job`` (which encoder). A killed run resumes at the first slice
without a sound shard; a slice whose files changed since is embedded again; a run of another
file list or encoder finds another job and starts over.

Memory is one slice's vectors, whatever the folder's size. Under torchrun rank r embeds slices
r, r + world size, ...: no two processes ever write one file, and the manifest is written by
rank 0 before any rank starts.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from simsiam_embed.distributed import DistributedContext
from simsiam_embed.errors import Report, UserError
from simsiam_embed.files import atomic_write, open_not_through_a_link, write_json_atomic

#: Bytes of float32 vectors a shard holds: what one process keeps in memory while embedding.
SHARD_BYTES = 256 << 20
#: What job.json's layout is; a folder of another layout is started over.
SHARDS_FORMAT = 1
JOB_FILE = "job.json"
SHARD_NAME = re.compile(r"shard-(\d{6})\.npz")


#: A folder is cut into at least this many shards where it is large enough, so that up to this
#: many torchrun ranks each embed some (8 GPUs got one shard between them below ~262k images);
#: never whatever the world size is, so a job resumes under another number of processes.
MIN_SHARDS = 64
#: ... but no shard smaller than this: each slice starts its own loader.
MIN_SHARD_ROWS = 1024


def rows_per_shard(dim: int, count: int) -> int:
    """Files a shard: SHARD_BYTES of ``dim``-wide float32 vectors (32,768 at 2048-d), fewer so
    that ``count`` files make MIN_SHARDS shards, but not under MIN_SHARD_ROWS."""
    most = max(1, SHARD_BYTES // (4 * dim))
    return max(1, min(most, max(MIN_SHARD_ROWS, -(-count // MIN_SHARDS))))


def paths_digest(paths: Iterable[Path | str]) -> str:
    """The file list's identity: its names in order (NUL cannot occur in a name, so it separates them)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


@dataclass
class Shard:
    number: int
    rows: np.ndarray                    # int64 positions in the file list, ascending
    vectors: np.ndarray                 # float32 (len(rows), dim), unit length
    failures: list[tuple[int, str]]     # (position, reason) of the unreadable files


@dataclass
class ShardedEmbedding:
    """A folder of shards of one job (see the module docstring)."""

    folder: Path
    paths: Sequence[Path]
    rows_per_shard: int
    dim: int
    resumed: int = 0                 # shards found finished when the run started
    images_per_second: float = 0.0   # of this run's embedding
    decode_share: float = 0.0        # fraction of that time spent waiting for decoded images

    @property
    def count(self) -> int:
        return len(self.paths)

    @property
    def shard_count(self) -> int:
        return -(-self.count // self.rows_per_shard)

    def rows_of(self, number: int) -> range:
        return range(number * self.rows_per_shard, min(self.count, (number + 1) * self.rows_per_shard))

    def path(self, number: int) -> Path:
        return self.folder / f"shard-{number:06d}.npz"

    def files_digest(self, number: int) -> str:
        """The slice's files as they are now: names, sizes and modification times."""
        def state(path: Path) -> str:
            try:
                stat = path.stat()
            except OSError:
                return f"{path}\0missing"
            return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"

        return paths_digest(state(Path(self.paths[row])) for row in self.rows_of(number))

    def write(self, shard: Shard, files_digest: str) -> None:
        """``files_digest``: :meth:`files_digest` read before the slice was embedded."""
        positions, reasons = zip(*shard.failures) if shard.failures else ((), ())
        arrays = dict(rows=shard.rows.astype(np.int64), vectors=shard.vectors.astype(np.float32),
                      failed_rows=np.asarray(positions, dtype=np.int64), failure_reasons=np.asarray(reasons, dtype=str))
        # np.savez to an open file: it would add ".npz" to a temporary name of its own.
        with atomic_write(self.path(shard.number), "wb") as handle:
            np.savez(handle, **arrays, files_sha256=np.asarray(files_digest),
                     content_sha256=np.asarray(_content_digest(**arrays)))

    def read(self, number: int) -> Shard | None:
        """The shard, if its file exists, holds exactly its slice and its files are as they were
        when it was embedded; None otherwise (a shard a crash or a disk error left damaged, or
        one of files changed since, is embedded again, never trusted)."""
        try:
            with open_not_through_a_link(self.path(number)) as handle, np.load(handle, allow_pickle=False) as arrays:
                rows, vectors = arrays["rows"], arrays["vectors"]
                failed, reasons = arrays["failed_rows"], arrays["failure_reasons"]
                files, content = arrays["files_sha256"], arrays["content_sha256"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):   # missing, a link, truncated, not an npz, pickled
            return None
        expected = self.rows_of(number)
        sound = (rows.dtype == np.int64 and failed.dtype == np.int64 and vectors.dtype == np.float32
                 and reasons.dtype.kind == "U" and rows.ndim == failed.ndim == reasons.ndim == 1
                 and vectors.shape == (len(rows), self.dim) and len(failed) == len(reasons)
                 and np.array_equal(np.sort(np.concatenate([rows, failed])), np.arange(expected.start, expected.stop))
                 and bool(np.all(rows[1:] > rows[:-1])) and bool(np.isfinite(vectors).all())
                 and files.dtype.kind == "U" and files.ndim == 0 and str(files) == self.files_digest(number)
                 and content.dtype.kind == "U" and content.ndim == 0
                 and str(content) == _content_digest(rows, vectors, failed, reasons))
        if not sound:
            return None
        return Shard(number, rows, vectors, [(int(row), str(reason)) for row, reason in zip(failed, reasons)])

    def __iter__(self) -> Iterator[Shard]:
        for number in range(self.shard_count):
            shard = self.read(number)
            if shard is None:
                raise UserError(f"{self.path(number)} is missing or damaged, or its images changed while embedding: "
                                "run the same command again to embed them anew")
            yield shard

    def kept(self) -> int:
        """Files with a vector, over every shard (reads only the row lists)."""
        total = 0
        for number in range(self.shard_count):
            with np.load(self.path(number), allow_pickle=False) as arrays:
                total += len(arrays["rows"])
        return total

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _content_digest(rows: np.ndarray, vectors: np.ndarray, failed_rows: np.ndarray,
                    failure_reasons: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (rows, vectors, failed_rows, failure_reasons):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def embed_in_shards(
    paths: Sequence[Path],
    embed_slice: Callable[[Sequence[Path], tqdm], Any],
    folder: Path,
    dim: int,
    job: dict[str, Any],
    context: DistributedContext = DistributedContext(),
    show_progress: bool = True,
    report: Report = lambda _message: None,
    shard_rows: int | None = None,
) -> ShardedEmbedding:
    """Embed ``paths`` into the shards of ``folder`` (see the module docstring), resuming the
    shards a previous run of the same job finished.

    ``embed_slice(slice_paths, bar)`` embeds one slice (an :class:`~.embed.EmbedResult`: vectors,
    the indices within the slice they belong to, failures), updating ``bar`` as it goes.
    """
    shards = ShardedEmbedding(folder, paths, shard_rows or rows_per_shard(dim, len(paths)), dim)
    manifest = {"format": SHARDS_FORMAT, "count": len(paths), "rows_per_shard": shards.rows_per_shard, "dim": dim,
                "paths_sha256": paths_digest(paths), "job": job}
    if context.is_main:
        _start_or_resume(folder, manifest)
    if context.enabled:
        dist.barrier()   # every rank sees the manifest, and no stale shard, before it starts
    mine = range(context.rank, shards.shard_count, context.world_size)
    finished = {number for number in mine if shards.read(number) is not None}
    shards.resumed = len(finished)
    if finished and context.is_main:
        report(f"resuming: {len(finished)} of {len(mine)} shards already embedded in {folder}")
    done_rows = sum(len(shards.rows_of(number)) for number in finished)
    embedded, waiting_s, started = 0, 0.0, time.monotonic()
    with tqdm(total=sum(len(shards.rows_of(number)) for number in mine), initial=done_rows, unit="img",
              disable=not (show_progress and context.is_main), file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        for number in mine:
            if number in finished:
                continue
            rows = shards.rows_of(number)
            files_digest = shards.files_digest(number)   # before: a file changed while embedding is not hidden
            slice_started = time.monotonic()
            result = embed_slice([paths[i] for i in rows], bar)
            waiting_s += result.decode_share * (time.monotonic() - slice_started)
            shards.write(Shard(number, rows.start + result.indices.astype(np.int64), result.vectors,
                               [(rows.start + index, reason) for index, reason in result.failures]), files_digest)
            embedded += len(result.indices)
    elapsed = max(time.monotonic() - started, 1e-9)
    shards.images_per_second, shards.decode_share = embedded / elapsed, min(waiting_s / elapsed, 1.0)
    if context.enabled:
        dist.barrier()   # every shard is on disk before rank 0 reads them
    return shards


def _start_or_resume(folder: Path, manifest: dict[str, Any]) -> None:
    """Keep the folder's shards if they are of this job; otherwise clear it for this one."""
    try:
        previous = None if (folder / JOB_FILE).is_symlink() else json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError):
        previous = None
    same_job = previous == manifest
    if folder.is_symlink():   # the shards lie in the run's own folder: never written through a link
        folder.unlink()
        same_job = False
    if folder.exists():   # a killed writer's temporary files always go; another job's shards too
        for child in folder.iterdir():
            ours = SHARD_NAME.fullmatch(child.name) or child.name == JOB_FILE
            if child.name.endswith(".tmp") or (ours and (not same_job or child.is_symlink())):
                child.unlink(missing_ok=True)
    if same_job:
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / JOB_FILE, manifest)
