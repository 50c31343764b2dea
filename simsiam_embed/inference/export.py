"""Checkpoint -> ONNX encoder that carries its own preprocessing, checked against PyTorch.

    >>> result = export_onnx(Path("runs/images/checkpoint.pt"), Path("runs/images/encoder.onnx"))
    >>> result.min_cosine >= 0.9999

The file is written in the ``encoder.onnx`` format of :mod:`.onnx_encoder`: it carries its own
preprocessing and provenance, so a consumer needs nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from simsiam_embed.artefacts import HEADS, PRECISIONS, EncoderMetadata, file_digest
from simsiam_embed.trained_model import load_trained_model, preprocessing_for
from simsiam_embed.images import Preprocessing
from simsiam_embed.image_files import UnreadableImage, discover_images, open_image
from simsiam_embed.errors import UserError
from simsiam_embed.files import atomic_path, ensure_writable_folder
from simsiam_embed.inference.onnx_encoder import onnx_session, write_encoder, write_encoder_metadata
from simsiam_embed.settings import MIN_COSINE_FP16, MIN_COSINE_FP32, MIN_NEIGHBOUR_OVERLAP_INT8

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
    precision: str
    neighbour_overlap: float | None = None   # int8: top-10 neighbours shared with fp32, on average


def export_onnx(
    checkpoint: Path,
    output: Path,
    head: str = "backbone",
    precision: str = "fp32",
    parity_images: Sequence[Path] | None = None,
) -> ExportResult:
    """Export a run's encoder; the file replaces ``output`` only after it passes the parity check.

    ``precision``: fp32; fp16 (weights, for GPUs); int8 (ONNX Runtime static quantisation
    calibrated on the run's own images, for CPUs with int8 dot products: AVX512-VNNI, AMX).
    ``parity_images``: real images to compare on (default: the first images of the run's folder).
    """
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    model, config = load_trained_model(checkpoint)
    preprocessing = preprocessing_for(config)
    encoder = _Encoder(model.backbone, model.projector if head == "projector" else None).eval()
    embedding_dim = config.dim if head == "projector" else model.backbone.feature_dim
    images = list(parity_images) if parity_images is not None else _run_images(config.data_dir)

    batch = _parity_batch(images, preprocessing)
    with torch.no_grad():
        reference = encoder(batch).numpy()

    ensure_writable_folder(output.parent)
    metadata = EncoderMetadata(preprocessing=preprocessing, embedding_dim=embedding_dim, head=head, precision=precision,
                               backbone=config.backbone, source_checkpoint_sha256=file_digest(checkpoint))
    overlap = None
    with atomic_path(output) as tmp_path:
        if precision == "int8":
            # Decoded once: the calibration images are the first of those the neighbour check compares on.
            pool = _images(images, preprocessing, max(CALIBRATION_IMAGES, OVERLAP_IMAGES), random_if_none=False)
            calibration = _batches(pool[:CALIBRATION_IMAGES])
            if not calibration:
                raise UserError("--int8 calibrates on the run's own images and none could be read in "
                                f"{config.data_dir}: export fp32, or restore the run's folder")
            fp32_path = tmp_path.with_name(tmp_path.name + ".fp32.onnx")   # the quantiser's input, then gone
            try:
                write_encoder(encoder, preprocessing.input_size, dataclasses.replace(metadata, precision="fp32"), fp32_path)
                quantize_encoder(fp32_path, tmp_path, calibration, metadata)
                overlap = _neighbour_overlap(fp32_path, tmp_path, _batches(pool[:OVERLAP_IMAGES]))
            finally:
                fp32_path.unlink(missing_ok=True)
        else:
            export_model = encoder
            if precision == "fp16":
                export_model = _Encoder(model.backbone, encoder.projector, half=True).half().eval()
            write_encoder(export_model, preprocessing.input_size, metadata, tmp_path)
        max_abs, min_cos = _parity(tmp_path, batch.numpy(), reference)
        required = {"fp32": MIN_COSINE_FP32, "fp16": MIN_COSINE_FP16, "int8": MIN_COSINE_INT8}[precision]
        if not min_cos >= required:   # NaN (weights gone non-finite) fails too
            raise UserError(
                f"export failed its parity check: ONNX Runtime and PyTorch disagree (smallest cosine {min_cos:.6f} "
                f"< {required}, largest difference {max_abs:.3g}); {output} was not written"
            )
        if overlap is not None and overlap < MIN_NEIGHBOUR_OVERLAP_INT8:
            raise UserError(
                f"the int8 encoder finds other neighbours than fp32 (top-10 overlap {overlap:.3f} < "
                f"{MIN_NEIGHBOUR_OVERLAP_INT8} on the run's images): use the fp32 encoder; {output} was not written")
    return ExportResult(output, embedding_dim, max_abs, min_cos, required, len(batch), precision, overlap)


#: Images the int8 quantiser calibrates its activation ranges on (ONNX Runtime's guide: a few
#: hundred representative inputs), and images the neighbour check compares on.
CALIBRATION_IMAGES = 256
OVERLAP_IMAGES = 512
#: int8 changes features more than fp16; the neighbour overlap is its real bar (see settings).
MIN_COSINE_INT8 = 0.9


def quantize_encoder(fp32_path: Path, output: Path, calibration: list[np.ndarray], metadata: EncoderMetadata) -> None:
    """ONNX Runtime static quantisation of an fp32 encoder: QDQ format, int8 weights per output
    channel and uint8 activations (ranges calibrated on ``calibration``), as ONNX Runtime's CPU
    guide recommends for convolutional networks; the metadata carried over, precision int8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    prepared = output.with_name(output.name + ".prepared")
    try:
        quant_pre_process(str(fp32_path), str(prepared))   # shape inference and graph clean-up first
        quantize_static(str(prepared), str(output), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    write_encoder_metadata(output, metadata)


def _neighbour_overlap(fp32_path: Path, int8_path: Path, batches: list[np.ndarray]) -> float:
    """The share of each image's 10 nearest neighbours (cosine, among these images) that the
    int8 encoder finds as fp32 does, averaged: what retrieval with it would change."""
    vectors = []
    for path in (fp32_path, int8_path):
        session, _ = onnx_session(path, tensorrt=False, cpu_fallback_ok=True)   # as _parity: no engine build for a check
        features = np.concatenate([session.run(None, {"images": batch})[0] for batch in batches])
        vectors.append(features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12))
    k = min(10, len(vectors[0]) - 1)
    if k < 1:
        return 1.0
    neighbours = []
    for features in vectors:
        similarity = features @ features.T
        np.fill_diagonal(similarity, -np.inf)
        neighbours.append(np.argsort(-similarity, axis=1)[:, :k])
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(*neighbours)]))


def _batches(images: torch.Tensor, batch_size: int = 32) -> list[np.ndarray]:
    return [images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)]


def _run_images(data_dir: str) -> list[Path]:
    folder = Path(data_dir)
    return discover_images(folder) if folder.is_dir() else []


def _parity_batch(paths: Sequence[Path], preprocessing: Preprocessing) -> torch.Tensor:
    return _images(paths, preprocessing, PARITY_IMAGES)


def _images(paths: Sequence[Path], preprocessing: Preprocessing, most: int, random_if_none: bool = True) -> torch.Tensor:
    transform = preprocessing.transform()
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(open_image(path, preprocessing.draft_side)))
        except UnreadableImage:
            continue
        if len(tensors) == most:
            break
    if not tensors and not random_if_none:
        return torch.zeros(0, 3, preprocessing.input_size, preprocessing.input_size)
    if not tensors:
        # No images at hand (the run's folder moved): random inputs still test the graph.
        generator = torch.Generator().manual_seed(0)
        return torch.randn(8, 3, preprocessing.input_size, preprocessing.input_size, generator=generator)
    return torch.stack(tensors)


def _parity(path: Path, batch: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    # The graph is checked, not TensorRT: building an engine for one batch of 32 takes minutes
    # and, kept nowhere, would be built again by the first command that uses the encoder.
    session, _ = onnx_session(path, tensorrt=False, cpu_fallback_ok=True)
    produced = session.run(None, {"images": batch})[0]
    return max_abs_and_min_cosine(produced, reference)


def max_abs_and_min_cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.abs(a - b).max()), float(cosine.min())
