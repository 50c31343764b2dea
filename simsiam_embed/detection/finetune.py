"""Detection transfer: fine-tune torchvision's Faster R-CNN (ResNet-FPN) from a SimSiam backbone.

    >>> result = finetune_detection(DetectionConfig(data="train.json", val_data="val.json",
    ...                                             checkpoint="runs/photos"), Workspace(Path(".")))
    >>> result.evaluation.ap50

The paper's transfer experiment (Section 4.6, Table 4) on the user's own boxes: the pretrained
ResNet initialises the detector's backbone, everything else (FPN, RPN, box head) starts fresh,
and ``init="random"`` trains the very same recipe from scratch for the comparison. Training is
organised by step as in pretraining, so checkpoints resume exactly and Ctrl-C loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import models as tv_models
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.transforms import functional as TF

from simsiam_embed.artefacts import Checkpoint, RunFolder
from simsiam_embed.detection.data import DetectionImage, DetectionSet, data_yaml_of, has_split, load_detection_set
from simsiam_embed.detection.evaluate import DetectionEvaluation, evaluate_detector
from simsiam_embed.distributed import DistributedContext, agree_on_every_rank, device_for_rank, distributed_session, launched_by_torchrun
from simsiam_embed.errors import Report, UserError
from simsiam_embed.files import ensure_writable_folder, write_json_atomic
from simsiam_embed.image_files import first_readable, open_image
from simsiam_embed.models.backbones import BACKBONE_NAMES
from simsiam_embed.optional import require
from simsiam_embed.detection.settings import DetectionConfig, default_detection_batch  # noqa: F401 (the API's names)
from simsiam_embed.settings import INITS, NORMS, SCHEDULES
from simsiam_embed.resnet_weights import load_resnet_weights, read_resnet_weights
from simsiam_embed.training.loop import (
    LoopPlan, MixedPrecision, StopRequest, TaskDefaults, TrainingLoop, open_run, place_model, refuse_changed_settings,
)
from simsiam_embed.workspace import Workspace, run_name_for


# --------------------------------------------------------------------------------------------
# The network


def simsiam_backbone_weights(checkpoint: Path | str) -> tuple[dict[str, torch.Tensor], str]:
    """The ResNet weights to start from (torchvision names, no classifier) and the backbone name:
    a SimSiam run, or any ResNet weights file :mod:`simsiam_embed.resnet_weights` reads.

    Refuses the small-image stem: a 3x3 stride-1 stem on full-size photos is not the network the
    detector's FPN expects, and its weights do not fit the 7x7 stem.
    """
    start = read_resnet_weights(checkpoint)
    if start.small_image_stem:
        raise UserError(f"{checkpoint} was pretrained with the small-image stem (images <= 64 px); detection needs "
                        "a backbone pretrained on larger images: run `simsiam-embed pretrain` on your photos")
    return start.weights, start.backbone


def build_detector(config: DetectionConfig, num_classes: int,
                   weights: dict[str, torch.Tensor] | None) -> tuple[FasterRCNN, int]:
    """Faster R-CNN with a ResNet-FPN backbone; ``weights`` (SimSiam's) initialise the ResNet.

    ``num_classes`` excludes the background. Returns the detector and how many backbone tensors
    came from ``weights`` (0 for a random init).
    """
    norm_layer = FrozenBatchNorm2d if config.norm == "frozen" else nn.BatchNorm2d
    resnet = getattr(tv_models, config.backbone)(weights=None, norm_layer=norm_layer)
    loaded = load_resnet_weights(resnet, weights, "the pretrained backbone", "the detector's ResNet")[0] if weights is not None else 0
    backbone = _resnet_fpn_extractor(resnet, config.trainable_layers)
    detector = FasterRCNN(backbone, num_classes=num_classes + 1, min_size=config.min_size, max_size=config.max_size,
                          box_batch_size_per_image=config.roi_samples)
    return detector, loaded


# --------------------------------------------------------------------------------------------
# The data


class DetectionTrainingSet(Dataset):
    """Images as uint8 tensors with their targets (the task scales them to [0, 1] on its device);
    a horizontal flip drawn from the sample seed.

    Indexed by ``(sample_seed, index)`` (the pretraining sampler's keys), so a resumed run sees
    the same flips. Labels are shifted by one: torchvision reserves 0 for the background.
    """

    def __init__(self, images: list[DetectionImage], flip: bool):
        self.images = images
        self.paths = [record.path for record in images]
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        sample_seed, index = key
        # An unreadable image is replaced by the next readable one, boxes and all, so every
        # rank always has a full share of the batch (see data.first_readable).
        loaded, failures = first_readable(index, self.paths, lambda i: (i, open_image(self.images[i].path, upright=False)))
        if loaded is None:
            return None, failures
        index, picture = loaded
        record = self.images[index]
        # uint8 through the loader's shared memory (a 12-megapixel photo: 36 MB, not 144 MB as
        # float32); the training device scales it to [0, 1], as to_tensor would have.
        image = TF.pil_to_tensor(picture)
        boxes = torch.from_numpy(record.boxes.copy())
        if self.flip and torch.randint(2, (1,), generator=torch.Generator().manual_seed(sample_seed)).item():
            image = image.flip(-1)
            boxes[:, [0, 2]] = record.width - boxes[:, [2, 0]]
        return (image, {"boxes": boxes, "labels": torch.from_numpy(record.labels + 1)}), failures


def _images_and_targets(samples: list[tuple]) -> tuple[list, list]:
    # Detection images differ in size: kept as lists, which torchvision's detectors take.
    return [image for image, _ in samples], [target for _, target in samples]


def detection_lr(config: DetectionConfig, step: int, total_steps: int) -> float:
    """Linear warm-up from 0.1%, then detectron2's steps (x0.1 at 2/3 and 8/9) or a cosine."""
    warmup = min(config.warmup_steps, max(total_steps // 4, 1))
    factor = 0.001 + 0.999 * step / warmup if step < warmup else 1.0
    if config.schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    else:
        factor *= 0.1 ** sum(step >= milestone * total_steps for milestone in (2 / 3, 8 / 9))
    return config.lr * factor


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class DetectionResult:
    run_dir: Path
    config: DetectionConfig
    step: int
    total_steps: int
    finished: bool
    loaded_tensors: int
    evaluation: DetectionEvaluation | None
    losses: list[float]
    elapsed_s: float
    detector: FasterRCNN | None         # the fine-tuned network, on its training device (None if not trained now)
    data_problems: dict[str, int] = field(default_factory=dict)  # training annotations fixed or dropped, by kind
    already_finished: bool = False
    stop: StopRequest | None = None     # what stopped an unfinished run (its exit status)


def _recorded_evaluation(run: RunFolder) -> DetectionEvaluation | None:
    """The evaluation a finished run wrote, if it had --val-data."""
    path = run.evaluation
    if not path.is_file():
        return None
    try:
        return DetectionEvaluation.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{path} is damaged: delete it, or fine-tune again with --name NEW") from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Settings that may differ on --resume: they change how, not what, the run computes.
RESUMABLE_SETTINGS = frozenset({"device", "num_workers", "log_every", "val_data", "amp", "channels_last"})


def finetune_detection(config: DetectionConfig, workspace: Workspace, run_name: str | None = None,
                       resume: bool = False, report: Report = _stderr, show_progress: bool = True,
                       stop: StopRequest | None = None, explicit: set[str] | None = None) -> DetectionResult:
    """Fine-tune a detector on ``config.data`` and score it on ``config.val_data`` (COCO AP).

    ``explicit``: the settings the user gave (the rest are defaults). On ``resume`` the run's
    own settings are used, and an explicit one that contradicts them is refused.
    """
    started = time.monotonic()
    run_dir = workspace.run_dir(run_name or default_run_name(config))
    config = dataclasses.replace(config)   # the caller's settings stay as given
    choices = config.choose_for_hardware()
    with distributed_session(config.device) as context:   # the process group ends with the run
        return _open_and_finetune(config, choices, run_dir, resume, explicit, report, show_progress, stop, started,
                                  context)


def _open_and_finetune(config: DetectionConfig, choices: list[str], run_dir: Path, resume: bool,
                       explicit: set[str] | None, report: Report, show_progress: bool, stop: StopRequest | None,
                       started: float, context: DistributedContext) -> DetectionResult:
    run = RunFolder(run_dir)
    # As pretraining: ranks that see different runs (a machine whose workspace is not the shared
    # one) stop with one line on every rank, where one resuming and one starting afresh would hang.
    agree_on_every_rank(run.checkpoint.exists(), f"whether {run.checkpoint} exists", context,
                        device_for_rank(config.device, context))
    previous = open_run(run, "detection", resume)
    if previous is not None and previous.finished:
        # As pretraining: a finished run is done; running it again changes nothing.
        report(f"{run_dir} is a finished detection run ({previous.step} steps): nothing to do. "
               "Use --name NEW for another run.")
        loaded = previous.extra.get("loaded_tensors", 0)
        return DetectionResult(run_dir, DetectionConfig.from_dict(previous.settings, source=run.checkpoint),
                               previous.step, previous.step, True, loaded if isinstance(loaded, int) else 0,
                               _recorded_evaluation(run), [], previous.elapsed_s, None, already_finished=True)
    if previous is not None:
        saved = DetectionConfig.from_dict(previous.settings, source=run.checkpoint)
        given = {key: getattr(config, key) for key in (explicit or set())}
        refuse_changed_settings(saved, given, RESUMABLE_SETTINGS, run_dir)
        for key in RESUMABLE_SETTINGS - {"val_data"}:   # this machine's, not the old run's
            setattr(saved, key, getattr(config, key))
        if "val_data" in given:
            saved.val_data = config.val_data
        config = saved
    elif context.is_main:
        for choice in choices:   # a resumed run keeps its own batch: nothing was chosen now
            report(f"chosen: {choice}")

    _validate(config)
    if config.val_data is None and has_split(Path(config.data), "val"):
        config.val_data = config.data   # a data.yaml's own val split scores the run
        report(f"validation: the 'val' split of {config.data}")
    if config.val_data:
        _require_coco_evaluator()
    return _finetune(config, run_dir, previous, report, show_progress, stop, started, context)


def _finetune(config: DetectionConfig, run_dir: Path, previous: Checkpoint | None, report: Report,
              show_progress: bool, stop: StopRequest | None, started: float,
              context: DistributedContext) -> DetectionResult:
    device = config.device
    rank_report = report if context.is_main else (lambda _m: None)
    train_set = load_detection_set(Path(config.data), config.class_names or None)
    config.class_names = train_set.class_names
    val_set = load_detection_set(Path(config.val_data), train_set.class_names, split="val") if config.val_data else None
    _report_data(train_set, val_set, rank_report)

    weights = None
    if config.init == "simsiam":
        weights, pretrained_backbone = simsiam_backbone_weights(config.checkpoint)
        if config.backbone and config.backbone != pretrained_backbone:
            raise UserError(f"--backbone {config.backbone} differs from the checkpoint's {pretrained_backbone}: "
                            "drop --backbone to use the pretrained one")
        config.backbone = pretrained_backbone
    config.backbone = config.backbone or ("resnet50" if device.startswith("cuda") else "resnet18")
    torch.manual_seed(config.seed)
    detector, loaded = build_detector(config, len(train_set.class_names), weights)
    if config.init == "simsiam":
        rank_report(f"backbone {config.backbone}: {loaded} tensors loaded from the SimSiam checkpoint {config.checkpoint}")
    run = RunFolder(run_dir)
    if context.is_main:
        ensure_writable_folder(run_dir)
        write_json_atomic(run.config, config.to_dict())
        rank_report(_settings_line(config, run))

    rank_device = device_for_rank(device, context)
    task = DetectionTask(config, detector, train_set, context, rank_device, loaded)
    plan = LoopPlan(steps_per_epoch=task.steps_per_epoch, total_steps=config.epochs * task.steps_per_epoch,
                    log_every=config.log_every, batch_size=config.batch_size, seed=config.seed,
                    workers=config.num_workers, divergence_hint="lower --base-lr or lengthen --warmup-steps",
                    epoch_records=False)
    loop = TrainingLoop(task, run, plan, context, rank_device, rank_report)
    stop = stop or StopRequest()
    outcome = loop.resume_and_run(previous, stop, started, show_progress and context.is_main)
    evaluation = None
    if outcome.finished and val_set is not None and context.is_main:
        evaluation = evaluate_detector(task.model, val_set, rank_device, show_progress=show_progress)
        write_json_atomic(run.evaluation, evaluation.to_dict())
    return DetectionResult(run_dir, config, outcome.step, outcome.total_steps, outcome.finished, loaded, evaluation,
                           task.losses, outcome.elapsed_s, task.model, dict(train_set.problems.counts), stop=stop)


def default_run_name(config: DetectionConfig) -> str:
    """detection-<data>-<init>; a data.yaml is named by its dataset's folder."""
    data = Path(config.data)
    stem = data.resolve().parent.name if data.is_file() and data_yaml_of(data) == data else data.stem
    return run_name_for(Path(f"detection-{stem}-{config.init}"))


def _validate(config: DetectionConfig) -> None:
    if config.init not in INITS:
        raise UserError(f"--init must be one of {', '.join(INITS)}")
    if config.init == "simsiam" and not config.checkpoint:
        raise UserError("--init simsiam needs a pretraining run: pass --checkpoint RUN (or --init random)")
    if config.backbone is not None and config.backbone not in BACKBONE_NAMES:
        raise UserError(f"unknown backbone {config.backbone!r}: choose one of {', '.join(BACKBONE_NAMES)}")
    if config.norm not in NORMS:
        raise UserError(f"--norm must be one of {', '.join(NORMS)}")
    if config.norm == "syncbn" and not (config.device.startswith("cuda") and launched_by_torchrun()):
        raise UserError("--norm syncbn needs several GPU processes under torchrun: use --norm bn on one device")
    if not 0 <= config.trainable_layers <= 5:
        raise UserError("--trainable-layers must be between 0 and 5")
    if config.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")


def _require_coco_evaluator() -> None:
    """Fail before training, not after it, when the evaluator is not installed."""
    require("pycocotools.cocoeval", "scoring --val-data", "detection")


def _report_data(train_set: DetectionSet, val_set: DetectionSet | None, report: Report) -> None:
    for name, dataset in (("training", train_set), ("validation", val_set)):
        if dataset is None:
            continue
        report(f"{name} set ({dataset.source_format}): {len(dataset.images)} images, {dataset.box_count} boxes, "
               f"{len(dataset.class_names)} classes ({', '.join(dataset.class_names[:10])})")
        if dataset.problems.counts:
            report(f"  warning: {dataset.problems.summary()}")
    if train_set.box_count == 0:
        raise UserError(f"the training set has no usable box: nothing to learn ({train_set.problems.summary()})")


def _settings_line(config: DetectionConfig, run: RunFolder) -> str:
    return (f"settings (saved in {run.config}): Faster R-CNN {config.backbone}-FPN, init {config.init}, "
            f"norm {config.norm}, {config.trainable_layers} trainable backbone stages, {config.epochs} epochs, "
            f"batch {config.batch_size}, SGD lr {config.lr:g} (= {config.base_lr:g} x {config.batch_size}/16, "
            f"{config.schedule}, {config.warmup_steps} warm-up steps), images {config.min_size}-{config.max_size} px, "
            f"{config.roi_samples} RoI samples per image, device {config.device}, AMP {config.amp}")


class DetectionTask(TaskDefaults):
    """Detection fine-tuning as a task of the one training loop: the detector, SGD with
    detectron2's schedule, one step on a batch of images and boxes."""

    kind = "detection"

    def __init__(self, config: DetectionConfig, detector: FasterRCNN, train_set: DetectionSet,
                 context: DistributedContext, device: str, loaded: int):
        if len(train_set.images) < config.batch_size:
            raise UserError(f"the training set has {len(train_set.images)} images, fewer than one batch of "
                            f"{config.batch_size}: pass --batch-size {max(1, len(train_set.images))}")
        self.settings = config
        self.device = device
        self.loaded = loaded
        self.model, self.network = place_model(detector, device, context, config.channels_last,
                                               sync_bn=config.norm == "syncbn")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.amp = MixedPrecision(config.amp, device)
        self.dataset = DetectionTrainingSet(train_set.images, flip=True)
        self.steps_per_epoch = len(train_set.images) // config.batch_size
        # The largest image in flight, as uint8 RGB: what a batch may take in shared memory.
        self._largest_image_bytes = max(3 * record.width * record.height for record in train_set.images)
        self.losses: list[float] = []   # the logged loss means, kept in the checkpoint

    def loader_shape(self):
        return _images_and_targets, self._largest_image_bytes, "uint8 images"

    def begin_step(self, step: int, total_steps: int | None) -> float:
        lr = detection_lr(self.settings, step, total_steps or step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, batch: tuple[list, list]) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [image.to(self.device, non_blocking=True).float().div_(255) for image in images]
        targets = [{key: value.to(self.device) for key, value in target.items()} for target in targets]
        with self.amp.autocast():
            losses = self.network(images, targets)
            total = sum(losses.values())
        # A non-finite loss is not checked here (that would sync every step, and one rank raising
        # alone would leave the others waiting in DDP's backward): the loop decides at the next
        # logged step, on the mean over every rank, and the weights are checked before any save.
        self.amp.backward_and_step(total, self.optimizer)
        return {"loss": total.detach(), **{key: value.detach() for key, value in losses.items()}}

    def extra_state(self) -> dict[str, Any]:
        return {"losses": self.losses, "loaded_tensors": self.loaded}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        losses = extra.get("losses", [])
        self.losses = [float(v) for v in losses if isinstance(v, (int, float))] if isinstance(losses, list) else []

    def on_log(self, step: int, means: dict[str, float]) -> None:
        self.losses.append(means["loss"])
