"""The user's flow stitched from the stages: which run, which encoder, which folder.

``simsiam-embed index`` with no argument means: the latest run's image folder, embedded with
that run's encoder (exported on the fly if it has not been, or if the checkpoint is newer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from simsiam_embed.artefacts import (
    CHECKPOINT_SUFFIXES, RunFolder, exported_encoder_path, file_digest, resolve_checkpoint_path, run_facts,
)
from simsiam_embed.errors import Report, UserError
from simsiam_embed.files import folder_lock
from simsiam_embed.image_files import discover_images
from simsiam_embed.settings import EMBED_BATCH_SIZE, cpu_int8_instructions, embed_precision, embed_workers
from simsiam_embed.index.store import EncoderIdentity, IndexUpdate, live_encoder_digest, update_index
from simsiam_embed.inference.embed import Encoder, TorchEncoder
from simsiam_embed.inference.export import export_onnx
from simsiam_embed.inference.onnx_encoder import OnnxEncoder, read_encoder_metadata, torch_sees_a_gpu
from simsiam_embed.pretrained_weights import is_weights_name, known_names
from simsiam_embed.trained_model import pretrained_run
from simsiam_embed.workspace import Workspace


def encoder_for_checkpoint(checkpoint: Path, report: Report, precision: str = "fp32",
                           checkpoint_digest: str | None = None) -> Path:
    """The encoder exported from ``checkpoint`` at ``precision`` (beside it), exported now if
    missing or made from another version of that checkpoint.

    An export happens under the run folder's lock: under torchrun every rank asks at once, and
    each would export (and quantise, for int8: a minute or more) the same file; the first
    exports, the others wait and find it done. A current encoder is returned without the lock,
    so a read-only run folder still serves its exports. ``checkpoint_digest``: the checkpoint's,
    where the caller has it (hashing a ResNet-50 checkpoint takes a good fraction of a second)."""
    encoder = exported_encoder_path(checkpoint, precision=precision)
    digest = checkpoint_digest or file_digest(checkpoint)
    if _is_export_of(encoder, digest):
        return encoder
    with folder_lock(encoder.parent, "an encoder export", report):
        if _is_export_of(encoder, digest):   # another process exported it while this one waited
            return encoder
        report(f"{encoder} is older than {checkpoint}: exporting again" if encoder.is_file()
               else f"exporting {checkpoint} -> {encoder}")
        result = export_onnx(checkpoint, encoder, precision=precision)
    overlap = (f"; top-10 neighbours shared with fp32: {result.neighbour_overlap:.3f}"
               if result.neighbour_overlap is not None else "")
    report(f"  parity with PyTorch on {result.parity_images} images: smallest cosine {result.min_cosine:.6f}, "
           f"largest difference {result.max_abs_diff:.2e}{overlap}")
    return encoder


def _is_export_of(encoder: Path, checkpoint_digest: str) -> bool:
    try:
        return encoder.is_file() and read_encoder_metadata(encoder).source_checkpoint_sha256 == checkpoint_digest
    except UserError:
        return False   # unreadable or foreign: exported afresh over it


def named_model(workspace: Workspace, model: Path | None, report: Report) -> Path | None:
    """What ``--model`` names: a file or folder as it is; torchvision's pretrained weights by
    name ("imagenet", "resnet50.IMAGENET1K_V2") as a run of them, made once in the workspace
    (:func:`~simsiam_embed.trained_model.pretrained_run`): no training needed to index."""
    if model is None or model.exists():
        return model
    if not is_weights_name(str(model)):
        raise UserError(f"--model {model}: no such file or folder; give an encoder .onnx, a run folder or checkpoint, "
                        f"or pretrained weights by name ({', '.join(known_names())})")
    return pretrained_run(str(model), workspace.runs_dir, report, "cuda" if torch_sees_a_gpu() else "cpu")


def resolve_encoder(
    workspace: Workspace,
    model: Path | None,
    backend: str,
    provider: str | None,
    report: Report,
    precision: str = "auto",
    count_images: Callable[[], int] | None = None,
    kept_digest: str | None = None,
) -> tuple[Encoder, EncoderIdentity]:
    """What ``--model`` means for embed and index: an ``.onnx`` file as it is; a run folder or
    checkpoint file (default: the latest run) as its exported encoder, exported now if needed
    (at ``precision``: see :func:`_encoder_at_precision`), or as the checkpoint itself with
    ``backend="torch"``."""
    model = named_model(workspace, model, report)
    if precision != "auto" and (backend == "torch" or (model is not None and model.suffix == ".onnx")):
        raise UserError(f"--precision {precision} applies to a run's exported encoder; "
                        f"{'the PyTorch checkpoint' if backend == 'torch' else model} is used as it is")
    if model is not None and model.suffix == ".onnx" and backend != "torch":
        encoder: Encoder = OnnxEncoder(model, provider, workspace.engine_cache_dir)
        return encoder, EncoderIdentity("onnx", str(model.resolve()), file_digest(model), encoder.dim)
    checkpoint = _checkpoint_named(workspace, model)
    _warn_if_unfinished(checkpoint, report)
    if backend == "torch":
        encoder = TorchEncoder(checkpoint)
        return encoder, EncoderIdentity("torch", str(checkpoint.resolve()), file_digest(checkpoint), encoder.dim)
    onnx_path = _encoder_at_precision(checkpoint, precision, provider, count_images, kept_digest, report)
    encoder = OnnxEncoder(onnx_path, provider, workspace.engine_cache_dir)
    return encoder, EncoderIdentity("onnx", str(onnx_path.resolve()), file_digest(onnx_path), encoder.dim)


def _encoder_at_precision(checkpoint: Path, requested: str, provider: str | None,
                          count_images: Callable[[], int] | None, kept_digest: str | None, report: Report) -> Path:
    """The run's encoder at the precision ``requested`` or, for "auto", chosen by
    settings.embed_precision (int8 on a CPU with int8 dot products, for enough images); an
    index keeps the encoder it was built with (``kept_digest``), so that a folder growing past
    the threshold is not embedded all over again. An int8 encoder that fails its neighbour
    check is reported and fp32 used, unless int8 was asked for. fp16 is only ever asked for, and
    only on a GPU (ONNX Runtime's CPU provider has no fast fp16 kernels)."""
    on_gpu = provider in ("cuda", "tensorrt") or (provider is None and torch_sees_a_gpu())
    if requested == "fp16" and not on_gpu:
        raise UserError("--precision fp16 runs the encoder in half precision on a GPU, and ONNX Runtime runs "
                        "on the CPU here: use --precision auto, fp32 or int8")
    checkpoint_digest = file_digest(checkpoint)
    fp32 = encoder_for_checkpoint(checkpoint, report, checkpoint_digest=checkpoint_digest)
    if requested == "auto" and kept_digest is not None:
        for precision in ("fp32", "fp16", "int8"):
            kept = exported_encoder_path(checkpoint, precision=precision)
            if kept.is_file() and file_digest(kept) == kept_digest and _is_export_of(kept, checkpoint_digest):
                report(f"precision: {precision} (the index was built with {kept.name})")
                return kept
    int8_units = cpu_int8_instructions()
    # Counting a folder of millions takes a while: only when the count decides.
    images = count_images() if requested == "auto" and not on_gpu and int8_units and count_images else None
    chosen, reason = embed_precision(requested, on_gpu, images, int8_units)
    if chosen == "fp32":
        report(f"precision: fp32 ({reason})")
        return fp32
    try:
        reduced = encoder_for_checkpoint(checkpoint, report, chosen, checkpoint_digest)
    except UserError as error:
        if requested == chosen:
            raise
        report(f"precision: fp32 ({chosen} was refused: {error})")
        return fp32
    report(f"precision: {chosen} ({reason})")
    return reduced


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
    precision: str = "auto",
    kept_digest: str | None = None,
) -> IndexSources:
    """The folder to index and the encoder to embed it with, from what the user gave (or not);
    ``kept_digest``: the encoder of the index being updated (see resolve_encoder)."""
    model = named_model(workspace, model, report)
    if image_dir is None:
        checkpoint = _checkpoint_named(workspace, None if model is None or model.suffix == ".onnx" else model)
        data_dir = run_facts(checkpoint, kind="pretrain").data_dir
        if not data_dir:   # a run of pretrained weights was trained on no folder of the user's
            raise UserError(f"{checkpoint} names no image folder: name the folder to index")
        image_dir = Path(data_dir)
        if not image_dir.is_dir():
            raise UserError(f"the run's image folder {image_dir} is gone: name the folder to index")
    if not image_dir.is_dir():
        raise UserError(f"{image_dir} is not a folder: give the folder of images to index")
    encoder, identity = resolve_encoder(workspace, model, backend, provider, report, precision,
                                        lambda: len(discover_images(image_dir)), kept_digest)
    report(f"images: {image_dir}\nencoder: {encoder.description}")
    return IndexSources(image_dir, encoder, identity)


def decode_workers(requested: int | None, encoder: Encoder, report: Report) -> int:
    """How many processes decode images for ``encoder`` (settings.embed_workers), said with why."""
    workers, reason = embed_workers(requested, encoder.on_gpu)
    report(f"decode workers: {workers} ({reason})")
    return workers


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
    workers: int | None = None,
    report: Report = print,
    show_progress: bool = True,
    recall: float | None = None,
    precision: str = "auto",
) -> IndexUpdate:
    """``simsiam-embed index``: resolve the folder and encoder, then bring the index up to date."""
    index_dir = index_dir or workspace.default_index_dir
    kept_digest = None if rebuild else live_encoder_digest(index_dir)
    sources = resolve_index_sources(workspace, image_dir, model, backend, provider, report, precision, kept_digest)
    workers = decode_workers(workers, sources.encoder, report)
    update = update_index(
        sources.image_dir, sources.encoder, sources.identity, index_dir,
        index_type, rebuild, batch_size, workers, report, show_progress, recall,
    )
    return update
