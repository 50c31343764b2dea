"""Library modules loaded on first use, so `simsiam-embed --help` and `COMMAND --help` answer
at once: importing PyTorch, torchvision, FAISS and ONNX Runtime costs seconds, and only a
command that runs needs them."""

from __future__ import annotations

import importlib
from typing import Any


class library:
    """``simsiam_embed.<name>``, imported when one of its attributes is first read.

    A stand-in object rather than importlib's LazyLoader: a lazy module placed in sys.modules
    is loaded by anything that walks sys.modules (``inspect.getmodule``, which PyTorch calls
    while it imports), in the middle of another import.
    """

    def __init__(self, name: str):
        self._name = f"simsiam_embed.{name}"

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)
