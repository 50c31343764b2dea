"""Checkpoint -> ONNX encoder that carries its own preprocessing, checked against PyTorch.

    >>> result = export_onnx(Path("runs/images/checkpoint.pt"), Path("runs/images/encoder.onnx"))
    >>> result.min_cosine >= 0.9999

The ONNX file's ``metadata_props`` hold everything a consumer needs (as timm's models carry
their data config): input size, resize rule, mean, std, embedding dim, the source checkpoint's
digest and the package version. :func:`read_encoder_metadata` reads them back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from . import __version__
from .checkpoint import file_digest, load_trained_model, preprocessing_for
from .data import Preprocessing, UnreadableImage, discover_images, open_image
from .errors import UserError
from .files import atomic_path, ensure_writable_folder

HEADS = ("backbone", "projector")
#: The parity bar of every fp32 export: ONNX Runtime and PyTorch must agree this closely.
MIN_COSINE_FP32 = 0.9999
#: fp16 keeps about 3 significant digits; through ~50 layers its features stay this close to fp32.
MIN_COSINE_FP16 = 0.999
PARITY_IMAGES = 32
METADATA_FORMAT = "simsiam-embed.encoder/1"


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
    model, config, _ = load_trained_model(checkpoint)
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
        _torch_export(export_model, preprocessing.input_size, tmp_path)
        _write_metadata(tmp_path, {
            "format": METADATA_FORMAT,
            "input_size": preprocessing.input_size,
            "resize_size": preprocessing.resize_size,
            "resize_rule": "shorter side to resize_size, then centre crop input_size",
            "interpolation": preprocessing.interpolation,
            "mean": json.dumps(list(preprocessing.mean)),
            "std": json.dumps(list(preprocessing.std)),
            "embedding_dim": embedding_dim,
            "head": head,
            "precision": "fp16" if fp16 else "fp32",
            "backbone": config.backbone,
            "source_checkpoint_sha256": file_digest(checkpoint),
            "package_version": __version__,
            "normalize_output": "l2",
        })
        max_abs, min_cos = _parity(tmp_path, batch.numpy(), reference)
        required = MIN_COSINE_FP16 if fp16 else MIN_COSINE_FP32
        if not min_cos >= required:   # NaN (weights gone non-finite) fails too
            raise UserError(
                f"export failed its parity check: ONNX Runtime and PyTorch disagree (smallest cosine {min_cos:.6f} "
                f"< {required}, largest difference {max_abs:.3g}); {output} was not written"
            )
    return ExportResult(output, embedding_dim, max_abs, min_cos, required, len(batch), fp16)


def _torch_export(model: nn.Module, input_size: int, path: Path) -> None:
    # torch 2.14's default exporter (torch.export, "dynamo=True") is used: the TorchScript-based
    # one is deprecated. It captures the batch axis as a symbolic dimension ("batch" in the
    # graph), so one file serves any batch size; it writes opset 20, which ONNX Runtime runs.
    example = torch.zeros(2, 3, input_size, input_size, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model, (example,), str(path), input_names=["images"], output_names=["embeddings"],
        dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False, verbose=False,
    )


def _write_metadata(path: Path, values: dict) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))


#: Resize rules a consumer may apply (torchvision's InterpolationMode values).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
MAX_INPUT_SIZE = 8192


def read_encoder_metadata(path: Path | str) -> dict[str, str]:
    """The ``metadata_props`` of an exported encoder, or a clear error if it is not one.

    An encoder is a file that travels: every field a consumer uses is checked here, against
    its type and range and against the graph's own output width, with an error naming it.
    """
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError, OSError, ... for broken files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable ONNX file ({reason[:200]}): export one with `simsiam-embed export`") from None
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    if metadata.get("format") != METADATA_FORMAT:
        raise UserError(f"{path} was not exported by simsiam-embed (run `simsiam-embed export`)")
    preprocessing_from_metadata(metadata, path)
    dim = _metadata_int(metadata, "embedding_dim", path, 1, 1 << 20)
    outputs = proto.graph.output
    declared = outputs[0].type.tensor_type.shape.dim[-1].dim_value if outputs and outputs[0].type.tensor_type.shape.dim else 0
    if declared and declared != dim:
        raise UserError(f"{path}: its metadata field 'embedding_dim' says {dim}, but the network outputs {declared}")
    return metadata


def _metadata_int(metadata: dict[str, str], name: str, path: Path | str, low: int, high: int) -> int:
    try:
        value = int(metadata.get(name, ""))
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UserError(f"{path}: its metadata field {name!r} is {metadata.get(name)!r}, not a whole number "
                        f"in {low}..{high}: export the encoder again")
    return value


def _metadata_triple(metadata: dict[str, str], name: str, path: Path | str, positive: bool) -> tuple[float, ...]:
    try:
        values = json.loads(metadata.get(name, ""))
    except ValueError:
        values = None
    if not (isinstance(values, list) and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            and (not positive or all(v > 0 for v in values))):
        raise UserError(f"{path}: its metadata field {name!r} is {metadata.get(name)!r}, not three finite "
                        f"{'positive ' if positive else ''}numbers: export the encoder again")
    return tuple(float(v) for v in values)


def preprocessing_from_metadata(metadata: dict[str, str], path: Path | str = "the encoder") -> Preprocessing:
    """The encoder's preprocessing, each field validated (see :func:`read_encoder_metadata`)."""
    input_size = _metadata_int(metadata, "input_size", path, 1, MAX_INPUT_SIZE)
    resize_size = _metadata_int(metadata, "resize_size", path, input_size, 4 * MAX_INPUT_SIZE)
    if metadata.get("interpolation") not in INTERPOLATIONS:
        raise UserError(f"{path}: its metadata field 'interpolation' is {metadata.get('interpolation')!r}, "
                        f"not one of {', '.join(INTERPOLATIONS)}: export the encoder again")
    return Preprocessing(
        input_size=input_size, resize_size=resize_size,
        mean=_metadata_triple(metadata, "mean", path, positive=False),
        std=_metadata_triple(metadata, "std", path, positive=True),
        interpolation=metadata["interpolation"],
    )


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
    from .embed import onnx_session

    session, _ = onnx_session(path)
    produced = session.run(None, {"images": batch})[0]
    return max_abs_and_min_cosine(produced, reference)


def max_abs_and_min_cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(np.abs(a - b).max()), float(cosine.min())
