"""Pretraining settings: one dataclass, and the rules that fill it from the data and the hardware.

Every default is the paper's (Chen & He 2021; official code github.com/facebookresearch/simsiam)
unless the data says otherwise: folders of small images (<= 64 px) get the paper's CIFAR recipe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simsiam_embed.errors import UserError
from simsiam_embed.typed_json import has_type, type_name

SMALL_IMAGE_MAX_SIDE = 64
IMAGENET_SIZE = 1_281_167

#: The paper's two recipes as data: what each sets (Section 4 for ImageNet, Appendix D for
#: CIFAR-10). Settings of neither recipe are PretrainConfig's own defaults (the paper's, shared).
#: resolve_pretrain_config adapts epochs, batch, crop and backbone to the folder and the
#: hardware, and records why (ADAPTED_DEFAULTS says how, for --help).
RECIPE_SETTINGS: dict[str, dict[str, Any]] = {
    "imagenet": dict(backbone="resnet50", small_image_stem=False, crop_size=224, base_lr=0.05, weight_decay=1e-4,
                     projector_layers=3, blur=True, epochs=100, batch_size=512),
    "cifar": dict(backbone="resnet18", small_image_stem=True, crop_size=32, base_lr=0.03, weight_decay=5e-4,
                  projector_layers=2, blur=False, epochs=800, batch_size=512),
}
RECIPES = tuple(RECIPE_SETTINGS)
#: A warm start (--init) continues at this share of the recipe's base lr: hierarchical
#: pretraining (Reed et al., WACV 2022) adapts a pretrained network to new images with a lower lr,
#: so that the first steps do not undo what it brought. The share was chosen against a stand-in
#: pretrained network (bench/RESULTS.md, "Warm starts").
WARM_START_LR_SHARE = 0.3
_PAPER = RECIPE_SETTINGS["imagenet"]

#: How a default follows the data or the hardware, as --help says it (the rules are in
#: resolve_pretrain_config below, default_amp and default_loader_workers).
ADAPTED_DEFAULTS = {
    "recipe": "cifar if the median image side is <= 64 px, else imagenet",
    "backbone": "resnet50 on a GPU, resnet18 on a CPU; cifar resnet18",
    "crop_size": "224, or the images' median side if smaller; cifar the images' side up to 64",
    "batch_size": "512 on GPUs (less if their memory does not fit it), 256 on a CPU; at most the folder's size",
    "epochs": "100 on ImageNet's 1.28M images, more for smaller folders (up to 800); cifar 800",
    "amp": "bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs, else off",
    "num_workers": "the CPU cores / the processes on this machine",
    "device": "cuda if available",
    "base_lr": (f"{RECIPE_SETTINGS['imagenet']['base_lr']:g}, cifar {RECIPE_SETTINGS['cifar']['base_lr']:g}; "
                f"{WARM_START_LR_SHARE:g}x that with --init"),
    "small_crop_size": "96/224 of the crop (SwAV's ratio), at least 8 px",
}
#: torchvision ResNets the backbone may be (models/backbones.py builds them).
BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50")

# --------------------------------------------------------------------------------------------
# Choices and defaults of the stages after pretraining: here, so that `--help` shows them
# without loading PyTorch (each stage's module says why it chose them).

#: Embedding (embed, index, kNN, search): images per forward pass, and decoding processes.
EMBED_BATCH_SIZE = 64
EMBED_WORKERS = 2   # where the encoder runs on the CPU: see embed_workers
#: The recall@10 an approximate index is tuned to unless the user asks for another (index/tuning.py).
DEFAULT_RECALL = 0.95
#: What `embed` writes: embeddings.npy + paths.jsonl, or embeddings.parquet.
EMBED_FORMATS = ("npy", "parquet")
#: ONNX export: the parity bar of every fp32 export, ONNX Runtime and PyTorch must agree this
#: closely; fp16 keeps about 3 significant digits, and through ~50 layers its features stay this close.
#: What an exported encoder outputs: pooled backbone features, or the SimSiam projection z.
HEADS = ("backbone", "projector")
MIN_COSINE_FP32 = 0.9999
MIN_COSINE_FP16 = 0.999
#: An int8 export's bar: each image's 10 nearest neighbours (among real images) as fp32 finds
#: them, this share on average. Cosine alone says little of what int8 changes for retrieval.
MIN_NEIGHBOUR_OVERLAP_INT8 = 0.95
#: Encoder precisions `embed` and `index` take (`--precision`); auto: embed_precision below.
EMBED_PRECISIONS = ("auto", "fp32", "fp16", "int8")
#: Images from which `embed` and `index` quantise the encoder to int8 on a CPU with int8 dot
#: products: quantising and its neighbour check cost about a minute for a ResNet-50 at 224 px on 2
#: cores, which int8's 2.85x images/s (bench/RESULTS.md) wins back after ~1,600 images.
INT8_MIN_IMAGES = 5_000
#: kNN evaluation: (k, temperature) pairs reported by default: the InstDisc setting and solo-learn's.
KNN_SETTINGS = ((200, 0.1), (20, 0.07))
#: dedup: the calibrated default rule (explore/duplicates.py explains the calibration).
CANDIDATE_THRESHOLD = 0.8
#: With geometric verification (OpenCV installed): candidates from this centred cosine, each
#: confirmed by local features; lower than the pixel check's, since the verifier gives precision.
GEOMETRY_THRESHOLD = 0.7
SMALL_PICTURE_THRESHOLD = 0.93
SMALL_PICTURE_SIDE = SMALL_IMAGE_MAX_SIDE
UNCHECKED_THRESHOLD = 0.95
DUPLICATE_NEIGHBOURS = 10
OUTLIER_NEIGHBOURS = 10
PLANS = ("keep-original", "keep-largest", "keep-oldest", "keep-first")
MAP_MAX_POINTS = 5_000
#: detection fine-tuning.
NORMS = ("frozen", "bn", "syncbn")
INITS = ("simsiam", "random")
SCHEDULES = ("step", "cosine")
#: No setting of a network read from a file may exceed this (a tampered file must not allocate terabytes).
MAX_WIDTH = 65_536


class SavedSettings:
    """A settings dataclass as the JSON of a run folder; fields from a newer version are ignored.

    Settings come back from files that may have been edited or received, so every field is
    checked against its declared type on the way in, with a one-line error naming it.
    """

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Path | str = "the saved settings"):
        if not isinstance(values, dict):
            raise UserError(f"{source}: the settings are {type(values).__name__}, not an object")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {key: value for key, value in values.items() if key in known}
        for key, value in kept.items():
            if not has_type(value, hints[key]):
                raise UserError(f"{source} is damaged: its setting {key!r} is {value!r}, not {type_name(hints[key])}")
        try:
            return cls(**kept)
        except TypeError as error:   # a required field is missing
            raise UserError(f"{source} is damaged: {error}") from None


@dataclass
class PretrainConfig(SavedSettings):
    """Every resolved setting of a pretraining run; saved as the run's config.json.

    Built directly, it holds the paper's ImageNet recipe (RECIPE_SETTINGS) and this machine's
    precision and loader; ``resolve_pretrain_config`` is what adapts it to a folder and records why.
    """

    data_dir: str
    run_name: str
    recipe: str = "imagenet"
    backbone: str = _PAPER["backbone"]
    small_image_stem: bool = _PAPER["small_image_stem"]
    stem_stride: int = 1
    # Each residual block's last batch norm starts at zero (the official SimSiam code's init);
    # False: torchvision's own init (lightly's). bench/RESULTS.md, "As fast per pair", compares.
    zero_init_residual: bool = True
    crop_size: int = _PAPER["crop_size"]
    # Length: epochs, or a time budget that becomes a fixed number of steps after a warm-up.
    epochs: int | None = _PAPER["epochs"]
    time_budget_s: float | None = None
    total_steps: int | None = None
    batch_size: int = _PAPER["batch_size"]
    base_lr: float = _PAPER["base_lr"]
    weight_decay: float = _PAPER["weight_decay"]
    momentum: float = 0.9
    fix_predictor_lr: bool = True
    dim: int = 2048
    projector_layers: int = _PAPER["projector_layers"]
    projector_hidden_dim: int = 2048
    predictor_hidden_dim: int = 512
    blur: bool = _PAPER["blur"]
    min_crop_scale: float = 0.2
    color_jitter: float = 0.4   # brightness, contrast and saturation strength; hue is a quarter of it
    warmup_fraction: float = 0.0   # share of the steps with a linear lr warm-up (the paper has none)
    # Multi-crop (SwAV, DINO; not in the paper): small extra views a sample, each predicting both
    # full views; 0 is the paper's two views. Their side: SwAV's 96/224 of the crop unless given.
    small_views: int = 0
    small_crop_size: int | None = None
    # Progressive resizing (fast.ai, FFCV; not in the paper): crops start at this side and grow
    # to crop_size over the schedule (training/pretrain.py: progressive_side); None: one size.
    start_crop_size: int | None = None
    # The paper's ablations (Table 1, Figure 2, Table 4); all on by default, as SimSiam is.
    stop_gradient: bool = True
    use_predictor: bool = True
    symmetric_loss: bool = True
    heads_batch_norm: bool = True
    seed: int = 0
    num_workers: int = field(default_factory=lambda: default_loader_workers())
    device: str = "cpu"
    amp: str | None = None              # None: default_amp(device), this machine's choice
    # NHWC convolutions are faster in oneDNN (CPU) and cuDNN (tensor cores) alike.
    channels_last: bool = True
    log_every: int = 10
    # Warm start: the backbone's first weights, from a file (resnet_weights.py reads it), and its digest.
    init: str | None = None
    init_digest: str | None = None
    # kNN monitor on a labelled folder (issue: know whether training beats random init).
    val_dir: str | None = None
    val_every: int = 1
    decode_draft: bool = True
    # Decode each training image once and keep its pixels beside the run (training/image_store.py).
    store_images: bool = True
    # Colour jitter, grayscale, blur and normalisation batched on the training device (loader
    # workers only decode, crop and flip); False: all of it per image in the workers, as before.
    augment_on_device: bool = True
    # With augment_on_device: crop and resize on the device too, so workers only decode. On a
    # GPU that takes the crops off the CPU; on a CPU it would move them out of the parallel workers.
    crop_on_device: bool = False
    # Evaluation: whether the training images were no larger than the crop, so that a trained
    # network is shown each image whole (resized to the crop) rather than the 0.875 centre crop
    # made for large photos (images.Preprocessing); None in runs saved before: the stem decides.
    images_within_crop: bool | None = None
    choices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.amp is None:
            self.amp = default_amp(self.device)

    @property
    def lr(self) -> float:
        """The paper's linear scaling rule: lr = base_lr x batch / 256."""
        return self.base_lr * self.batch_size / 256

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Path | str = "the saved settings") -> "PretrainConfig":
        config = super().from_dict(values, source)
        config.check_architecture(source)
        return config

    def check_architecture(self, source: Path | str) -> None:
        """Settings read from a file build a network only if they describe one this code can build."""
        from simsiam_embed.models import BACKBONE_NAMES

        if self.backbone not in BACKBONE_NAMES:
            raise UserError(f"{source} is damaged: its backbone {self.backbone!r} is not one of {', '.join(BACKBONE_NAMES)}")
        widths = {"dim": self.dim, "projector_hidden_dim": self.projector_hidden_dim,
                  "predictor_hidden_dim": self.predictor_hidden_dim, "projector_layers": self.projector_layers,
                  "crop_size": self.crop_size, "small_crop_size": self.small_crop_size,
                  "start_crop_size": self.start_crop_size}
        for name, value in widths.items():
            if value is not None and not 1 <= value <= MAX_WIDTH:
                raise UserError(f"{source} is damaged: its setting {name!r} is {value}, outside 1..{MAX_WIDTH}")
        if not 0 <= self.small_views <= MAX_WIDTH:
            raise UserError(f"{source} is damaged: its setting 'small_views' is {self.small_views}, outside 0..{MAX_WIDTH}")
        if self.stem_stride not in (1, 2):
            raise UserError(f"{source} is damaged: its setting 'stem_stride' is {self.stem_stride}, not 1 or 2")

    def architecture(self) -> dict[str, Any]:
        """The settings that decide the weights' shapes: a checkpoint only loads into the same."""
        keys = ("backbone", "small_image_stem", "stem_stride", "dim", "projector_layers", "projector_hidden_dim",
                "predictor_hidden_dim", "heads_batch_norm", "use_predictor")
        return {key: getattr(self, key) for key in keys}


def field_default(settings_class: type, name: str) -> Any:
    """A settings dataclass's own default for ``name``: what --help shows."""
    return next(f.default for f in dataclasses.fields(settings_class) if f.name == name)


def default_help(name: str, text: str = "") -> str:
    """``--help`` text of a pretraining setting: ``text``, then its default as the recipes and the
    adapting rules above give it, so that help and behaviour cannot drift apart."""
    if name in ADAPTED_DEFAULTS:
        default = ADAPTED_DEFAULTS[name]
    else:
        shared = field_default(PretrainConfig, name)
        per_recipe = {recipe: values.get(name, shared) for recipe, values in RECIPE_SETTINGS.items()}
        default = _shown(per_recipe["imagenet"]) + "".join(
            f", {recipe} {_shown(value)}" for recipe, value in per_recipe.items() if value != per_recipe["imagenet"])
    return f"{text}  [default: {default}]".strip()


def _shown(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def parse_duration(text: str) -> float:
    """'90s', '20m', '2h', '1h30m' or plain seconds -> seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
        if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
            raise UserError(f"cannot read the duration {text!r}: write it as 90s, 20m, 2h or 1h30m")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise UserError("the time budget must be positive, for example 20m")
    return seconds


def default_epochs(recipe: str, num_images: int) -> int:
    """The paper trains ImageNet (1.28M images) for 100 epochs and CIFAR-10 (50k) for 800.

    Smaller folders need more passes for the same amount of learning: between the paper's two
    points the count grows as 1/sqrt(folder size), capped at the CIFAR recipe's 800.
    """
    paper, most = RECIPE_SETTINGS["imagenet"]["epochs"], RECIPE_SETTINGS["cifar"]["epochs"]
    if recipe == "cifar":
        return most
    return int(min(most, max(paper, round(paper * math.sqrt(IMAGENET_SIZE / max(num_images, 1))))))


def default_amp(device: str) -> str:
    """bf16 where the hardware computes it natively, fp16 (with a loss scaler) on older GPUs, else off."""
    if device.startswith("cuda"):
        # is_bf16_supported() alone says True on V100 and T4 too, where bf16 is emulated (slow):
        # only native bf16 (compute capability 8.0+, Ampere on) gets it; the rest fp16 + scaler.
        return "bf16" if gpu_has_native_bf16(device) else "fp16"
    # bf16 autocast on a CPU without AMX or AVX512-BF16 is emulated and slower than fp32, so it
    # is only the default where these units exist.
    return "bf16" if cpu_has_native_bf16() else "off"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16): only then is bf16
    faster than fp32 on it; elsewhere it is emulated, and slower."""
    import torch

    try:   # private but long-standing helpers
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def default_loader_workers() -> int:
    """Every process on this machine runs its own loader: the cores are shared out among them."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // max(local_processes, 1))


def embed_workers(requested: int | None, on_gpu: bool) -> tuple[int, str]:
    """Image-decoding processes for embed and index, and the reason: ``requested`` if given.

    On a GPU the encoder outruns a couple of decoders many times over (a ResNet-50 at 224 px
    embeds thousands of images a second there, a core decodes a few hundred photos), so every
    core of this process's share decodes. On a CPU the encoder's own threads need the cores:
    EMBED_WORKERS, at most one a core.
    """
    if requested is not None:
        return requested, f"--workers {requested}"
    if on_gpu:
        workers = default_loader_workers()
        return workers, f"the encoder runs on a GPU: {workers} of this machine's cores decode"
    workers = min(EMBED_WORKERS, os.cpu_count() or 1)
    return workers, "the encoder runs on the CPU and its own threads need the cores"


def cpu_int8_instructions() -> str | None:
    """The name of this CPU's int8 dot-product instructions (what ONNX Runtime's int8 kernels
    run fast on), or None: read from /proc/cpuinfo, so elsewhere than Linux, None."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return None
    return next((name for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"),
                                         ("avx_vnni", "AVX-VNNI")) if flag in flags), None)


def embed_precision(requested: str, on_gpu: bool, images: int | None, int8_units: str | None) -> tuple[str, str]:
    """The encoder precision for embedding and the reason: ``requested`` unless it is "auto";
    then int8 on a CPU with int8 dot products and at least INT8_MIN_IMAGES ``images``, else fp32."""
    if requested != "auto":
        return requested, f"--precision {requested}"
    if on_gpu:
        # fp16 on tensor cores is the likely win here, but unmeasured on a GPU so far: it is
        # offered (--precision fp16) and bench/gpu_check.py measures it against fp32 first.
        return "fp32", "a GPU runs the encoder (int8 is for CPUs; --precision fp16 for half precision)"
    if int8_units is None:
        return "fp32", "this CPU has no int8 dot products (AVX512-VNNI, AVX-VNNI, AMX)"
    if images is None or images < INT8_MIN_IMAGES:
        return "fp32", (f"{images or 0:,} images, fewer than the {INT8_MIN_IMAGES:,} from which quantising "
                        f"pays for itself on this CPU with {int8_units}")
    return "int8", (f"{images:,} images on a CPU with {int8_units}: about 2.9x fp32's images/s "
                    "(bench/RESULTS.md), if its neighbours match fp32's")


def gpu_has_native_bf16(device: str) -> bool:
    import torch

    index = torch.device(device).index
    major, _minor = torch.cuda.get_device_capability(index)
    return major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False)


#: Training memory of one image pair (two views, forward and backward, activations kept for the
#: backward pass) at 224 px under AMP: an estimate from ResNet-50's ~55 MB an image at batch
#: 1,024 (50-60 GB), the smaller ResNets by their activation sizes. fp32 doubles it; memory grows
#: with the crop's area; the small-image stem keeps 16x the pixels (no stride 2, no max-pool).
#: bench/gpu_check.py measures the real peak at the chosen batch.
PAIR_BYTES_224_AMP = {"resnet18": 40 << 20, "resnet34": 60 << 20, "resnet50": 110 << 20}
#: Kept free on the GPU: weights, optimizer state, cuDNN workspaces, allocator fragmentation.
GPU_RESERVE_BYTES = 2 << 30
GPU_MEMORY_SHARE = 0.85


def training_pair_bytes(backbone: str, crop_size: int, small_image_stem: bool, amp: str) -> float:
    """Training memory of one image pair (PAIR_BYTES_224_AMP, scaled as its comment says)."""
    per_pair = PAIR_BYTES_224_AMP.get(backbone, PAIR_BYTES_224_AMP["resnet50"]) * (crop_size / 224) ** 2
    return per_pair * (16 if small_image_stem else 1) * (2 if amp == "off" else 1)


def gpu_memory_bytes(device: str) -> int:
    import torch

    return torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory


def gpu_batch(device: str, settings: dict[str, Any], processes: int) -> tuple[int, str | None]:
    """The paper's 512 pairs, or the largest power of two that fits the GPUs' memory if less.

    The global batch is what the lr rule (base_lr x batch / 256) scales with, so a smaller
    batch on a smaller GPU keeps the paper's per-pair learning rate.
    """
    per_pair = training_pair_bytes(settings.get("backbone", "resnet50"), settings.get("crop_size", 224),
                                   bool(settings.get("small_image_stem")), settings.get("amp", "bf16"))
    memory = gpu_memory_bytes(device)
    fits = int(GPU_MEMORY_SHARE * max(memory - GPU_RESERVE_BYTES, 0) / per_pair)
    per_gpu = largest_power_of_two_at_most(max(fits, 2))
    if per_gpu * processes >= 512:
        return 512, None
    batch = per_gpu * processes
    return batch, (f"batch {batch}: {processes} GPU(s) of {memory / 2**30:.0f} GiB fit about {fits} pairs each "
                   f"(estimate {per_pair / 2**20:.0f} MiB a pair); the paper's 512 would run out of memory, "
                   "and the lr follows the batch (base_lr x batch / 256)")


def largest_power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def default_recipe(median_short_side: int) -> str:
    """The paper's small-image recipe for folders of small pictures, else its ImageNet recipe."""
    return "cifar" if median_short_side <= SMALL_IMAGE_MAX_SIDE else "imagenet"


def default_backbone(recipe: str, on_gpu: bool) -> str:
    """The recipe's ResNet, or ResNet-18 on a CPU (the paper's ResNet-50 is about 3x slower)."""
    return RECIPE_SETTINGS[recipe]["backbone"] if on_gpu else "resnet18"


def resolve_pretrain_config(
    data_dir: str,
    run_name: str,
    num_images: int,
    median_short_side: int,
    device: str,
    overrides: dict[str, Any],
    processes: int = 1,
) -> PretrainConfig:
    """Fill every setting: the user's explicit ``overrides`` first, then the recipe's defaults.

    The recipe comes from the data (median image side) and the hardware (``device``); each choice
    that was not the user's is recorded in ``config.choices`` with its reason.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(PretrainConfig)}
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    choices: list[str] = []
    on_gpu = device.startswith("cuda")

    recipe = given.get("recipe")
    if recipe is None:
        recipe = default_recipe(median_short_side)
        choices.append(
            f"recipe {recipe}: median image side {median_short_side} px "
            f"({'<=' if recipe == 'cifar' else '>'} {SMALL_IMAGE_MAX_SIDE} px)"
        )
    config = PretrainConfig(data_dir=data_dir, run_name=run_name, recipe=recipe, device=device)
    recipe_defaults = dict(RECIPE_SETTINGS[recipe])

    # The crop the images can use: the paper's 224 px, or the images' own side when smaller.
    if recipe == "cifar":
        recipe_defaults["crop_size"] = max(8, min(median_short_side, SMALL_IMAGE_MAX_SIDE))
        if "crop_size" not in given:
            choices.append(f"crop {recipe_defaults['crop_size']} px: the images' own size")
    else:
        if median_short_side < 224:
            recipe_defaults["crop_size"] = max(SMALL_IMAGE_MAX_SIDE, median_short_side // 8 * 8)
            if "crop_size" not in given:
                choices.append(f"crop {recipe_defaults['crop_size']} px: the images are smaller than 224 px")
        recipe_defaults["backbone"] = default_backbone(recipe, on_gpu)
        if not on_gpu:
            if "backbone" not in given:
                choices.append("backbone resnet18: no GPU (the paper's resnet50 is about 3x slower)")

    batch = given.get("batch_size")
    if batch is None:
        batch = 512 if on_gpu else 256
        if on_gpu:
            batch, reason = gpu_batch(device, {**recipe_defaults, **given}, processes)
            if reason:
                choices.append(reason)
        if batch > num_images:
            batch = largest_power_of_two_at_most(num_images)
            choices.append(f"batch {batch}: the folder has only {num_images} usable images")
        elif not on_gpu:
            choices.append("batch 256: no GPU (the paper's 512 halves the steps per hour)")
        if batch % processes and batch > processes:
            # Each process takes batch // processes pairs: the rest would never train, while the
            # lr and the pairs/s counted them.
            batch -= batch % processes
            choices.append(f"batch {batch}: a multiple of the {processes} processes ({batch // processes} pairs each)")
    elif processes > 1 and batch % processes:
        raise UserError(f"--batch-size {batch} does not divide over {processes} processes (each takes an equal share): "
                        f"use --batch-size {max(processes, batch - batch % processes)} or "
                        f"{batch - batch % processes + processes}")
    recipe_defaults["batch_size"] = batch

    if given.get("init") is not None and "base_lr" not in given:
        recipe_defaults["base_lr"] = RECIPE_SETTINGS[recipe]["base_lr"] * WARM_START_LR_SHARE
        choices.append(f"base lr {recipe_defaults['base_lr']:g}: a warm start continues at {WARM_START_LR_SHARE:g}x the "
                       "recipe's, not to undo its weights (hierarchical pretraining, Reed et al. 2022; bench/RESULTS.md)")

    if "epochs" not in given and "time_budget_s" not in given:
        recipe_defaults["epochs"] = default_epochs(recipe, num_images)
        epochs = recipe_defaults["epochs"]
        choices.append(
            f"{epochs} epochs: the paper's CIFAR recipe" if recipe == "cifar" else
            f"{epochs} epochs: the paper's 100 on ImageNet, more passes for {num_images} images"
        )
    if "time_budget_s" in given and "epochs" not in given:
        recipe_defaults["epochs"] = None

    if given.get("small_views") and "small_crop_size" not in given:
        recipe_defaults["small_crop_size"] = small_crop_size(given.get("crop_size", recipe_defaults["crop_size"]))
    if on_gpu and given.get("small_views") and "crop_on_device" not in given:
        choices.append("crops made by the loader: it draws the small views (--small-views)")
    elif on_gpu and given.get("augment_on_device", True) and "crop_on_device" not in given:
        recipe_defaults["crop_on_device"] = True
        choices.append("crops made on the GPU: the loader only decodes (the crops were most of its CPU time)")
    # Precision and loader are the config's own defaults for this machine (default_amp,
    # default_loader_workers); only a choice the user did not make is reported as one.
    if "amp" not in given and config.amp != "off" and not on_gpu:
        choices.append("AMP bf16 on the CPU: it has bf16 matrix units (2x the fp32 speed in bench/RESULTS.md)")

    for key, value in {**recipe_defaults, **given}.items():
        setattr(config, key, value)
    config.images_within_crop = median_short_side <= config.crop_size
    config.choices = choices
    validate(config, num_images)
    check_crop_size(config, median_short_side)
    return config


def small_crop_size(crop_size: int) -> int:
    """Multi-crop's small views: SwAV's 96 px beside 224, in proportion."""
    return max(8, round(crop_size * 96 / 224))


#: Loader batches in flight: each worker prefetches 4, plus the one in training and the one pinned.
def _batches_in_flight(workers: int) -> int:
    return max(workers, 1) * 4 + 2


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


#: Upsampling a crop further than this from the images' own size adds no detail, only cost.
MAX_CROP_UPSCALE = 4


def check_crop_size(config: PretrainConfig, median_short_side: int, memory_bytes: int | None = None) -> None:
    """Refuse a crop the images or the memory cannot support, before any worker allocates it."""
    limit_from_images = max(224, MAX_CROP_UPSCALE * median_short_side)
    if config.crop_size > limit_from_images:
        raise UserError(f"--crop-size {config.crop_size} is more than {MAX_CROP_UPSCALE}x the images' median side "
                        f"({median_short_side} px): use --crop-size {limit_from_images} or less")
    memory_bytes = memory_bytes if memory_bytes is not None else physical_memory_bytes()
    if memory_bytes is None:
        return
    batch_bytes = config.batch_size * 2 * 3 * config.crop_size ** 2 * 4   # two float32 views a pair
    needed = batch_bytes * _batches_in_flight(config.num_workers)
    if needed > memory_bytes / 2:
        fitting = int(math.sqrt(memory_bytes / 2 / _batches_in_flight(config.num_workers) / (config.batch_size * 24)))
        raise UserError(f"--crop-size {config.crop_size} at batch {config.batch_size} needs about {needed / 2**30:.0f} GiB "
                        f"of loader memory and this machine has {memory_bytes / 2**30:.0f} GiB: use --crop-size "
                        f"{fitting // 8 * 8} or less, or a smaller --batch-size")


def validate(config: PretrainConfig, num_images: int) -> None:
    """Reject settings that cannot train, each with a message that says what to do."""
    if config.epochs is not None and config.time_budget_s is not None:
        raise UserError("give either --epochs or --time-budget, not both")
    for name in ("base_lr", "weight_decay", "momentum", "min_crop_scale", "color_jitter", "warmup_fraction"):
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, not {value}")
    if config.base_lr == 0:
        raise UserError("--base-lr must be more than 0")
    if num_images < 2:
        raise UserError(f"the folder has {num_images} usable image(s); SimSiam needs at least 2 (and more to learn)")
    if config.batch_size < 2:
        raise UserError("--batch-size must be at least 2 (batch norm needs two samples)")
    if num_images < config.batch_size:
        raise UserError(
            f"the folder has {num_images} usable images, fewer than one batch of {config.batch_size}: "
            f"add images or pass --batch-size {largest_power_of_two_at_most(max(num_images, 2))}"
        )
    if config.crop_size < 8:
        raise UserError("--crop-size must be at least 8 pixels")
    if config.small_views < 0:
        raise UserError("--small-views must be 0 or more")
    if config.small_views:
        if not config.augment_on_device or config.crop_on_device:
            # Only the layout where loader workers make the crops draws small views.
            raise UserError("--small-views needs crops made by the loader: leave augment_on_device on and "
                            "crop_on_device off")
        if config.small_crop_size is None or not 8 <= config.small_crop_size <= config.crop_size:
            raise UserError(f"--small-crop-size must be between 8 and the crop size ({config.crop_size})")
    if config.start_crop_size is not None and not 8 <= config.start_crop_size <= config.crop_size:
        raise UserError(f"--start-crop-size must be between 8 and the crop size ({config.crop_size})")
    if not 0 < config.min_crop_scale <= 1:
        raise UserError("--min-crop-scale must be in (0, 1]")
    if config.amp == "fp16" and not config.device.startswith("cuda"):
        raise UserError("--amp fp16 needs a GPU: use --amp bf16 or --amp off on the CPU")
    if config.recipe not in RECIPES:
        raise UserError(f"unknown recipe {config.recipe!r}: choose one of {', '.join(RECIPES)}")
