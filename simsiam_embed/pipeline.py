"""The user's flow stitched from the stages: which run, which encoder, which folder.

``simsiam-embed index`` with no argument means: the latest run's image folder, embedded with
that run's encoder (exported on the fly if it has not been, or if the checkpoint is newer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import file_digest, load_checkpoint, resolve_checkpoint_path
from .config import PretrainConfig
from .embed import Encoder, OnnxEncoder, TorchEncoder
from .errors import UserError
from .export import export_onnx, read_encoder_metadata
from .index import EncoderIdentity, IndexUpdate, update_index
from .workspace import Workspace

Report = Callable[[str], None]


def encoder_for_run(run_dir: Path, report: Report) -> Path:
    """``run_dir/encoder.onnx``, exported now if missing or made from an older checkpoint."""
    checkpoint = _checkpoint_of_run(run_dir)
    encoder = run_dir / "encoder.onnx"
    digest = file_digest(checkpoint)
    if encoder.is_file():
        try:
            if read_encoder_metadata(encoder).get("source_checkpoint_sha256") == digest:
                return encoder
        except UserError:
            pass   # unreadable or foreign: export a fresh one over it
        report(f"{encoder} is older than {checkpoint}: exporting again")
    else:
        report(f"exporting {checkpoint} -> {encoder}")
    result = export_onnx(checkpoint, encoder)
    report(f"  parity with PyTorch on {result.parity_images} images: smallest cosine {result.min_cosine:.6f}, "
           f"largest difference {result.max_abs_diff:.2e}")
    return encoder


def resolve_encoder(
    workspace: Workspace,
    model: Path | None,
    backend: str,
    provider: str | None,
    report: Report,
) -> tuple[Encoder, EncoderIdentity]:
    """What ``--model`` means for embed and index: an ``.onnx`` file as it is; a run folder or
    checkpoint (default: the latest run) as its exported encoder, exported now if needed, or
    as the checkpoint itself with ``backend="torch"``."""
    if model is not None and model.suffix == ".onnx" and backend != "torch":
        encoder: Encoder = OnnxEncoder(model, provider)
        return encoder, EncoderIdentity("onnx", str(model.resolve()), file_digest(model), encoder.dim)
    run_dir = _run_of(workspace, model)
    if backend == "torch":
        checkpoint = resolve_checkpoint_path(model if model is not None else run_dir)
        _warn_if_unfinished(checkpoint, report)
        encoder = TorchEncoder(checkpoint)
        return encoder, EncoderIdentity("torch", str(checkpoint.resolve()), file_digest(checkpoint), encoder.dim)
    _warn_if_unfinished(_checkpoint_of_run(run_dir), report)
    onnx_path = encoder_for_run(run_dir, report)
    encoder = OnnxEncoder(onnx_path, provider)
    return encoder, EncoderIdentity("onnx", str(onnx_path.resolve()), file_digest(onnx_path), encoder.dim)


def _checkpoint_of_run(run_dir: Path) -> Path:
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise UserError(f"no checkpoint.pt in {run_dir}: give an encoder .onnx file, a run folder or its checkpoint")
    return checkpoint


def _run_of(workspace: Workspace, model: Path | None) -> Path:
    """The run folder a --model names (itself, or a checkpoint's folder), or the latest run."""
    if model is None:
        return workspace.latest_run_dir()
    return model if model.is_dir() else model.parent


@dataclass
class IndexSources:
    image_dir: Path
    encoder: Encoder
    identity: EncoderIdentity


def resolve_index_sources(
    workspace: Workspace,
    image_dir: Path | None,
    model: Path | None,
    backend: str,
    provider: str | None,
    report: Report,
) -> IndexSources:
    """The folder to index and the encoder to embed it with, from what the user gave (or not)."""
    if image_dir is None:
        run_dir = workspace.latest_run_dir() if model is None or model.suffix == ".onnx" else _run_of(workspace, model)
        checkpoint = run_dir / "checkpoint.pt"
        config = PretrainConfig.from_dict(load_checkpoint(checkpoint, kind="pretrain")["config"], source=checkpoint)
        image_dir = Path(config.data_dir)
        if not image_dir.is_dir():
            raise UserError(f"the run's image folder {image_dir} is gone: name the folder to index")
    if not image_dir.is_dir():
        raise UserError(f"{image_dir} is not a folder: give the folder of images to index")
    encoder, identity = resolve_encoder(workspace, model, backend, provider, report)
    report(f"images: {image_dir}\nencoder: {encoder.description}")
    return IndexSources(image_dir, encoder, identity)


def _warn_if_unfinished(checkpoint: Path, report: Report) -> None:
    state = load_checkpoint(checkpoint, kind="pretrain")
    if not state.get("finished"):
        report(f"note: {checkpoint} is from an unfinished run (step {state['step']} of {state['total_steps']}); "
               "`simsiam-embed pretrain ... --resume` finishes it")


def index_folder(
    workspace: Workspace,
    image_dir: Path | None = None,
    model: Path | None = None,
    index_dir: Path | None = None,
    index_type: str | None = None,
    rebuild: bool = False,
    backend: str = "onnx",
    provider: str | None = None,
    batch_size: int = 64,
    workers: int = 2,
    report: Report = print,
    show_progress: bool = True,
) -> IndexUpdate:
    """``simsiam-embed index``: resolve the folder and encoder, then bring the index up to date."""
    sources = resolve_index_sources(workspace, image_dir, model, backend, provider, report)
    update = update_index(
        sources.image_dir, sources.encoder, sources.identity, index_dir or workspace.default_index_dir,
        index_type, rebuild, batch_size, workers, report, show_progress,
    )
    return update
