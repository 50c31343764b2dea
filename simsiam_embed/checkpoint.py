"""What a checkpoint holds, written atomically, and how to turn one back into a model.

A checkpoint carries enough to resume bit-for-bit where the hardware allows: the configuration,
the step, the model, optimizer and AMP-scaler states and every random generator's state.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import PretrainConfig
from .data import Preprocessing
from .errors import UserError
from .files import atomic_path
from .models import SimSiam, build_backbone
from .models.backbones import Backbone

FORMAT_VERSION = 1


def build_model(config: PretrainConfig) -> SimSiam:
    """The SimSiam network that ``config`` describes, randomly initialised."""
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


def preprocessing_for(config: PretrainConfig) -> Preprocessing:
    """The evaluation transform matching how a run's network saw its images."""
    return Preprocessing.for_input_size(config.crop_size, small_images=config.small_image_stem)


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    payload = {"format_version": FORMAT_VERSION, "package_version": __version__, **state}
    with atomic_path(path) as tmp_path:
        torch.save(payload, tmp_path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, or explain in one line why not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: run `simsiam-embed pretrain IMAGE_FOLDER` first")
    try:
        # weights_only=False: the checkpoint holds RNG states and plain Python values we wrote.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        raise UserError(f"{path} is not a readable checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"{path} is not a simsiam-embed checkpoint")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer simsiam-embed ({state.get('package_version')}): upgrade")
    return state


def file_digest(path: Path | str) -> str:
    """SHA-256 of a file's bytes, hex: the identity of a checkpoint or an exported encoder."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_trained_model(path: Path | str, random_init: bool = False) -> tuple[SimSiam, PretrainConfig, dict[str, Any]]:
    """A run's network with its trained weights, in eval mode, with its config and raw state.

    ``random_init``: the same network with the weights the run started from instead.
    """
    state = load_checkpoint(path)
    config = PretrainConfig.from_dict(state["config"])
    torch.manual_seed(config.seed)   # as pretraining does, so random_init is the run's own start
    model = build_model(config)
    if random_init:
        return model.eval(), config, state
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{path} does not match its own configuration ({str(error).splitlines()[0]})") from None
    return model.eval(), config, state


def load_trained_backbone(path: Path | str, random_init: bool = False) -> tuple[Backbone, Preprocessing, PretrainConfig]:
    model, config, _ = load_trained_model(path, random_init)
    return model.backbone, preprocessing_for(config), config


def resolve_checkpoint_path(path: Path | str) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path
