"""Checkpoint -> ONNX encoder that carries its own preprocessing, checked against PyTorch.

    >>> result = export_onnx(Path("runs/images/checkpoint.pt"), Path("runs/images/encoder.onnx"))
    >>> result.min_cosine >= 0.9999

The file is written in the ``encoder.onnx`` format of :mod:`.onnx_encoder`: it carries its own
preprocessing and provenance, so a consumer needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from simsiam_embed.artefacts import HEADS, EncoderMetadata, file_digest
from simsiam_embed.trained_model import load_trained_model, preprocessing_for
from simsiam_embed.images import Preprocessing
from simsiam_embed.image_files import UnreadableImage, discover_images, open_image
from simsiam_embed.errors import UserError
from simsiam_embed.files import atomic_path, ensure_writable_folder
from simsiam_embed.inference.onnx_encoder import onnx_session, write_encoder
from simsiam_embed.settings import MIN_COSINE_FP16, MIN_COSINE_FP32

#: The parity bar of every fp32 export: ONNX Runtime and PyTorch must agree this closely.
#: fp16 keeps about 3 significant digits; through ~50 layers its features stay this close to fp32.
PARITY_IMAGES = 32


class _Encoder(nn.Module):
    """The part of a SimSiam network that makes embeddings: backbone, optionally + projector."""

    def __init__(self, backbone: nn.Module, projector: nn.Module | None, half: bool = False):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.half_precision = half

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The fp16 model keeps fp32 inputs and outputs, so callers never see the difference.
        x = images.half() if self.half_precision else images
        features = self.backbone(x)
        if self.projector is not None:
            features = self.projector(features)
        return features.float()


@dataclass
class ExportResult:
    path: Path
    embedding_dim: int
    max_abs_diff: float
    min_cosine: float
    min_cosine_required: float
    parity_images: int
    fp16: bool


def export_onnx(
    checkpoint: Path,
    output: Path,
    head: str = "backbone",
    fp16: bool = False,
    parity_images: Sequence[Path] | None = None,
) -> ExportResult:
    """Export a run's encoder; the file replaces ``output`` only after it passes the parity check.

    ``parity_images``: real images to compare on (default: the first images of the run's folder).
    """
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    model, config = load_trained_model(checkpoint)
    preprocessing = preprocessing_for(config)
    encoder = _Encoder(model.backbone, model.projector if head == "projector" else None).eval()
    embedding_dim = config.dim if head == "projector" else model.backbone.feature_dim

    batch = _parity_batch(parity_images if parity_images is not None else _run_images(config.data_dir), preprocessing)
    with torch.no_grad():
        reference = encoder(batch).numpy()

    ensure_writable_folder(output.parent)
    with atomic_path(output) as tmp_path:
        export_model = encoder
        if fp16:
            export_model = _Encoder(model.backbone, encoder.projector, half=True).half().eval()
        write_encoder(export_model, preprocessing.input_size, EncoderMetadata(
            preprocessing=preprocessing, embedding_dim=embedding_dim, head=head, precision="fp16" if fp16 else "fp32",
            backbone=config.backbone, source_checkpoint_sha256=file_digest(checkpoint),
        ), tmp_path)
        max_abs, min_cos = _parity(tmp_path, batch.numpy(), reference)
        required = MIN_COSINE_FP16 if fp16 else MIN_COSINE_FP32
        if not min_cos >= required:   # NaN (weights gone non-finite) fails too
            raise UserError(
                f"export failed its parity check: ONNX Runtime and PyTorch disagree (smallest cosine {min_cos:.6f} "
                f"< {required}, largest difference {max_abs:.3g}); {output} was not written"
            )
    return ExportResult(output, embedding_dim, max_abs, min_cos, required, len(batch), fp16)


def _run_images(data_dir: str) -> list[Path]:
    folder = Path(data_dir)
    return discover_images(folder) if folder.is_dir() else []


def _parity_batch(paths: Sequence[Path], preprocessing: Preprocessing) -> torch.Tensor:
    transform = preprocessing.transform()
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(open_image(path, preprocessing.draft_side)))
        except UnreadableImage:
            continue
        if len(tensors) == PARITY_IMAGES:
            break
    if not tensors:
        # No images at hand (the run's folder moved): random inputs still test the graph.
        generator = torch.Generator().manual_seed(0)
        return torch.randn(8, 3, preprocessing.input_size, preprocessing.input_size, generator=generator)
    return torch.stack(tensors)


def _parity(path: Path, batch: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    session, _ = onnx_session(path)
    produced = session.run(None, {"images": batch})[0]
    return max_abs_and_min_cosine(produced, reference)


def max_abs_and_min_cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.abs(a - b).max()), float(cosine.min())
