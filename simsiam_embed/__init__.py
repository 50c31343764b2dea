"""simsiam-embed: learn image embeddings from a folder of unlabelled images with SimSiam.

The three commands' work, from Python::

    from pathlib import Path
    from simsiam_embed import Workspace, pretrain, index_folder, search_images

    workspace = Workspace(Path("."))
    run = pretrain("images", workspace, overrides={"epochs": 1})   # runs/images/
    index_folder(workspace)                                         # index/ of the run's folder
    for hit in search_images(workspace.default_index_dir, [Path("query.jpg")])[0].hits:
        print(hit.rank, hit.score, hit.path)

Also ``embed_folder`` (vectors to disk), ``export_onnx``, ``load_index``, ``OnnxEncoder``,
``TorchEncoder`` and ``UserError`` (what every one of them raises for bad input). Names load
their modules on first use, so ``import simsiam_embed`` costs nothing until then.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API = {
    "Workspace": "workspace",
    "UserError": "errors",
    "pretrain": "training.pretrain",
    "PretrainResult": "training.pretrain",
    "index_folder": "flow",
    "resolve_encoder": "flow",
    "search_images": "index.search",
    "load_index": "index.store",
    "embed_folder": "inference.embed",
    "embed_paths": "inference.embed",
    "TorchEncoder": "inference.embed",
    "OnnxEncoder": "inference.onnx_encoder",
    "export_onnx": "inference.export",
    "RunFolder": "artefacts",
    "Checkpoint": "artefacts",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'simsiam_embed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"simsiam_embed.{_API[name]}"), name)
    globals()[name] = value   # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
