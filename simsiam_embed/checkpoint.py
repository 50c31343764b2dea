"""What a checkpoint holds, written atomically, and how to turn one back into a model.

A checkpoint carries enough to resume bit-for-bit where the hardware allows: the configuration,
the step, the model, optimizer and AMP-scaler states and every random generator's state.

Checkpoints travel between people and machines, so reading one never runs code: every load
goes through ``torch.load(weights_only=True)``, whose unpickler accepts tensors and plain
Python values only, and everything in the file is held in those types (the RNG states too).
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

#: 1: numpy's RNG state as an ndarray; 2: every value loadable by the weights-only unpickler,
#: and the ``kind`` of run that wrote it.
FORMAT_VERSION = 2
KINDS = ("pretrain", "detection")

# Format-1 files hold numpy's RNG state as an ndarray. These are the only globals such a file
# needs beyond torch's own (PyTorch's documented allowlist for numpy arrays); every other global
# (os.system, eval, ...) is still refused, so an old checkpoint loads without running code.
_FORMAT_1_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


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
    """Every generator's state as tensors and plain values (what ``weights_only`` loads)."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        np.random.set_state((numpy_state["bit_generator"], numpy_state["keys"].numpy().astype(np.uint32),
                             numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    else:   # format 1
        np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    payload = {"format_version": FORMAT_VERSION, "package_version": __version__, **state}
    with atomic_path(path) as tmp_path:
        torch.save(payload, tmp_path)


def load_checkpoint(path: Path | str, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, or explain in one line why not.

    Never runs code from the file (see the module's docstring). ``kind``: the kind of run the
    caller can use ("pretrain" or "detection"); a checkpoint of another kind is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: run `simsiam-embed pretrain IMAGE_FOLDER` first")
    try:
        with torch.serialization.safe_globals(_FORMAT_1_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
        raise UserError(f"{path} holds more than tensors and plain values ({refused or 'code objects'}), so it "
                        "was not loaded: a simsiam-embed checkpoint never does; do not use this file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable checkpoint ({reason[:200]})") from None
    _check_fields(path, state)
    written_by = state.get("kind", "pretrain")   # format 1 had no kind; only pretraining wrote it then
    if kind is not None and written_by != kind:
        wanted = "a pretraining run (`simsiam-embed pretrain`)" if kind == "pretrain" else "a detection run"
        raise UserError(f"{path} is a {written_by} checkpoint; this needs {wanted}")
    return state


def _check_fields(path: Path, state: Any) -> None:
    """The fields every reader relies on, each with its type, or a one-line error naming it."""
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"{path} is not a simsiam-embed checkpoint")
    expected = {"format_version": int, "config": dict, "model": dict, "step": int, "finished": bool}
    for name, kind in expected.items():
        value = state.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise UserError(f"{path} is damaged: its field {name!r} is {type(value).__name__}, not {kind.__name__}")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer simsiam-embed ({state.get('package_version')}): upgrade")
    if state.get("kind", "pretrain") not in KINDS:
        raise UserError(f"{path} is damaged: its field 'kind' is {state.get('kind')!r}, not one of {', '.join(KINDS)}")
    if state["step"] < 0 or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise UserError(f"{path} is damaged: its field 'step' or 'model' holds values a checkpoint never has")


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
    state = load_checkpoint(path, kind="pretrain")
    config = PretrainConfig.from_dict(state["config"], source=path)
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
