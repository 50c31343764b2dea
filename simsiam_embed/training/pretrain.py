"""SimSiam pretraining: the task the one training loop runs, and the command's library function.

    >>> result = pretrain("./images", Workspace(Path.cwd()), overrides={"epochs": 10})

The method is here: the network and SGD with the paper's cosine schedule, one step on two views,
the collapse monitor and the kNN monitor. Everything that is not SimSiam (the step sampler,
signals, checkpoints, resume rules, the metrics log, the time budget) is :mod:`.loop`'s.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from simsiam_embed.artefacts import Checkpoint, RunFolder
from simsiam_embed.distributed import DistributedContext, agree_on_every_rank, device_for_rank, distributed_session, from_main
from simsiam_embed.errors import Report, UserError
from simsiam_embed.explore.report import COLLAPSE_FRACTION, write_run_report
from simsiam_embed.files import ensure_writable_folder, write_json_atomic
from simsiam_embed.image_files import ScanResult, discover_images, scan_images
from simsiam_embed.inference.evaluate import KnnMonitor
from simsiam_embed.models import SimSiam, simsiam_loss
from simsiam_embed.pretrained_weights import (GENERIC_NAME, cached_default_weights, described, is_weights_name,
                                              pretrained_weights_file, published_weights)
from simsiam_embed.resnet_weights import ResNetWeights, load_resnet_weights, read_resnet_weights
from simsiam_embed.settings import (
    PretrainConfig, default_backbone, default_recipe, gpu_memory_bytes, physical_memory_bytes, resolve_pretrain_config,
)
from simsiam_embed.trained_model import build_model, preprocessing_for
from simsiam_embed.training.augment import (
    AugmentationRecipe, BatchAugment, CroppedViews, MultiCropViews, crop_on_device, draw_uncropped_views,
    small_view_recipe, stack_uncropped,
)
from simsiam_embed.training.budget_plan import adapt_to_budget, too_short_warning
from simsiam_embed.training.image_store import DecodedImageStore, plan_store
from simsiam_embed.training.data import TwoViewDataset, simsiam_augmentation, training_draft_side
from simsiam_embed.training.loop import (
    LoopPlan, MetricsLog, MixedPrecision, StopRequest, TaskDefaults, TrainingLoop, format_duration, open_run,
    place_model, refuse_changed_settings,
)
from simsiam_embed.workspace import Workspace, run_name_for

#: Settings that may differ when resuming: they change how, not what, the run computes.
RESUMABLE_OVERRIDES = frozenset({"num_workers", "device", "log_every", "decode_draft", "store_images", "val_dir",
                                 "val_every"})


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The learning rate by step, and the collapse monitor


def cosine_lr(initial_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The paper's cosine decay, evaluated per step rather than per epoch, after an optional
    linear warm-up (the paper has none; short budgets may need one to survive a higher lr)."""
    if step < warmup_steps:
        return initial_lr * (step + 1) / warmup_steps
    progress = (min(step, total_steps) - warmup_steps) / max(total_steps - warmup_steps, 1)
    return initial_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: SimSiam, config: PretrainConfig) -> torch.optim.SGD:
    """SGD as the official code: the predictor may keep a fixed lr (``fix_lr``) while f decays."""
    encoder = list(model.backbone.parameters()) + list(model.projector.parameters())
    groups = [{"params": encoder, "fix_lr": False}]
    predictor = list(model.predictor.parameters())
    if predictor:
        groups.append({"params": predictor, "fix_lr": config.fix_predictor_lr})
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, config: PretrainConfig, step: int,
                      total_steps: int | None) -> float:
    """``total_steps`` None: a time budget not yet planned, which runs at the initial lr.

    With a warm-up asked for, those few measuring steps hold the lr at the warm-up's start (0)
    instead: the ramp's length is not known yet, and jumping to the peak is what a warm-up is for
    avoiding. The ramp then starts from the planned schedule's current step.
    """
    if total_steps is None:
        current = 0.0 if config.warmup_fraction > 0 else config.lr
    else:
        current = cosine_lr(config.lr, step, total_steps, int(config.warmup_fraction * total_steps))
    for group in optimizer.param_groups:
        group["lr"] = config.lr if group["fix_lr"] else current
    return current


#: Progressive resizing: the crop stays at its starting side for this share of the steps, then
#: grows linearly to full size, reached at RAMP_END and kept to the end. Late steps at the full
#: size are what the encoder is used at (FFCV's ResNet recipes end their ramp ~85% in, for the
#: same reason: a network trained small and used large sees objects at a scale it never learned).
RAMP_START, RAMP_END = 0.40, 0.85
#: Sides are rounded down to a multiple of this: few distinct shapes (oneDNN and cuDNN pick an
#: algorithm per shape) and strided stages that divide evenly.
SIDE_STEP = 4


def progressive_side(start_side: int, full_side: int, progress: float) -> int:
    """The training crop's side at ``progress`` (0..1) through the schedule (see RAMP_START)."""
    ramp = min(max((progress - RAMP_START) / (RAMP_END - RAMP_START), 0.0), 1.0)
    side = start_side + ramp * (full_side - start_side)
    return full_side if ramp >= 1.0 else max(start_side, int(side) // SIDE_STEP * SIDE_STEP)


def relative_step_cost(config: PretrainConfig, progress: float) -> float:
    """A step's cost at ``progress``, relative to a step at the full crop: the model's FLOPs,
    which scale with the crop's area. Per-step costs that do not shrink with the crop (loader,
    optimizer, heads) make small steps dearer than this, so a time budget's plan errs short: runs
    ended 2-7% before their budget (bench/RESULTS.md), never after it."""
    if config.start_crop_size is None:
        return 1.0
    return (progressive_side(config.start_crop_size, config.crop_size, progress) / config.crop_size) ** 2


def output_std(z: torch.Tensor) -> torch.Tensor:
    """The collapse monitor of Figure 2: std over the batch of l2-normalised z, mean over channels.

    A healthy run stays near 1/sqrt(dim); a collapsed one (every output the same) goes to 0.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class PretrainResult:
    run_dir: Path
    config: PretrainConfig
    step: int
    total_steps: int
    steps_per_epoch: int
    finished: bool
    already_finished: bool = False
    loss: float | None = None
    z_std: float | None = None
    pairs_per_second: float | None = None
    elapsed_s: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model: SimSiam | None = None   # the trained network, in this process's memory
    knn_verdict: str | None = None  # with --val-dir: has training beaten random init?
    stop: StopRequest | None = None  # what stopped an unfinished run (its exit status)
    replans: int = 0                 # corrections of a time budget's plan (metrics.jsonl)

    @property
    def checkpoint(self) -> Path:
        return RunFolder(self.run_dir).checkpoint

    @property
    def epochs_done(self) -> float:
        return self.step / max(1, self.steps_per_epoch)


def pretrain(
    data_dir: Path | str,
    workspace: Workspace,
    overrides: dict[str, Any] | None = None,
    run_name: str | None = None,
    resume: bool = False,
    report: Report = _stderr,
    show_progress: bool = True,
    stop: StopRequest | None = None,
) -> PretrainResult:
    """Train SimSiam on every image under ``data_dir``; the run lives in ``workspace.runs_dir``.

    ``overrides`` holds the user's explicit settings (``PretrainConfig`` field names; ``device``
    among them); all others are resolved from the data and the hardware, printed and saved.
    ``resume`` continues an interrupted run from its checkpoint. Raises :class:`UserError` for
    bad input, before any work starts.
    """
    started = time.monotonic()
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir} is not a folder: give the folder that holds your images")
    run_name = run_name or run_name_for(data_dir)
    run_dir = workspace.run_dir(run_name)
    device = overrides.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    with distributed_session(device) as context:
        return _pretrain(data_dir, workspace, overrides, run_name, run_dir, resume, report, show_progress, stop,
                         started, device, context)


def _pretrain(data_dir: Path, workspace: Workspace, overrides: dict[str, Any], run_name: str, run_dir: Path,
              resume: bool, report: Report, show_progress: bool, stop: StopRequest | None, started: float,
              device: str, context: DistributedContext) -> PretrainResult:
    rank_device = device_for_rank(device, context)
    run = RunFolder(run_dir)
    agree_on_every_rank(run.checkpoint.exists(), f"whether {run.checkpoint} exists", context, rank_device)
    previous = open_run(run, "pretrain", resume)
    if previous is not None and previous.finished:
        config = PretrainConfig.from_dict(previous.settings, source=run.checkpoint)
        report(f"{run_dir} is a finished run ({previous.step} steps): nothing to do. "
               "Use --name NEW for another run, or `simsiam-embed index` to use this one.")
        steps_per_epoch = previous.extra.get("steps_per_epoch")
        return PretrainResult(run_dir, config, previous.step, previous.step,
                              steps_per_epoch if isinstance(steps_per_epoch, int) and steps_per_epoch > 0 else 1,
                              finished=True, already_finished=True)

    quiet: Report = lambda _message: None  # noqa: E731  (ranks other than 0 stay silent)
    rank_report = report if context.is_main else quiet

    # Rank 0 scans and every rank trains on its list: ranks that each scanned a changing folder
    # could index different files and train on different samples.
    scan = from_main(_scan_folder(data_dir, rank_report) if context.is_main else None, context)
    start = budget_plan = None
    scratch_asked = overrides.get("init") == FROM_SCRATCH
    if scratch_asked:
        overrides["init"] = None
    if previous is not None:
        if overrides.get("init") is not None and Path(overrides["init"]).exists():   # the run saved the file's full path
            overrides["init"] = str(Path(overrides["init"]).resolve())
        config = _config_for_resume(previous, overrides, run)
        config.device = device
    else:
        config, start = _resolve_settings(data_dir, run_name, scan, overrides, device, context, rank_report)
        if context.world_size == 1:
            budget_plan = adapt_to_budget(config, {key for key, value in overrides.items() if value is not None},
                                          scan.median_short_side)
        cached = (cached_default_weights(config.backbone)
                  if budget_plan is not None and not budget_plan.learns and start is None and not scratch_asked
                  and config.recipe == "imagenet" else None)
        if cached is not None:
            overrides["init"] = GENERIC_NAME
            config, start = _resolve_settings(data_dir, run_name, scan, overrides, device, context, rank_report)
            config.choices.insert(0, f"init {cached[0]}: the time budget affords about {budget_plan.steps} steps, too "
                                     "few to learn from random init, and these ImageNet weights are in torch.hub's "
                                     "cache (bench/RESULTS.md, \"Warm starts\"); the paper's random init: --init none")
            budget_plan = None
    _check_share_per_process(config.batch_size, context.world_size)

    if context.is_main:
        ensure_writable_folder(run_dir)
        write_json_atomic(run.config, config.to_dict())
        _report_settings(config, run, report)
        if budget_plan is not None and not budget_plan.learns:
            report(too_short_warning(budget_plan))

    store = None
    if config.store_images:
        draft = image_draft_side(config)
        plan = plan_store(len(scan.paths), scan.median_short_side, draft, run.decoded_images, physical_memory_bytes())
        rank_report(f"  chosen: {plan.summary}")
        if plan.capacity_bytes:
            store = DecodedImageStore(run.decoded_images, draft, plan.capacity_bytes)
            if context.is_main:
                removed = store.remove_stale(scan.paths)
                if removed:
                    report(f"  decoded-image store: removed {removed:,} entries of images that changed or went")
    task = SimSiamTask(config, scan.paths, context, rank_device, rank_report, start, store, scan.median_short_side)
    default_name = run_name_for(Path(config.data_dir))
    plan = LoopPlan(
        steps_per_epoch=task.steps_per_epoch,
        total_steps=config.total_steps or (config.epochs * task.steps_per_epoch if config.epochs else None),
        log_every=config.log_every, batch_size=config.batch_size, seed=config.seed, workers=config.num_workers,
        budget_s=config.time_budget_s, expected_steps=budget_plan.steps if budget_plan else None,
        sample_name="image pairs", rate_key="pairs_per_s", schedule="cosine schedule",
        log_constants={"z_std_reference": 1 / math.sqrt(config.dim)},
        resume_hint=f"simsiam-embed pretrain {config.data_dir} --resume"
                    + (f" --name {config.run_name}" if config.run_name != default_name else ""),
        divergence_hint=f"lower --base-lr (now {config.base_lr:g})",
        shorter_run_hint="--time-budget plans a shorter run that still finishes its schedule",
        slow_step_hint=f"a smaller --batch-size (now {config.batch_size}) or --crop-size (now {config.crop_size})"
                       + ("" if config.backbone == "resnet18" else ", or --backbone resnet18"),
    )
    loop = TrainingLoop(task, run, plan, context, rank_device, rank_report)
    loop.on_first_save = lambda: workspace.mark_latest(run_name)
    loop.skipped = {str(path): reason for path, reason in scan.skipped}
    stop = stop or StopRequest()
    outcome = loop.resume_and_run(previous, stop, started, show_progress and context.is_main)
    if context.is_main:
        _write_report(run_dir, report)
    return PretrainResult(
        run_dir=run_dir, config=config, step=outcome.step, total_steps=outcome.total_steps,
        steps_per_epoch=task.steps_per_epoch, finished=outcome.finished, loss=outcome.means.get("loss"),
        z_std=outcome.means.get("z_std"), pairs_per_second=outcome.samples_per_s, elapsed_s=outcome.elapsed_s,
        skipped=outcome.skipped, model=task.model, knn_verdict=task.verdict(), stop=stop, replans=outcome.replans,
    )


def _write_report(run_dir: Path, report: Report) -> None:
    """The curves of a run that ended or stopped; a failure to draw them never fails the run."""
    try:
        written = write_run_report(run_dir)
    except (UserError, OSError) as error:
        report(f"note: the run report was not written ({error})")
        return
    report(f"report: {written.page}")


def _pairs_in(batch: tuple) -> int:
    """Pairs in a batch of any of the loader layouts (see SimSiamTask._dataset)."""
    first = batch[0]
    if isinstance(first, list):   # crop on device: groups of padded images, then every sample's boxes
        return len(batch[1])
    return len(first[0] if isinstance(first, tuple) else first)


def _scan_folder(data_dir: Path, report: Report) -> ScanResult:
    candidates = discover_images(data_dir)
    if not candidates:
        raise UserError(
            f"no images in {data_dir} (looked for .jpg .jpeg .png .bmp .gif .webp .tif .tiff, recursively)"
        )
    report(f"scanning {len(candidates)} image files in {data_dir} ...")
    scan = scan_images(candidates)
    if not scan.paths:
        raise UserError(f"none of the {len(candidates)} image files in {data_dir} could be read: "
                        f"the first, {scan.skipped[0][0]}: {scan.skipped[0][1]}")
    if scan.skipped:
        report(f"{len(scan.skipped)} unreadable files will be skipped (listed in the run folder's skipped.jsonl)")
    return scan


#: ``--init``'s word for the paper's random init (a short CPU budget may otherwise warm start).
FROM_SCRATCH = "none"


def _resolve_settings(data_dir: Path, run_name: str, scan: ScanResult, overrides: dict[str, Any], device: str,
                      context: DistributedContext, report: Report) -> tuple[PretrainConfig, ResNetWeights | None]:
    """A new run's settings from the folder, the machine and ``overrides``, and its warm start."""
    backbone_given = overrides.get("backbone") is not None
    start = _warm_start(overrides, scan.median_short_side, device, report)
    config = resolve_pretrain_config(str(data_dir.resolve()), run_name, len(scan.paths), scan.median_short_side,
                                     device, overrides, processes=context.world_size)
    if start is not None and not backbone_given:
        config.choices.insert(0, f"backbone {config.backbone}: the --init file's")
    return config, start


def _warm_start(overrides: dict[str, Any], median_short_side: int, device: str, report: Report) -> ResNetWeights | None:
    """Read ``--init``'s weights: a file, or a name of torchvision's or timm's pretrained weights
    ("imagenet": torchvision's for the backbone this run would have); the run's backbone is theirs, and
    the settings record the file's path (or the weights' name) and digest (``overrides`` is
    completed in place)."""
    init = overrides.get("init")
    if init is None:
        return None
    path, recorded = Path(init), None
    if not path.exists() and is_weights_name(str(init)):
        recipe = overrides.get("recipe") or default_recipe(median_short_side)
        backbone = overrides.get("backbone") or default_backbone(recipe, device.startswith("cuda"))
        path, recorded, _digest = pretrained_weights_file(str(init), backbone, report)
    elif not path.exists():
        published_weights(str(init), "resnet18")   # a name not known: one line listing those that are
    start = read_resnet_weights(path)
    if recorded is not None:
        start = dataclasses.replace(start, source=f"{described(recorded)}, {path}")
    given = overrides.get("backbone")
    if given is not None and given != start.backbone:
        raise UserError(f"--init {init} holds a {start.backbone}'s weights and --backbone is {given}: "
                        f"drop --backbone, or pass --backbone {start.backbone}")
    overrides.update(backbone=start.backbone, init=recorded or str(path.resolve()), init_digest=start.digest)
    return start


def _check_share_per_process(batch_size: int, processes: int) -> None:
    """Every process normalises its own share of the batch (batch norm on the CPU; SyncBN still
    needs two values a channel on some process): a share below 2 pairs cannot train. Decided
    from the settings alone, so every rank refuses alike."""
    if processes > 1 and batch_size // processes < 2:
        raise UserError(f"--batch-size {batch_size} over {processes} processes leaves {batch_size // processes} pair "
                        f"a process, and batch norm needs 2: use --batch-size {2 * processes} or more")


#: Bytes each trained parameter holds during a run: its fp32 weight, gradient and SGD momentum, and
#: the weights and momentum again in the checkpoint's buffer while it is written.
TRAINING_BYTES_PER_PARAMETER = 4 * 5
#: The share of the device's memory the network's parameters may take; activations, the loader's
#: batches and the decoded images need the rest.
NETWORK_MEMORY_SHARE = 0.5


def check_network_fits(config: PretrainConfig, device: str, memory_bytes: int | None = None) -> None:
    """Refuse, before anything is allocated, a network whose training state cannot fit.

    Every head counts: ``--dim 300000`` builds (PyTorch allocates lazily), trains two steps at
    16 GB and is killed by the kernel with no checkpoint, where a failed allocation at build time
    (``--projector-hidden-dim 1e9``) is already one line. Counted on the meta device: exact,
    whatever the method's heads are, and nothing allocated.
    """
    if memory_bytes is None:
        memory_bytes = gpu_memory_bytes(device) if device.startswith("cuda") else physical_memory_bytes()
    if memory_bytes is None:
        return
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(config).parameters())
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    if needed > NETWORK_MEMORY_SHARE * memory_bytes:
        where = "GPU" if device.startswith("cuda") else "machine"
        raise UserError(f"the network has {parameters / 1e6:,.0f}M parameters; training holds about "
                        f"{needed / 2**30:.1f} GiB for them (weights, gradients, momentum, a checkpoint being "
                        f"written), more than half of this {where}'s {memory_bytes / 2**30:.0f} GiB: lower --dim "
                        f"(now {config.dim}), --projector-hidden-dim (now {config.projector_hidden_dim}) or "
                        f"--predictor-hidden-dim (now {config.predictor_hidden_dim})")


def image_draft_side(config: PretrainConfig) -> int | None:
    """The side a training image is decoded at (JPEG draft decoding), or None for full size."""
    return training_draft_side(config.crop_size, config.min_crop_scale) if config.decode_draft else None


def _config_for_resume(previous: Checkpoint, overrides: dict[str, Any], run: RunFolder) -> PretrainConfig:
    """The checkpoint's own settings; an explicit setting that contradicts them is an error."""
    config = PretrainConfig.from_dict(previous.settings, source=run.checkpoint)
    refuse_changed_settings(config, overrides, RESUMABLE_OVERRIDES, run.path)
    for key in RESUMABLE_OVERRIDES & set(overrides):
        setattr(config, key, overrides[key])
    return config


def _report_settings(config: PretrainConfig, run: RunFolder, report: Report) -> None:
    length = f"{config.epochs} epochs" if config.epochs else f"time budget {format_duration(config.time_budget_s or 0)}"
    progressive = (f" (from {config.start_crop_size} px, growing over {RAMP_START:.0%}-{RAMP_END:.0%} of the steps)"
                   if config.start_crop_size else "")
    report(
        f"settings (all saved in {run.config}):\n"
        f"  recipe {config.recipe}, backbone {config.backbone}{' (small-image stem)' if config.small_image_stem else ''}, "
        f"crop {config.crop_size} px{progressive}, {length}, batch {config.batch_size}\n"
        f"  SGD lr {config.lr:g} (= {config.base_lr:g} x {config.batch_size}/256, cosine), momentum {config.momentum:g}, "
        f"weight decay {config.weight_decay:g}, predictor lr {'fixed' if config.fix_predictor_lr else 'decayed'}\n"
        f"  projector {config.projector_layers} layers x {config.projector_hidden_dim} -> {config.dim}, "
        f"predictor {config.dim} -> {config.predictor_hidden_dim} -> {config.dim}, blur {'on' if config.blur else 'off'}\n"
        f"  device {config.device}, AMP {config.amp}, {config.num_workers} loader workers, seed {config.seed}"
        + (f"\n  backbone starts from {config.init} (sha256 {config.init_digest[:12]})" if config.init else "")
    )
    for choice in config.choices:
        report(f"  chosen: {choice}")


def decoded_image_bytes(draft: int | None, crop_size: int, median_short_side: int | None) -> int:
    """Bytes of one decoded image in flight (a pair's whole sample when crops are made on the device).

    A drafted JPEG decode keeps the shorter side at least ``draft`` and under twice that; an
    image smaller than the draft stays as it is. From the folder's median side where it is known:
    the largest possible decode (2 x draft, 3.83 MiB at 224 px) planned every batch as if each
    image were that large, where photos of 500 x 375 take 0.19-0.54 MiB, and left a GPU with 2
    loader workers at batch 512.
    """
    largest = 2 * (draft or 2 * crop_size)
    side = largest if median_short_side is None else min(median_short_side, largest)
    return 3 * side * side * 4 // 3   # at 4:3 or so


class SimSiamTask(TaskDefaults):
    """SimSiam pretraining as a task of the one training loop: the network, SGD, one step, and the
    monitors (collapse, kNN) at each epoch's end."""

    kind = "pretrain"

    def __init__(self, config: PretrainConfig, paths: list[Path], context: DistributedContext, device: str,
                 report: Report, start: ResNetWeights | None = None, store: DecodedImageStore | None = None,
                 median_short_side: int | None = None):
        """``start``: the weights of a warm start (``--init``), for a run's first step; a resumed
        run has its own in the checkpoint. ``store``: where decoded images are kept between epochs.
        ``median_short_side``: of the folder's images, for the loader's memory plan."""
        self.median_short_side = median_short_side
        self.store = store
        self.settings = config
        self.context, self.device, self.report = context, device, report
        check_network_fits(config, device)
        torch.manual_seed(config.seed)
        model = build_model(config)
        if start is not None:
            loaded, left = load_resnet_weights(model.backbone.resnet, start.weights, config.init, allow_other_stem=True)
            report(f"warm start: {loaded} tensors of the backbone from {config.init} ({start.source})"
                   + (f"; left at random init: {', '.join(left)} (the small-image stem differs from the file's)"
                      if left else "") + "; the projector and predictor start at random init")
        self.model, self.network = place_model(model, device, context, config.channels_last, sync_bn=True)
        if device.startswith("cuda"):
            # Training crops have one fixed size, so cuDNN's per-shape algorithm search pays off
            # after the first step (GPU-only; checked by bench/gpu_check.py).
            torch.backends.cudnn.benchmark = True
        self.optimizer = make_optimizer(self.model, config)
        self.amp = MixedPrecision(config.amp, device)
        self.recipe = AugmentationRecipe(config.crop_size, config.min_crop_scale, config.color_jitter, config.blur)
        self.augment_batch = BatchAugment(self.recipe, device)
        self.view_side = config.crop_size   # this step's crop side: smaller early with --start-crop-size
        self.dataset, self._stack, self._sample_bytes, self._what = self._dataset(paths)
        self.steps_per_epoch = len(paths) // config.batch_size
        self.collapse_level = COLLAPSE_FRACTION / math.sqrt(config.dim)
        # On every rank: each embeds its share of the labelled images (see KnnMonitor.top1).
        self.monitor = (KnnMonitor(Path(config.val_dir), preprocessing_for(config), device, context=context,
                                   warm_start=config.init is not None) if config.val_dir else None)
        self.knn_top1: float | None = None

    # -- the data ----------------------------------------------------------------------------

    def _dataset(self, paths: list[Path]):
        """The dataset for the loader layout the settings ask for, how its samples stack, and
        their bytes in flight."""
        config = self.settings
        draft = image_draft_side(config)
        store = self.store
        view_bytes = 3 * config.crop_size ** 2
        if config.crop_on_device:   # workers decode; crops, colour and blur on the device
            dataset = TwoViewDataset(paths, draft_side=draft, pair=partial(draw_uncropped_views, recipe=self.recipe),
                                     store=store)
            return dataset, stack_uncropped, decoded_image_bytes(draft, config.crop_size, self.median_short_side), \
                "decoded images"
        if config.small_views:   # workers crop full and small views (multi-crop); colour and blur on the device
            small = small_view_recipe(self.recipe, config.small_crop_size)
            dataset = TwoViewDataset(paths, draft_side=draft, store=store,
                                     pair=MultiCropViews(self.recipe, small, config.small_views))
            return dataset, default_collate, 2 * view_bytes + config.small_views * 3 * small.crop_size ** 2, "uint8 crops"
        if config.augment_on_device:   # workers crop; colour and blur on the device
            return TwoViewDataset(paths, draft_side=draft, store=store, pair=CroppedViews(self.recipe)), default_collate, \
                2 * view_bytes, "uint8 crops"
        # The per-image path, kept as the baseline bench/bench_loader.py compares against.
        augment = simsiam_augmentation(config.crop_size, config.blur, min_crop_scale=config.min_crop_scale,
                                       color_jitter=config.color_jitter)
        dataset = TwoViewDataset(paths, augment, draft, store=store)
        return dataset, default_collate, 2 * view_bytes * 4, "float32 views"

    def loader_shape(self):
        return self._stack, self._sample_bytes, self._what

    def _views_on_device(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Both views as normalised float batches on the training device, in its memory format,
        and the small views (N*S of them, sample-major) when the run has them."""
        config = self.settings
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        small = None
        if config.small_views:
            full, (small_crops, small_parameters) = batch[:2], batch[2]
            small = self.augment_batch(small_crops.flatten(0, 1).to(self.device, non_blocking=True),
                                       small_parameters.flatten(0, 1))
            small = small.contiguous(memory_format=memory_format)
            batch = full
        if config.crop_on_device:
            images, boxes, flips, parameters = batch
            crops = crop_on_device(images, boxes, flips, config.crop_size, self.device)
            parameters = torch.cat([parameters[:, 0], parameters[:, 1]])
        elif config.augment_on_device:
            (crops1, parameters1), (crops2, parameters2) = batch
            crops = torch.cat([crops1, crops2]).to(self.device, non_blocking=True)
            parameters = torch.cat([parameters1, parameters2])
        else:
            return (*(self._at_view_side(view.to(self.device, non_blocking=True)).contiguous(memory_format=memory_format)
                      for view in batch), None)
        views = self.augment_batch(crops, parameters)   # parameters stay on the CPU (see BatchAugment)
        views = self._at_view_side(views).contiguous(memory_format=memory_format)
        return views[:len(views) // 2], views[len(views) // 2:], small

    def _at_view_side(self, views: torch.Tensor) -> torch.Tensor:
        """The views at this step's side (progressive resizing): the loader's full-size crops,
        shrunk with antialiasing, are the crops of the same boxes at the smaller side (up to the
        resampling), and the loader needs no word of the schedule."""
        if views.shape[-1] == self.view_side:
            return views
        return F.interpolate(views, size=(self.view_side, self.view_side), mode="bilinear", antialias=True, align_corners=False)

    # -- one step ----------------------------------------------------------------------------

    def begin_step(self, step: int, total_steps: int | None) -> float:
        config = self.settings
        if config.start_crop_size is not None:   # a time budget not yet planned is at its start
            self.view_side = progressive_side(config.start_crop_size, config.crop_size, step / total_steps if total_steps else 0.0)
        return set_learning_rate(self.optimizer, config, step, total_steps)

    def relative_step_cost(self, progress: float) -> float:
        return relative_step_cost(self.settings, progress)

    def train_step(self, batch: tuple) -> dict[str, torch.Tensor]:
        if _pairs_in(batch) < 2:   # BatchNorm needs two samples
            return {}
        view1, view2, small = self._views_on_device(batch)
        with self.amp.autocast():
            output = self.network(view1, view2, small)
            loss = simsiam_loss(output, symmetric=self.settings.symmetric_loss)
        self.amp.backward_and_step(loss, self.optimizer)
        return {"loss": loss.detach(), "z_std": output_std(output.z1.detach())}

    # -- monitors ----------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        # The old key name stays: checkpoints written before warm starts existed resume alike.
        return {"steps_per_epoch": self.steps_per_epoch,
                "knn_random_init_top1": self.monitor.baseline_top1 if self.monitor else None}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        value = extra.get("knn_random_init_top1")
        if self.monitor is not None and isinstance(value, float):
            self.monitor.baseline_top1 = value

    def on_start(self, step: int, log: MetricsLog) -> None:
        monitor = self.monitor
        if monitor is not None and monitor.baseline_top1 is None and step == 0:
            monitor.baseline_top1 = self._knn_top1()
            self.report(f"kNN top-1 on {self.settings.val_dir} at {monitor.baseline}: {monitor.baseline_top1:.3f}")
            key = "knn_top1_warm_start" if monitor.warm_start else "knn_top1_random_init"
            log.write({"step": 0, key: monitor.baseline_top1})

    def on_epoch_end(self, step: int, means: dict[str, float], finished: bool) -> dict[str, Any]:
        config = self.settings
        epoch = math.ceil(step / self.steps_per_epoch)
        record: dict[str, Any] = {}
        if self.monitor is not None and (finished or epoch % config.val_every == 0):
            self.knn_top1 = record["knn_top1"] = self._knn_top1()
        z_std = means.get("z_std")
        if z_std is not None and z_std < self.collapse_level:
            record["collapse_warning"] = True
            self.report(
                f"warning: epoch {epoch}: the outputs are collapsing (z-std {z_std:.4f}, a healthy run stays near "
                f"1/sqrt(dim) = {1 / math.sqrt(config.dim):.4f}); lower the learning rate, or check the ablation flags"
            )
        return record

    def _knn_top1(self) -> float:
        # Embedding draws from the global generator (DataLoader seeds); training must not notice.
        with torch.random.fork_rng(devices=[]):
            return self.monitor.top1(self.model.backbone)

    def postfix(self, means: dict[str, float], lr: float) -> list[str]:
        return [f"loss {means['loss']:.3f}" if "loss" in means else "", f"lr {lr:.3g}",
                f"kNN {self.knn_top1:.3f}" if self.knn_top1 is not None else "",
                f"z-std {means['z_std']:.4f}" if "z_std" in means else ""]

    def verdict(self) -> str | None:
        return self.monitor.verdict(self.knn_top1) if self.monitor and self.knn_top1 is not None else None
