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
from typing import Iterator


@contextlib.contextmanager
def stdout_redirected(discard: bool = False) -> Iterator[None]:
    """For the block, stdout (Python's and descriptor 1) goes to stderr, or nowhere if ``discard``."""
    sys.stdout.flush()
    _flush_c_stdio()
    target = open(os.devnull, "w") if discard else sys.stderr
    try:
        try:
            saved = os.dup(1)
        except OSError:   # no real stdout (an embedding host): Python's redirect still applies
            with contextlib.redirect_stdout(target):
                yield
            return
        try:
            os.dup2(target.fileno() if discard else 2, 1)
            with contextlib.redirect_stdout(target):
                yield
        finally:
            sys.stdout.flush()
            _flush_c_stdio()   # C's buffered printf output belongs to the block, not to what follows
            os.dup2(saved, 1)
            os.close(saved)
    finally:
        if discard:
            target.close()


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):   # no C library to ask (not a POSIX system)
        pass
