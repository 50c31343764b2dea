"""The user's flow stitched from the stages: which run, which encoder, which folder.

``simsiam-embed index`` with no argument means: the latest run's image folder, embedded with
that run's encoder (exported on the fly if it has not been, or if the checkpoint is newer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from simsiam_embed.artefacts import CHECKPOINT_SUFFIXES, RunFolder, encoder_path_for, file_digest, resolve_checkpoint_path, run_facts
from simsiam_embed.errors import UserError
from simsiam_embed.settings import EMBED_BATCH_SIZE, EMBED_WORKERS
from simsiam_embed.index.store import EncoderIdentity, IndexUpdate, update_index
from simsiam_embed.inference.embed import Encoder, TorchEncoder
from simsiam_embed.inference.export import export_onnx
from simsiam_embed.inference.onnx_encoder import OnnxEncoder, read_encoder_metadata
from simsiam_embed.workspace import Workspace

Report = Callable[[str], None]


def encoder_for_checkpoint(checkpoint: Path, report: Report) -> Path:
    """The encoder exported from ``checkpoint`` (beside it), exported now if missing or made from
    another version of that checkpoint."""
    encoder = encoder_path_for(checkpoint)
    digest = file_digest(checkpoint)
    if encoder.is_file():
        try:
            if read_encoder_metadata(encoder).source_checkpoint_sha256 == digest:
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
    checkpoint file (default: the latest run) as its exported encoder, exported now if needed,
    or as the checkpoint itself with ``backend="torch"``."""
    if model is not None and model.suffix == ".onnx" and backend != "torch":
        encoder: Encoder = OnnxEncoder(model, provider)
        return encoder, EncoderIdentity("onnx", str(model.resolve()), file_digest(model), encoder.dim)
    checkpoint = _checkpoint_named(workspace, model)
    _warn_if_unfinished(checkpoint, report)
    if backend == "torch":
        encoder = TorchEncoder(checkpoint)
        return encoder, EncoderIdentity("torch", str(checkpoint.resolve()), file_digest(checkpoint), encoder.dim)
    onnx_path = encoder_for_checkpoint(checkpoint, report)
    encoder = OnnxEncoder(onnx_path, provider)
    return encoder, EncoderIdentity("onnx", str(onnx_path.resolve()), file_digest(onnx_path), encoder.dim)


def _checkpoint_named(workspace: Workspace, model: Path | None) -> Path:
    """The checkpoint a --model names: the file itself, a run folder's checkpoint, or the latest run's."""
    if model is None:
        return RunFolder(workspace.latest_run_dir()).checkpoint
    checkpoint = resolve_checkpoint_path(model)
    if not checkpoint.is_file():
        raise UserError(f"no {checkpoint.name} in {model}: give an encoder .onnx file, a run folder or its checkpoint")
    if checkpoint.suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"{model} names no checkpoint.pt, run folder or encoder .onnx file: give one of those")
    return checkpoint


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
        checkpoint = _checkpoint_named(workspace, None if model is None or model.suffix == ".onnx" else model)
        data_dir = run_facts(checkpoint, kind="pretrain").data_dir
        if data_dir is None:
            raise UserError(f"{checkpoint} names no image folder: name the folder to index")
        image_dir = Path(data_dir)
        if not image_dir.is_dir():
            raise UserError(f"the run's image folder {image_dir} is gone: name the folder to index")
    if not image_dir.is_dir():
        raise UserError(f"{image_dir} is not a folder: give the folder of images to index")
    encoder, identity = resolve_encoder(workspace, model, backend, provider, report)
    report(f"images: {image_dir}\nencoder: {encoder.description}")
    return IndexSources(image_dir, encoder, identity)


def _warn_if_unfinished(checkpoint: Path, report: Report) -> None:
    facts = run_facts(checkpoint, kind="pretrain")
    if not facts.finished:
        of_total = f" of {facts.total_steps}" if facts.total_steps else ""   # a time budget not yet planned
        report(f"note: {checkpoint} is from an unfinished run (step {facts.step}{of_total}); "
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
    batch_size: int = EMBED_BATCH_SIZE,
    workers: int = EMBED_WORKERS,
    report: Report = print,
    show_progress: bool = True,
    recall: float | None = None,
) -> IndexUpdate:
    """``simsiam-embed index``: resolve the folder and encoder, then bring the index up to date."""
    sources = resolve_index_sources(workspace, image_dir, model, backend, provider, report)
    update = update_index(
        sources.image_dir, sources.encoder, sources.identity, index_dir or workspace.default_index_dir,
        index_type, rebuild, batch_size, workers, report, show_progress, recall,
    )
    return update
