"""Atomic writes, folder locks and write errors: a crash, Ctrl-C, a full disk or a second
process at any moment leaves the previous file intact, and the user gets one line saying why."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from simsiam_embed.errors import Report, UserError

#: Errors that mean "this place cannot take the write", not a bug: said in one line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def write_failure(target: Path | str, error: OSError) -> UserError:
    """The one-line message for a write that the filesystem refused."""
    advice = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "choose a writable folder"
    return UserError(f"cannot write {target} ({error.strerror or error}): {advice}; nothing already there was changed")


def _current_umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; if the block succeeds, fsync it and rename it over.

    For libraries that write to a path themselves (torch.save, torch.onnx, faiss). The temporary
    file lives in the same folder so the rename never crosses filesystems (where it would stop
    being atomic); on any error, or Ctrl-C, it is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp makes the file 0600; the result must be as readable as any file the user
        # creates (a web server or a colleague reading encoder.onnx), so honour the umask.
        os.fchmod(fd, 0o666 & ~_current_umask())
        os.close(fd)
    except OSError as error:
        if error.errno in WRITE_ERRNOS or error.errno == errno.ENOENT:
            raise write_failure(path, error) from None
        raise
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb") as written:
            # Again: a library may have replaced the file with one of its own (safetensors writes
            # a 0600 file of its own and renames it over the path it was given).
            os.fchmod(written.fileno(), 0o666 & ~_current_umask())
            os.fsync(written.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            raise write_failure(path, error) from None
        raise
    _fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """``open(path, mode)`` that replaces ``path`` only once the block has finished."""
    with atomic_path(path) as tmp_path, open(tmp_path, mode) as handle:
        yield handle


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path | str, payload: Any) -> None:
    with atomic_write(path) as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_jsonl_atomic(path: Path | str, records: list[dict]) -> None:
    """One JSON object a line: any file name (newlines, tabs, escapes) survives the round trip."""
    with atomic_write(path) as handle:
        handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_jsonl(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def open_not_through_a_link(path: Path, mode: str = "rb") -> IO[bytes]:
    """Open ``path`` for reading ("rb") or writing anew ("wb"), never through a symbolic link: a
    link inside a folder the package writes (a run's, an index's) could read or overwrite any
    file of the user's. A link raises OSError (ELOOP), as a missing file does."""
    flags = os.O_RDONLY if mode == "rb" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    return open(os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644), mode)


@contextlib.contextmanager
def folder_lock(folder: Path, holder: str, report: Report, name: str = ".lock") -> Iterator[None]:
    """Hold the exclusive writer's lock of ``folder`` (``folder/<name>``) for the block.

    A second writer waits, after saying who holds the lock. The operating system releases the
    lock when its holder exits, however it exits, so a crashed writer never blocks the next one.
    Readers take no lock: writers only ever add whole new files and rename them into place.
    """
    import fcntl

    lock_path = folder / name
    # Never through a link: a received folder's .lock could point at any file of the user's,
    # which this writer would then truncate.
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UserError(f"{lock_path} is a symbolic link, not a lock: delete it, then run again") from None
        raise write_failure(lock_path, error) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{lock_path} is not a regular file, so it cannot be a lock: delete it, then run again")
    handle = os.fdopen(fd, "r+")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            report(f"waiting: {owner} holds the lock on {folder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder} (pid {os.getpid()})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_writable_folder(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any long work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write to {folder} ({error.strerror or error}): choose a writable folder"
        ) from None
