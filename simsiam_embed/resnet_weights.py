"""ResNet weights from the files users already have, under torchvision's names: a torchvision
state dict (``.pth``/``.pt``), a safetensors file in timm's or Hugging Face's naming, or a
simsiam-embed run. Pretraining starts from them (``pretrain --init``) and detection fine-tunes
from them (``finetune-detection --checkpoint``).

    >>> start = read_resnet_weights(Path("resnet50-0676ba61.pth"))
    >>> start.backbone, len(start.weights)          # ('resnet50', 318)
    >>> loaded, left = load_resnet_weights(resnet, start.weights, "resnet50-0676ba61.pth")

Files from others are data: tensors only (``torch.load(weights_only=True)`` or safetensors), every
name mapped or ignored, every shape checked against the network before anything is copied.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from simsiam_embed.artefacts import CHECKPOINT_FILE, file_digest, load_torch_data
from simsiam_embed.errors import UserError

#: Blocks per stage -> torchvision name, for the two block types.
_BASIC_BLOCK_DEPTHS = {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"}
_BOTTLENECK_DEPTHS = {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152"}
#: Wrappers other code puts around a ResNet's own names (DDP, Lightning, MoCo/SimSiam scripts, timm wrappers).
_PREFIXES = ("module.", "model.", "encoder.", "backbone.resnet.", "backbone.", "resnet.", "base_encoder.")
#: The stem: what a small-image network (3x3, stride 1) cannot take from a 7x7 one; left at random init.
STEM_KEYS = ("conv1.weight",)


@dataclass(frozen=True)
class ResNetWeights:
    weights: dict[str, torch.Tensor]   # torchvision names, classifier dropped
    backbone: str                      # resnet18, resnet34, resnet50, ...
    source: str                        # what the file was, for the report
    digest: str                        # the file's content digest, recorded in the run's settings
    small_image_stem: bool = False


def read_resnet_weights(path: Path | str) -> ResNetWeights:
    """The ResNet weights in ``path`` (a file, or a run folder), or a one-line error saying why not."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"no weights file at {path}: give a .pth, .safetensors or a simsiam-embed run")
    if path.suffix == ".safetensors":
        tensors, source = _read_safetensors(path), "safetensors"
    else:
        tensors, source = _read_torch_file(path)
        if tensors is None:   # a simsiam-embed checkpoint
            from simsiam_embed.trained_model import load_pretrained_resnet

            run = load_pretrained_resnet(path)
            _refuse_non_finite(run.weights, path)   # a run never saves them, but a file can be edited
            return ResNetWeights(run.weights, run.backbone, "a simsiam-embed run", file_digest(path), run.small_image_stem)
    weights = torchvision_names(tensors)
    if "layer1.0.conv1.weight" not in weights:
        sample = ", ".join(list(tensors)[:3])
        raise UserError(f"{path} holds no ResNet weights that this can read (its names begin {sample[:120]}): give "
                        "a torchvision or timm ResNet state dict, or a Hugging Face ResNet in safetensors")
    _refuse_non_finite(weights, path)
    backbone = resnet_name(weights, path)
    stem = weights.get("conv1.weight")
    small = stem is not None and stem.shape[-1] == 3
    return ResNetWeights(weights, backbone, source, file_digest(path), small)


def _refuse_non_finite(weights: dict[str, torch.Tensor], path: Path) -> None:
    """NaN or infinite weights would train to NaN at once, and the run would blame its learning rate."""
    bad = [key for key, value in weights.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise UserError(f"{path} holds NaN or infinite weights ({len(bad)} tensors, first {bad[0]}), so it was not "
                        "loaded: the file is damaged, or was saved from a run that diverged; use another")


def _read_torch_file(path: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    try:
        state = load_torch_data(path)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds more than tensors and plain values, so it was not loaded: save the state "
                        "dict alone (torch.save(model.state_dict(), ...)) or use safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable weights file ({reason[:160]})") from None
    if isinstance(state, dict) and "format_version" in state:
        return None, "a simsiam-embed run"
    # Training scripts often wrap the weights: {"state_dict": ...} (Lightning, MoCo) or {"model": ...}.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}, "a PyTorch state dict"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError("reading .safetensors needs the safetensors package: pip install 'simsiam-embed[interop]'") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({str(error)[:160]})") from None


def torchvision_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under torchvision's ResNet names: wrappers' prefixes removed, Hugging Face's
    ``ResNetModel`` names mapped, the classifier and anything else dropped."""
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        mapped = _huggingface_name(name) or _without_prefixes(name)
        if mapped is not None and _is_resnet_name(mapped):
            renamed[mapped] = tensor
    return renamed


def _without_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


_HF_STEM = re.compile(r"(?:resnet\.)?embedder\.embedder\.(convolution|normalization)\.(.+)")
_HF_BLOCK = re.compile(r"(?:resnet\.)?encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:(shortcut)|layer\.(\d+))\."
                       r"(convolution|normalization)\.(.+)")


def _huggingface_name(name: str) -> str | None:
    """transformers' ResNetModel -> torchvision: embedder = conv1/bn1; stage s, layer b, its
    i-th conv = layer{s+1}.{b}.conv{i+1} (bn{i+1}); the shortcut = downsample.0/.1."""
    stem = _HF_STEM.fullmatch(name)
    if stem:
        return ("conv1." if stem.group(1) == "convolution" else "bn1.") + stem.group(2)
    block = _HF_BLOCK.fullmatch(name)
    if not block:
        return None
    stage, layer, shortcut, index, kind, rest = block.groups()
    prefix = f"layer{int(stage) + 1}.{layer}."
    if shortcut:
        return prefix + ("downsample.0." if kind == "convolution" else "downsample.1.") + rest
    return prefix + ("conv" if kind == "convolution" else "bn") + f"{int(index) + 1}." + rest


def _is_resnet_name(name: str) -> bool:
    return bool(re.fullmatch(r"(conv1|bn1)\.\w+|layer[1-4]\.\d+\.(conv\d|bn\d|downsample\.[01])\.\w+", name))


def resnet_name(weights: dict[str, torch.Tensor], source: Path | str) -> str:
    """Which torchvision ResNet these weights are, from their blocks per stage and block type."""
    depths = tuple(len({key.split(".")[1] for key in weights if key.startswith(f"layer{stage}.")}) for stage in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in weights
    name = (_BOTTLENECK_DEPTHS if bottleneck else _BASIC_BLOCK_DEPTHS).get(depths)
    if name is None:
        raise UserError(f"{source} is a ResNet with {depths} blocks per stage, which is none of resnet18, resnet34 "
                        "or resnet50")
    return name


def load_resnet_weights(resnet: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path | str,
                        network: str = "this network", allow_other_stem: bool = False) -> tuple[int, list[str]]:
    """Copy ``weights`` (torchvision names) into a torchvision ``resnet``; returns how many tensors
    were loaded and which were left at their random init. Every tensor must fit, except
    (``allow_other_stem``) the first convolution, which a small-image network cannot take from a
    7x7 stem or the other way round; a batch-norm step counter may be missing on either side."""
    target = resnet.state_dict()
    wanted = [key for key in target if not key.startswith("fc.")]
    left = [key for key in wanted if key not in weights or weights[key].shape != target[key].shape]
    refused = [key for key in left
               if not (allow_other_stem and key in STEM_KEYS) and not key.endswith("num_batches_tracked")]
    if refused:
        key = refused[0]
        found = tuple(weights[key].shape) if key in weights else "nothing"
        raise UserError(f"{source} does not fit {network} ({len(refused)} tensors differ; {key}: {found} where "
                        f"{tuple(target[key].shape)} is needed): give the same ResNet, or pass the matching --backbone")
    resnet.load_state_dict({key: weights[key] for key in wanted if key not in left}, strict=False)
    return len(wanted) - len(left), [key for key in left if not key.endswith("num_batches_tracked")]
