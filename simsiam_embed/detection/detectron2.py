"""A SimSiam backbone in detectron2's weight format: the MoCo/SimSiam detection recipe's conversion.

    >>> export_detectron2("runs/photos", Path("simsiam_r50.pkl"))

detectron2 names a ResNet's parts ``stem.conv1``, ``res2`` ... ``res5`` and calls each BN
``convN.norm``; this is the key mapping of MoCo's ``convert-pretrain-to-detectron2.py``, which
the SimSiam paper's detection experiments use. The weights are torchvision's ResNet (stride in
the 3x3 convolution, RGB input in [0, 255] normalised by ImageNet's mean and std), so the
detectron2 config must say so: the settings printed by :data:`DETECTRON2_SETTINGS`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from simsiam_embed.detection.finetune import simsiam_backbone_weights
from simsiam_embed.files import atomic_write

#: What detectron2 must be told to read these weights as they were trained (as in MoCo's configs).
DETECTRON2_SETTINGS = (
    "MODEL.WEIGHTS {path} INPUT.FORMAT RGB MODEL.PIXEL_MEAN [123.675,116.280,103.530] "
    "MODEL.PIXEL_STD [58.395,57.120,57.375] MODEL.RESNETS.STRIDE_IN_1X1 False MODEL.RESNETS.DEPTH {depth}"
)


def detectron2_key(torchvision_key: str) -> str:
    """``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``; ``bn1.bias`` -> ``stem.conv1.norm.bias``."""
    key = torchvision_key
    if "layer" not in key:
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for number in (1, 2, 3):
        key = key.replace(f"bn{number}", f"conv{number}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


def detectron2_state(weights: dict) -> dict:
    """numpy arrays under detectron2's names; BN batch counters are not weights and are dropped."""
    return {detectron2_key(key): value.cpu().numpy() for key, value in weights.items()
            if not key.endswith("num_batches_tracked") and not key.startswith("fc.")}


def export_detectron2(checkpoint: Path | str, output: Path) -> tuple[int, str]:
    """Write ``output`` (a detectron2 ``.pkl``) from a SimSiam run; returns (tensor count, the
    detectron2 settings to use with it). Written atomically."""
    weights, backbone = simsiam_backbone_weights(checkpoint)
    state = detectron2_state(weights)
    payload = {"model": state, "__author__": "simsiam-embed", "matching_heuristics": True}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(output, "wb") as handle:
        pickle.dump(payload, handle)
    depth = int(backbone.removeprefix("resnet"))
    return len(state), DETECTRON2_SETTINGS.format(path=output, depth=depth)
