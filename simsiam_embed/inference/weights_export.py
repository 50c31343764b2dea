"""A run's backbone as plain ResNet weights for other libraries: safetensors under torchvision's
(and timm's) names, with a small JSON of what the network needs around it.

    >>> result = export_safetensors(Path("runs/photos"), Path("runs/photos/backbone.safetensors"))

Loading it elsewhere (the classifier ``fc`` is not in the file; the network's own stays random):

    resnet = torchvision.models.resnet50()
    resnet.load_state_dict(safetensors.torch.load_file("backbone.safetensors"), strict=False)
    model = timm.create_model("resnet50", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file="backbone.safetensors"))

A run trained with the small-image stem (images <= 64 px) has a 3x3, stride-1 first convolution
and no max-pool; the JSON says so, and such a network must be built that way to take the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from simsiam_embed import __version__
from simsiam_embed.artefacts import Checkpoint, file_digest, resolve_checkpoint_path
from simsiam_embed.errors import UserError
from simsiam_embed.files import atomic_path, ensure_writable_folder, write_json_atomic
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.trained_model import load_pretrained_resnet, preprocessing_for


@dataclass
class WeightsExport:
    path: Path
    config_path: Path
    tensors: int
    backbone: str


def export_safetensors(source: Path, output: Path) -> WeightsExport:
    """Write ``source``'s backbone to ``output`` (.safetensors) and ``output``'s ``.json`` beside it."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("--format safetensors needs the safetensors package: pip install 'simsiam-embed[interop]'") from None
    if output.suffix != ".safetensors":
        raise UserError(f"{output}: a safetensors export's name ends in .safetensors")
    checkpoint_path = resolve_checkpoint_path(source)
    resnet = load_pretrained_resnet(checkpoint_path)
    config = PretrainConfig.from_dict(Checkpoint.load(checkpoint_path, kind="pretrain", lazy=True).settings,
                                      source=checkpoint_path)
    preprocessing = preprocessing_for(config)
    tensors = {key: value.contiguous() for key, value in resnet.weights.items() if not key.startswith("fc.")}
    described = {
        "architecture": resnet.backbone,
        "small_image_stem": resnet.small_image_stem,   # 3x3 conv1 (stride below), no max-pool
        "stem_stride": config.stem_stride if resnet.small_image_stem else 2,
        # The last block's last batch norm: its width is the pooled feature's.
        "num_features": [v for k, v in tensors.items() if re.fullmatch(r"layer4\.\d+\.bn\d\.weight", k)][-1].numel(),
        # timm's pretrained_cfg fields, so the file's preprocessing travels with it.
        "input_size": [3, preprocessing.input_size, preprocessing.input_size],
        "resize_size": preprocessing.resize_size,
        "crop_pct": round(preprocessing.input_size / preprocessing.resize_size, 4),
        "interpolation": preprocessing.interpolation,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "num_classes": 0,
        "source_checkpoint_sha256": file_digest(checkpoint_path),
        "package_version": __version__,
    }
    ensure_writable_folder(output.parent)
    config_path = output.with_suffix(".json")
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "simsiam_embed": json.dumps(described)})
    write_json_atomic(config_path, described)
    return WeightsExport(output, config_path, len(tensors), resnet.backbone)
