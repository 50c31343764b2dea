"""What the stages leave on disk, as types: the only place a file name of a run is written.

    >>> run = RunFolder(Path("runs/images"))
    >>> run.facts().finished, run.facts().data_dir        # no weights read
    >>> checkpoint = Checkpoint.load(run.checkpoint, kind="pretrain")
    >>> metadata = EncoderMetadata.from_props(props, "encoder.onnx")   # every field checked

Artefacts travel between people and machines, so reading one never runs code and every field
is validated with a one-line error that names it: a checkpoint through
``torch.load(weights_only=True)`` (tensors and plain values only), everything else as JSON or
strings. A file an artefact names must lie inside that artefact's folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simsiam_embed import __version__
from simsiam_embed.errors import UserError
from simsiam_embed.files import atomic_path, write_failure
from simsiam_embed.images import Preprocessing
from simsiam_embed.settings import HEADS

# --------------------------------------------------------------------------------------------
# File names: here and nowhere else

CHECKPOINT_FILE = "checkpoint.pt"
#: What a checkpoint file named on the command line may end in (PyTorch's conventions).
CHECKPOINT_SUFFIXES = (".pt", ".pth")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped.jsonl"
ENCODER_FILE = "encoder.onnx"
#: ``export --format safetensors``: the backbone's weights, and its .json beside it.
BACKBONE_WEIGHTS_FILE = "backbone.safetensors"
EVALUATION_FILE = "evaluation.json"
REPORT_PAGE = "report.html"
#: The decoded-image store of a run (training/image_store.py): each training image decoded once.
DECODED_FOLDER = "decoded"
#: TensorBoard's event files, a copy of metrics.jsonl's numbers (when tensorboard is installed).
TENSORBOARD_FOLDER = "tensorboard"
#: In a workspace's runs/ folder: the name of the newest run that has a checkpoint.
LATEST_MARKER = "LATEST"
#: Folder output of ``embed``.
EMBEDDINGS_FILE, PATHS_FILE = "embeddings.npy", "paths.jsonl"
#: ``embed --format parquet``: path, label and embedding columns in one file.
EMBEDDINGS_PARQUET_FILE = "embeddings.parquet"
#: Beside embed's output (and in an index folder): the shards of an embedding under way
#: (inference/shards.py), kept until the files they make are written, so a killed run resumes.
EMBEDDING_SHARDS_DIR = ".embedding"

KINDS = ("pretrain", "detection")


@dataclass(frozen=True)
class RunFacts:
    """What callers ask of a run without loading its weights."""

    kind: str
    step: int
    total_steps: int | None
    finished: bool
    settings: dict[str, Any]

    @property
    def data_dir(self) -> str | None:
        value = self.settings.get("data_dir")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class RunFolder:
    """Every path of a training run (``runs/<name>/``), and its cheap facts."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def skipped(self) -> Path:
        return self.path / SKIPPED_FILE

    @property
    def encoder(self) -> Path:
        return self.path / ENCODER_FILE

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION_FILE

    @property
    def report_page(self) -> Path:
        return self.path / REPORT_PAGE

    @property
    def decoded_images(self) -> Path:
        return self.path / DECODED_FOLDER

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_FOLDER

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def facts(self, kind: str | None = None) -> RunFacts:
        """Kind, step, finished and settings, read without the weights (memory-mapped)."""
        return run_facts(self.checkpoint, kind)

    def read_config(self) -> dict[str, Any]:
        """config.json as a JSON object; empty when missing or not an object."""
        try:
            config = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}


def run_facts(checkpoint: Path, kind: str | None = None) -> "RunFacts":
    """A checkpoint's kind, step, finished and settings; its tensors are mapped, never read."""
    return Checkpoint.load(checkpoint, kind=kind, lazy=True).facts()


def resolve_checkpoint_path(path: Path | str) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return RunFolder(path).checkpoint if path.is_dir() else path


def encoder_path_for(checkpoint: Path) -> Path:
    """Where the encoder exported from ``checkpoint`` lives: a run's ``checkpoint.pt`` -> its
    ``encoder.onnx``; any other checkpoint file ``X.pt`` -> ``X.onnx`` beside it, so exporting
    one checkpoint never overwrites the encoder of another in the same folder."""
    return checkpoint.with_name(ENCODER_FILE) if checkpoint.name == CHECKPOINT_FILE else checkpoint.with_suffix(".onnx")


def exported_encoder_path(checkpoint: Path, head: str = "backbone", precision: str = "fp32") -> Path:
    """``export``'s default output: the run's encoder.onnx, or a named variant beside it
    (``encoder-fp16.onnx``, ``encoder-int8.onnx``, ``encoder-projector.onnx``) so a variant never
    replaces the encoder that ``index`` uses."""
    plain = encoder_path_for(checkpoint)
    suffix = "-".join(part for part in ("projector" if head == "projector" else "",
                                        precision if precision != "fp32" else "") if part)
    return plain.with_name(f"{plain.stem}-{suffix}{plain.suffix}") if suffix else plain


def file_digest(path: Path | str) -> str:
    """SHA-256 of a file's bytes, hex: the identity of a checkpoint or an exported encoder."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The checkpoint

#: 1: numpy's RNG state as an ndarray; 2: every value loadable by the weights-only unpickler,
#: and the ``kind`` of run; 3: the task's own state under ``extra``.
FORMAT_VERSION = 3
#: Fields of every format: what is not one of these (and not under ``extra``) is a task's own.
_COMMON_FIELDS = frozenset({"format_version", "package_version", "kind", "config", "step", "total_steps", "finished",
                            "elapsed_s", "model", "optimizer", "scaler", "rng", "skipped", "extra"})

# Format-1 files hold numpy's RNG state as an ndarray. These are the only globals such a file
# needs beyond torch's own (PyTorch's documented allowlist for numpy arrays); every other global
# (os.system, eval, ...) is still refused, so an old checkpoint loads without running code.
_FORMAT_1_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


@dataclass
class Checkpoint:
    """A training run's state: enough to resume it bit-for-bit where the hardware allows.

    ``settings`` is the run's config (its settings class validates it); ``extra`` is what the
    task adds (a pretraining run's kNN baseline, a detection run's loss history).
    """

    kind: str
    settings: dict[str, Any]
    step: int
    model: dict[str, torch.Tensor]
    finished: bool = False
    total_steps: int | None = None
    elapsed_s: float = 0.0
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__

    def facts(self) -> RunFacts:
        return RunFacts(self.kind, self.step, self.total_steps, self.finished, self.settings)

    def _payload(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "package_version": __version__, "kind": self.kind,
                "config": self.settings, "step": self.step, "total_steps": self.total_steps,
                "finished": self.finished, "elapsed_s": self.elapsed_s, "model": self.model,
                "optimizer": self.optimizer, "scaler": self.scaler, "rng": self.rng, "skipped": self.skipped,
                "extra": self.extra}

    def save(self, path: Path) -> int:
        """Write atomically: a crash mid-write leaves the previous checkpoint intact. Returns the size.

        Serialised in memory first, then written as bytes: torch.save's own file writer reports a
        full disk as ``RuntimeError: basic_ios::clear``, where Python's says ENOSPC (one line).
        """
        with atomic_path(path) as tmp_path:
            buffer = io.BytesIO()
            torch.save(self._payload(), buffer)
            data = buffer.getvalue()
            with open(tmp_path, "wb") as handle:
                handle.write(data)
        return len(data)

    @classmethod
    def load(cls, path: Path | str, kind: str | None = None, lazy: bool = False) -> "Checkpoint":
        """Read a checkpoint, or explain in one line why not. Never runs code from the file.

        ``kind``: the kind of run the caller can use; another kind is refused. ``lazy``: map the
        tensors instead of reading them (for facts that need no weights).
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no checkpoint at {path}: run `simsiam-embed pretrain IMAGE_FOLDER` first")
        try:
            with torch.serialization.safe_globals(_FORMAT_1_GLOBALS):
                try:
                    state = load_torch_data(path, mmap=lazy)
                except RuntimeError as error:
                    if not (lazy and "mmap" in str(error)):
                        raise
                    # Only zip-format files map; anything else is read whole (and judged) instead.
                    state = load_torch_data(path)
        except pickle.UnpicklingError as error:
            refused = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
            raise UserError(f"{path} holds more than tensors and plain values ({refused or 'code objects'}), so it "
                            "was not loaded: a simsiam-embed checkpoint never does; do not use this file") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"{path} is not a readable checkpoint ({reason[:200]})") from None
        checkpoint = cls._from_state(path, state)
        if kind is not None and checkpoint.kind != kind:
            wanted = "a pretraining run (`simsiam-embed pretrain`)" if kind == "pretrain" else "a detection run"
            raise UserError(f"{path} is a {checkpoint.kind} checkpoint; this needs {wanted}")
        return checkpoint

    @classmethod
    def _from_state(cls, path: Path, state: Any) -> "Checkpoint":
        """Each field every reader relies on, with its type, or a one-line error naming it."""
        if not isinstance(state, dict) or "format_version" not in state:
            raise UserError(f"{path} is not a simsiam-embed checkpoint")

        def field_of(name: str, types: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
            if name not in state or (state[name] is None and not required):
                if required:
                    raise UserError(f"{path} is damaged: it has no field {name!r}")
                return default
            value = state[name]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                expected = " or ".join(t.__name__ for t in types)
                raise UserError(f"{path} is damaged: its field {name!r} is {type(value).__name__}, not {expected}")
            return value

        version = field_of("format_version", (int,), required=True)
        if version > FORMAT_VERSION:
            raise UserError(f"{path} was written by a newer simsiam-embed ({state.get('package_version')}): upgrade")
        kind = field_of("kind", (str,), "pretrain")   # format 1 had no kind; only pretraining wrote it then
        if kind not in KINDS:
            raise UserError(f"{path} is damaged: its field 'kind' is {kind!r}, not one of {', '.join(KINDS)}")
        step = field_of("step", (int,), required=True)
        model = field_of("model", (dict,), required=True)
        if step < 0 or not all(isinstance(v, torch.Tensor) for v in model.values()):
            raise UserError(f"{path} is damaged: its field 'step' or 'model' holds values a checkpoint never has")
        total_steps = field_of("total_steps", (int,))
        if total_steps is not None and total_steps < 0:
            raise UserError(f"{path} is damaged: its field 'total_steps' is {total_steps}")
        elapsed = float(field_of("elapsed_s", (int, float), 0.0))
        if not math.isfinite(elapsed) or elapsed < 0:
            raise UserError(f"{path} is damaged: its field 'elapsed_s' is {elapsed}")
        skipped = field_of("skipped", (dict,), {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in skipped.items()):
            raise UserError(f"{path} is damaged: its field 'skipped' is not a map of file names to reasons")
        extra = field_of("extra", (dict,), None)
        if extra is None:   # formats 1-2 kept the task's fields beside the common ones
            extra = {key: value for key, value in state.items() if key not in _COMMON_FIELDS}
        return cls(kind=kind, settings=field_of("config", (dict,), required=True), step=step, model=model,
                   finished=field_of("finished", (bool,), required=True), total_steps=total_steps, elapsed_s=elapsed,
                   optimizer=field_of("optimizer", (dict,)), scaler=field_of("scaler", (dict,)),
                   rng=field_of("rng", (dict,)), skipped=dict(skipped), extra=extra,
                   package_version=str(state.get("package_version", "")))


def load_torch_data(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` of tensors and plain values only: a file that holds code is refused by
    PyTorch's restricted unpickler (``pickle.UnpicklingError``), never run. On the CPU."""
    with warnings.catch_warnings():
        # Which pickle protocol wrote a file tells the user nothing; one the restricted unpickler
        # cannot read is refused with its own message.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def check_space_for(path: Path, size: int) -> None:
    """Refuse before training when the folder cannot take the run's checkpoints of ``size`` bytes.

    An atomic replace keeps the previous checkpoint until the new one is complete, so from the
    second save on the folder holds two: the free space must take a new one beside the one that
    will be there (none yet, or the checkpoint already on disk, whose bytes are not free), with a
    margin for the metrics and the lists beside it. Checking for one copy let a run with room for
    one train to its end and fail there (issue 27).
    """
    free = shutil.disk_usage(path.parent).free
    existing = path.stat().st_size if path.is_file() else 0
    needed = int(2 * size * 1.1) - existing + (1 << 20)
    if free < needed:
        raise write_failure(path, OSError(28, f"{free / 2**20:.1f} MiB free, checkpoints need about "
                                              f"{needed / 2**20:.1f} MiB (the previous one is kept until "
                                              "the next is written)"))


# --------------------------------------------------------------------------------------------
# An exported encoder's metadata (the ONNX file's metadata_props)

ENCODER_METADATA_FORMAT = "simsiam-embed.encoder/1"
#: Resize rules a consumer may apply (torchvision's InterpolationMode values).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
MAX_INPUT_SIZE = 8192
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EncoderMetadata:
    """What an exported encoder carries so that a consumer needs nothing else (as timm's models
    carry their data config): its preprocessing, its output and where it came from."""

    preprocessing: Preprocessing
    embedding_dim: int
    head: str = "backbone"
    precision: str = "fp32"
    backbone: str = ""
    source_checkpoint_sha256: str = ""
    package_version: str = __version__

    def to_props(self) -> dict[str, str]:
        p = self.preprocessing
        return {
            "format": ENCODER_METADATA_FORMAT, "input_size": str(p.input_size), "resize_size": str(p.resize_size),
            "resize_rule": "shorter side to resize_size, then centre crop input_size",
            "interpolation": p.interpolation, "mean": json.dumps(list(p.mean)), "std": json.dumps(list(p.std)),
            "embedding_dim": str(self.embedding_dim), "head": self.head, "precision": self.precision,
            "backbone": self.backbone, "source_checkpoint_sha256": self.source_checkpoint_sha256,
            "package_version": self.package_version, "normalize_output": "l2",
        }

    @classmethod
    def from_props(cls, props: dict[str, str], path: Path | str = "the encoder") -> "EncoderMetadata":
        if props.get("format") != ENCODER_METADATA_FORMAT:
            raise UserError(f"{path} was not exported by simsiam-embed (run `simsiam-embed export`)")
        return cls(
            preprocessing=preprocessing_from_props(props, path),
            embedding_dim=_prop_int(props, "embedding_dim", path, 1, 1 << 20),
            head=_prop_choice(props, "head", path, HEADS, "backbone"),
            precision=_prop_choice(props, "precision", path, PRECISIONS, "fp32"),
            backbone=props.get("backbone", ""),
            source_checkpoint_sha256=props.get("source_checkpoint_sha256", ""),
            package_version=props.get("package_version", ""),
        )


def preprocessing_from_props(props: dict[str, str], path: Path | str = "the encoder") -> Preprocessing:
    """The encoder's preprocessing, each field validated."""
    input_size = _prop_int(props, "input_size", path, 1, MAX_INPUT_SIZE)
    resize_size = _prop_int(props, "resize_size", path, input_size, 4 * MAX_INPUT_SIZE)
    if props.get("interpolation") not in INTERPOLATIONS:
        raise UserError(f"{path}: its metadata field 'interpolation' is {props.get('interpolation')!r}, "
                        f"not one of {', '.join(INTERPOLATIONS)}: export the encoder again")
    return Preprocessing(input_size=input_size, resize_size=resize_size,
                         mean=_prop_triple(props, "mean", path, positive=False),
                         std=_prop_triple(props, "std", path, positive=True),
                         interpolation=props["interpolation"])


def _prop_int(props: dict[str, str], name: str, path: Path | str, low: int, high: int) -> int:
    try:
        value = int(props.get(name, ""))
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise UserError(f"{path}: its metadata field {name!r} is {props.get(name)!r}, not a whole number "
                        f"in {low}..{high}: export the encoder again")
    return value


def _prop_choice(props: dict[str, str], name: str, path: Path | str, allowed: tuple[str, ...], default: str) -> str:
    value = props.get(name, default)
    if value not in allowed:
        raise UserError(f"{path}: its metadata field {name!r} is {value!r}, not one of {', '.join(allowed)}: "
                        "export the encoder again")
    return value


def _prop_triple(props: dict[str, str], name: str, path: Path | str, positive: bool) -> tuple[float, ...]:
    try:
        values = json.loads(props.get(name, ""))
    except ValueError:
        values = None
    if not (isinstance(values, list) and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            and (not positive or all(v > 0 for v in values))):
        raise UserError(f"{path}: its metadata field {name!r} is {props.get(name)!r}, not three finite "
                        f"{'positive ' if positive else ''}numbers: export the encoder again")
    return tuple(float(v) for v in values)


# --------------------------------------------------------------------------------------------
# A metrics record (one line of metrics.jsonl)


@dataclass(frozen=True)
class MetricsRecord:
    """One line of ``metrics.jsonl``: the step it was logged at and its finite numbers and flags."""

    step: int
    values: dict[str, float | bool]

    def get(self, key: str) -> float | None:
        value = self.values.get(key)
        return None if value is None or isinstance(value, bool) else float(value)

    def has(self, key: str) -> bool:
        return key in self.values


def read_metrics(path: Path) -> list[MetricsRecord]:
    """Every record of a metrics log. A torn last line (a run killed mid-write), a line that is
    not a JSON object or has no whole-number step is left out; so is every value that is not a
    finite number or a flag."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(raw, dict):
            continue
        step = raw.get("step")
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            continue
        values = {key: value for key, value in raw.items() if key != "step" and _is_metric(value)}
        records.append(MetricsRecord(step, values))
    return records


def _is_metric(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (int, float)) and math.isfinite(value)
