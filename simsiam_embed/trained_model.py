"""A pretraining run's network: built from its settings, and loaded back from its checkpoint.

    >>> model, config = load_trained_model(Path("runs/images/checkpoint.pt"))
    >>> backbone, preprocessing, config = load_trained_backbone(Path("runs/images"))

Shared by the stages that use a trained encoder (export, embed, kNN evaluation, detection
transfer) and the training that makes it, so none of them depends on another's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from simsiam_embed.artefacts import Checkpoint, resolve_checkpoint_path
from simsiam_embed.errors import UserError
from simsiam_embed.images import Preprocessing
from simsiam_embed.models import SimSiam, build_backbone
from simsiam_embed.models.backbones import Backbone
from simsiam_embed.settings import PretrainConfig


def build_model(config: PretrainConfig) -> SimSiam:
    """The SimSiam network that ``config`` describes, randomly initialised.

    A network too large for this machine's memory is a one-line error, not an allocator's traceback.
    """
    try:
        return SimSiam(
            build_backbone(config.backbone, small_images=config.small_image_stem, stem_stride=config.stem_stride),
            projector_layers=config.projector_layers,
            projector_hidden_dim=config.projector_hidden_dim,
            dim=config.dim,
            predictor_hidden_dim=config.predictor_hidden_dim,
            heads_batch_norm=config.heads_batch_norm,
            use_predictor=config.use_predictor,
            stop_gradient=config.stop_gradient,
        )
    except (RuntimeError, MemoryError) as error:   # PyTorch's allocator raises RuntimeError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"the network does not fit in this machine's memory ({reason[:160]}): lower --dim, "
                        "--projector-hidden-dim or --predictor-hidden-dim") from None


def preprocessing_for(config: PretrainConfig) -> Preprocessing:
    """The evaluation transform matching how a run's network saw its images."""
    return Preprocessing.for_input_size(config.crop_size, small_images=config.small_image_stem)


def load_trained_model(path: Path | str, random_init: bool = False) -> tuple[SimSiam, PretrainConfig]:
    """A run's network (a run folder or checkpoint) with its trained weights, in eval mode, and its config.

    ``random_init``: the same network with the weights the run started from instead.
    """
    path = resolve_checkpoint_path(path)
    checkpoint = Checkpoint.load(path, kind="pretrain")
    config = PretrainConfig.from_dict(checkpoint.settings, source=path)
    torch.manual_seed(config.seed)   # as pretraining does, so random_init is the run's own start
    model = build_model(config)
    if random_init:
        return model.eval(), config
    try:
        model.load_state_dict(checkpoint.model)
    except RuntimeError as error:
        raise UserError(f"{path} does not match its own configuration ({str(error).splitlines()[0]})") from None
    return model.eval(), config


def load_trained_backbone(path: Path | str, random_init: bool = False) -> tuple[Backbone, Preprocessing, PretrainConfig]:
    model, config = load_trained_model(path, random_init)
    return model.backbone, preprocessing_for(config), config


@dataclass(frozen=True)
class PretrainedResNet:
    """A run's backbone as plain torchvision ResNet weights, for transfer (detection)."""

    weights: dict[str, torch.Tensor]   # torchvision names, no classifier
    backbone: str                      # resnet18 / resnet34 / resnet50
    small_image_stem: bool


def load_pretrained_resnet(path: Path | str) -> PretrainedResNet:
    """The ResNet inside a pretraining run, under torchvision's names (SimSiam's prefix removed)."""
    path = resolve_checkpoint_path(path)
    checkpoint = Checkpoint.load(path, kind="pretrain")
    config = PretrainConfig.from_dict(checkpoint.settings, source=path)
    prefix = "backbone.resnet."   # SimSiam.backbone is a Backbone, which wraps a torchvision ResNet
    weights = {key[len(prefix):]: value for key, value in checkpoint.model.items() if key.startswith(prefix)}
    if not weights:
        raise UserError(f"{path} holds no SimSiam backbone weights")
    return PretrainedResNet(weights, config.backbone, config.small_image_stem)
