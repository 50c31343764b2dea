"""What native libraries print to file descriptor 1, kept out of the commands' own output.

ONNX Runtime prints its provider fallback banner ("EP Error ... Falling back") with Python's
print, and native code (ONNX Runtime, FAISS's on-disk lists: "resizing ...") writes to file
descriptor 1 directly: either would land in the middle of ``--json`` output or a search's
results. Python-level redirection cannot catch the second, so the descriptor itself is pointed
elsewhere for the block.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from typing import Iterator


#: Descriptor 1 and ``sys.stdout`` belong to the process, not to a thread: when blocks overlap
#: (the web app reopens an index while another thread starts an ONNX session), the first block
#: to begin points them away and the last to end puts them back. Each block saving and restoring
#: them itself would, interleaved, restore another block's target: stdout left on a closed
#: /dev/null, or descriptor 1 on stderr for good.
_lock = threading.Lock()
_open_blocks = 0
_saved: tuple[int | None, object, object] | None = None   # (descriptor 1's copy, /dev/null opened, redirection)


@contextlib.contextmanager
def stdout_redirected(discard: bool = False) -> Iterator[None]:
    """For the block, stdout (Python's and descriptor 1) goes to stderr, or nowhere if ``discard``.
    A block that begins while another is open shares its target: either way, not stdout."""
    _begin(discard)
    try:
        yield
    finally:
        _end()


def _begin(discard: bool) -> None:
    global _open_blocks, _saved
    with _lock:
        _open_blocks += 1
        if _open_blocks > 1:
            return
        sys.stdout.flush()
        _flush_c_stdio()
        target = open(os.devnull, "w") if discard else sys.stderr
        try:
            saved_descriptor = os.dup(1)
        except OSError:   # no real stdout (an embedding host): Python's redirect still applies
            saved_descriptor = None
        else:
            os.dup2(target.fileno() if discard else 2, 1)
        redirection = contextlib.redirect_stdout(target)
        redirection.__enter__()
        _saved = (saved_descriptor, target if discard else None, redirection)


def _end() -> None:
    global _open_blocks, _saved
    with _lock:
        _open_blocks -= 1
        if _open_blocks > 0:
            return
        saved_descriptor, opened_target, redirection = _saved
        _saved = None
        sys.stdout.flush()
        _flush_c_stdio()   # C's buffered printf output belongs to the block, not to what follows
        redirection.__exit__(None, None, None)
        if saved_descriptor is not None:
            os.dup2(saved_descriptor, 1)
            os.close(saved_descriptor)
        if opened_target is not None:
            opened_target.close()


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):   # no C library to ask (not a POSIX system)
        pass
