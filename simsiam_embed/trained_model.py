"""A pretraining run's network: built from its settings, and loaded back from its checkpoint.

    >>> model, config = load_trained_model(Path("runs/images/checkpoint.pt"))
    >>> backbone, preprocessing, config = load_trained_backbone(Path("runs/images"))
    >>> run_dir = pretrained_run("imagenet", workspace.runs_dir, report)   # runs/resnet18.IMAGENET1K_V1

Shared by the stages that use a trained encoder (export, embed, kNN evaluation, detection
transfer) and the training that makes it, so none of them depends on another's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from simsiam_embed.artefacts import Checkpoint, RunFolder, resolve_checkpoint_path
from simsiam_embed.errors import Report, UserError
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
            build_backbone(config.backbone, small_images=config.small_image_stem, stem_stride=config.stem_stride,
                           zero_init_residual=config.zero_init_residual),
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
    """The evaluation transform matching how a run's network saw its images: whole when they
    were no larger than its crop (a 32-px picture resized to 37 and centre-cropped to 32 would
    lose a quarter of its area to a crop made for 256-px photos), else the 0.875 centre crop."""
    whole = config.images_within_crop if config.images_within_crop is not None else config.small_image_stem
    return Preprocessing.for_input_size(config.crop_size, whole_image=whole)


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


def pretrained_run(name: str, runs_dir: Path, report: Report, device: str = "cpu") -> Path:
    """A run folder holding torchvision's or timm's pretrained weights ``name`` ("imagenet": the machine's
    default backbone's) with no training at all, so that every stage that takes a run (export,
    embed, index, search, knn) takes them too: index first, adapt later (``pretrain --init``).

    Made once, under ``runs_dir/<exact name>/``, as a finished run of step 0 whose backbone is
    the file's and whose heads are at random init (only the backbone is exported); made again
    when the cached weights file is another. Nothing is marked as the latest run.
    """
    from simsiam_embed.artefacts import run_facts
    from simsiam_embed.files import folder_lock
    from simsiam_embed.pretrained_weights import described, pretrained_weights_file
    from simsiam_embed.resnet_weights import load_resnet_weights, read_resnet_weights
    from simsiam_embed.settings import default_backbone

    path, label, digest = pretrained_weights_file(name, default_backbone("imagenet", device.startswith("cuda")),
                                                  report)
    run = RunFolder(runs_dir / label)
    run.path.mkdir(parents=True, exist_ok=True)
    with folder_lock(run.path, "a pretrained run", report):
        # Made before from this very file: its settings say so, read without its tensors, and
        # the weights file is not read again (each command that names the weights comes here).
        if run.checkpoint.is_file() and run_facts(run.checkpoint, kind="pretrain").settings.get("init_digest") == digest:
            return run.path
        start = read_resnet_weights(path)
        config = PretrainConfig(data_dir="", run_name=label, recipe="imagenet", device=device, backbone=start.backbone,
                                small_image_stem=False, crop_size=224, init=label, init_digest=start.digest)
        torch.manual_seed(config.seed)
        model = build_model(config)
        load_resnet_weights(model.backbone.resnet, start.weights, label)
        Checkpoint(kind="pretrain", settings=config.to_dict(), model=model.state_dict(), step=0, total_steps=0,
                   finished=True).save(run.checkpoint)
        report(f"{run.path}: {described(label)} as a run (no training), for export, embed, index and knn")
    return run.path
