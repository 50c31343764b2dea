"""The SimSiam training loop: optimizer, cosine schedule, AMP, DDP, checkpoints, collapse monitor.

    >>> result = pretrain("./images", Workspace(Path.cwd()), overrides={"epochs": 10})

Training is organised by global *step*, not by epoch: the sampler maps a step to its batch, the
schedule maps a step to its learning rate, and a checkpoint records the step. That is what makes
a run resumable mid-epoch, and a time budget plannable as an exact number of steps.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import (
    build_model, capture_rng_state, load_checkpoint, preprocessing_for, restore_rng_state, save_checkpoint,
)
from .config import PretrainConfig, resolve_pretrain_config
from .data import (
    TwoViewDataset,
    collate_skipping_unreadable,
    discover_images,
    scan_images,
    simsiam_augmentation,
    training_draft_side,
)
from .distributed import (
    DistributedContext, agree_on_every_rank, any_rank, average_bn_statistics, device_for_rank, distributed_session,
    from_main, gather_to_main, mean_over_ranks, value_of_main,
)
from .errors import UserError
from .evaluate import KnnMonitor
from .files import atomic_write, ensure_writable_folder, write_json_atomic, write_jsonl_atomic
from .models import SimSiam, simsiam_loss
from .training import TimeBudget
from .workspace import Workspace, run_name_for

#: Settings that may differ when resuming: they change how, not what, the run computes.
RESUMABLE_OVERRIDES = frozenset({"num_workers", "device", "log_every", "decode_draft", "val_dir", "val_every"})

#: Below this fraction of 1/sqrt(dim), the std of the normalised outputs means collapse (Fig. 2).
COLLAPSE_FRACTION = 0.25

Report = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# What the loop reads: batches by step, learning rate by step


class StepBatchSampler:
    """Global step -> the batch of ``(sample_seed, image_index)`` that this rank trains on.

    Each epoch is a fresh permutation seeded by (seed, epoch); each rank takes its own slice of
    the global batch (as DistributedSampler does). The per-sample seed fixes that sample's
    augmentation wherever and whenever it is drawn. Infinite: the loop decides when to stop.
    """

    def __init__(self, num_images: int, global_batch: int, seed: int, start_step: int = 0,
                 context: DistributedContext = DistributedContext()):
        if global_batch % context.world_size:
            raise UserError(f"--batch-size {global_batch} must divide evenly over {context.world_size} processes")
        self.num_images = num_images
        self.global_batch = global_batch
        self.seed = seed
        self.start_step = start_step
        self.context = context
        self.steps_per_epoch = num_images // global_batch
        self._cached: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_images, generator=generator))
        return self._cached[1]

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        indices = self._permutation(epoch)[start:start + self.global_batch]
        per_rank = self.global_batch // self.context.world_size
        mine = indices[self.context.rank * per_rank:(self.context.rank + 1) * per_rank].tolist()
        return [(_sample_seed(self.seed, epoch, index), index) for index in mine]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 ** 2 + epoch * 1_000_003 + index) % (2 ** 63)


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


def output_std(z: torch.Tensor) -> torch.Tensor:
    """The collapse monitor of Figure 2: std over the batch of l2-normalised z, mean over channels.

    A healthy run stays near 1/sqrt(dim); a collapsed one (every output the same) goes to 0.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


# --------------------------------------------------------------------------------------------
# Stopping on request (Ctrl-C, SIGTERM) at a step boundary


class StopRequest:
    """Set by a signal handler (or a test); the loop checkpoints and stops at the next step."""

    def __init__(self, stop_at_step: int | None = None):
        self.requested = False
        self.stop_at_step = stop_at_step

    def should_stop(self, step: int) -> bool:
        return self.requested or (self.stop_at_step is not None and step >= self.stop_at_step)


@contextmanager
def stop_on_signals(stop: StopRequest, report: Report) -> Iterator[None]:
    """First Ctrl-C or SIGTERM: finish the step, save, stop. A second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = True
        report("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and SIGTERM reach the whole process group (a terminal,
    systemd, Slurm and Kubernetes all signal the group); the main process decides when loaders
    stop. A worker that died of SIGTERM would make the main process raise instead of saving.
    Workers still exit when the main process does (PyTorch's worker watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"

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
    checkpoint_path = run_dir / "checkpoint.pt"
    agree_on_every_rank(checkpoint_path.exists(), f"whether {checkpoint_path} exists", context, rank_device)
    previous = load_checkpoint(checkpoint_path, kind="pretrain") if checkpoint_path.exists() else None
    if previous is not None and previous.get("finished"):
        config = PretrainConfig.from_dict(previous["config"], source=checkpoint_path)
        report(f"{run_dir} is a finished run ({previous['step']} steps): nothing to do. "
               "Use --name NEW for another run, or `simsiam-embed index` to use this one.")
        return PretrainResult(run_dir, config, previous["step"], previous["step"],
                              previous["steps_per_epoch"], finished=True, already_finished=True)
    if previous is not None and not resume:
        raise UserError(
            f"{run_dir} holds an unfinished run (step {previous['step']}): add --resume to continue it, "
            "or --name NEW to start another"
        )
    if previous is None and resume:
        raise UserError(f"nothing to resume: {checkpoint_path} does not exist (drop --resume to start a run)")

    quiet: Report = lambda _message: None  # noqa: E731  (ranks other than 0 stay silent)
    rank_report = report if context.is_main else quiet

    # Rank 0 scans and every rank trains on its list: ranks that each scanned a changing folder
    # could index different files and train on different samples.
    scan = from_main(_scan_folder(data_dir, rank_report) if context.is_main else None, context)
    if previous is not None:
        config = _config_for_resume(previous, overrides, run_dir)
        config.device = device
    else:
        config = resolve_pretrain_config(
            str(data_dir.resolve()), run_name, len(scan.paths), scan.median_short_side, device, overrides
        )

    if context.is_main:
        ensure_writable_folder(run_dir)
        write_json_atomic(run_dir / "config.json", config.to_dict())
        _report_settings(config, run_dir, report)

    trainer = _Trainer(config, scan.paths, run_dir, context, rank_device, rank_report)
    trainer.on_first_save = lambda: workspace.mark_latest(run_name)
    trainer.skipped = {str(path): reason for path, reason in scan.skipped}
    if previous is not None:
        trainer.restore(previous)
        rank_report(f"resuming {run_dir} at step {trainer.step}")
    stop = stop or StopRequest()
    with stop_on_signals(stop, rank_report):
        return trainer.run(stop, started, show_progress and context.is_main)


def _scan_folder(data_dir: Path, report: Report):
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


def _config_for_resume(previous: dict[str, Any], overrides: dict[str, Any], run_dir: Path) -> PretrainConfig:
    """The checkpoint's own settings; an explicit setting that contradicts them is an error."""
    config = PretrainConfig.from_dict(previous["config"], source=run_dir / "checkpoint.pt")
    for key, value in overrides.items():
        if key in RESUMABLE_OVERRIDES:
            setattr(config, key, value)
        elif getattr(config, key, None) != value:
            raise UserError(
                f"the run in {run_dir} was trained with {key}={getattr(config, key, None)!r}, not {value!r}: "
                "drop that option to resume, or start a new run with --name NEW"
            )
    return config


def _report_settings(config: PretrainConfig, run_dir: Path, report: Report) -> None:
    length = f"{config.epochs} epochs" if config.epochs else f"time budget {_format_duration(config.time_budget_s or 0)}"
    report(
        f"settings (all saved in {run_dir / 'config.json'}):\n"
        f"  recipe {config.recipe}, backbone {config.backbone}{' (small-image stem)' if config.small_image_stem else ''}, "
        f"crop {config.crop_size} px, {length}, batch {config.batch_size}\n"
        f"  SGD lr {config.lr:g} (= {config.base_lr:g} x {config.batch_size}/256, cosine), momentum {config.momentum:g}, "
        f"weight decay {config.weight_decay:g}, predictor lr {'fixed' if config.fix_predictor_lr else 'decayed'}\n"
        f"  projector {config.projector_layers} layers x {config.projector_hidden_dim} -> {config.dim}, "
        f"predictor {config.dim} -> {config.predictor_hidden_dim} -> {config.dim}, blur {'on' if config.blur else 'off'}\n"
        f"  device {config.device}, AMP {config.amp}, {config.num_workers} loader workers, seed {config.seed}"
    )
    for choice in config.choices:
        report(f"  chosen: {choice}")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Trainer:
    """One run's network, optimizer and position; ``run`` trains until the planned last step."""

    #: Timed steps (after one untimed) that measure the speed a time budget is planned on.
    BUDGET_WARMUP_STEPS = 5

    def __init__(self, config: PretrainConfig, paths: list[Path], run_dir: Path,
                 context: DistributedContext, device: str, report: Report):
        self.config = config
        self.paths = paths
        self.run_dir = run_dir
        self.context = context
        self.device = device
        self.report = report
        torch.manual_seed(config.seed)
        model = build_model(config)
        if context.enabled and device.startswith("cuda"):
            # BN statistics over the global batch, as the paper's 8-GPU runs. PyTorch's SyncBN is
            # GPU-only: on CPUs each process normalises over its own share of the batch (and DDP
            # broadcasts rank 0's running statistics, so the replicas stay identical).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.network = (
            DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
            if context.enabled else model
        )
        self.optimizer = make_optimizer(model, config)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
        self.steps_per_epoch = len(paths) // config.batch_size
        self.step = 0
        self.total_steps: int | None = config.total_steps or (
            config.epochs * self.steps_per_epoch if config.epochs else None
        )
        self.elapsed_before = 0.0
        self.skipped: dict[str, str] = {}   # path -> why it could not be read
        self.metrics_path = run_dir / "metrics.jsonl"
        self.monitor = (KnnMonitor(Path(config.val_dir), preprocessing_for(config), device)
                        if config.val_dir and context.is_main else None)
        self.knn_top1: float | None = None
        self.budget = TimeBudget(config.time_budget_s, self.steps_per_epoch) if config.time_budget_s else None
        self.replans: list[dict] = []   # corrections of the budget's plan, written to metrics.jsonl
        self.on_first_save: Callable[[], None] = lambda: None   # LATEST moves once the run has a checkpoint
        self.saved_step: int | None = None
        self.resumed_from: int | None = None

    # -- persistence -------------------------------------------------------------------------

    def restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise UserError(f"the checkpoint does not fit its own architecture ({str(error).splitlines()[0]})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.step = self.saved_step = self.resumed_from = state["step"]
        self.total_steps = state["total_steps"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
        if self.monitor is not None:
            self.monitor.random_init_top1 = state.get("knn_random_init_top1")
        self.skipped.update(state.get("skipped", {}))
        if self.context.is_main:
            self._forget_metrics_after(self.step)

    def _forget_metrics_after(self, step: int) -> None:
        """Lines logged after the checkpoint was taken describe steps that will be run again."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_write(self.metrics_path) as handle:
            handle.write("".join(line + "\n" for line in kept))

    def save(self, finished: bool, elapsed_s: float) -> float:
        """Write the checkpoint (main process only; every rank must call it); returns its seconds."""
        began = time.monotonic()
        average_bn_statistics(self.model, self.context)
        self._stop_if_diverged(all(bool(torch.isfinite(p).all()) for p in self.model.parameters()), "the weights")
        for found in gather_to_main(self.skipped, self.context):   # each rank met its own unreadable files
            self.skipped.update(found)
        if not self.context.is_main:
            return 0.0
        save_checkpoint(self.run_dir / "checkpoint.pt", {
            "kind": "pretrain",
            "config": self.config.to_dict(),
            "step": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.step // self.steps_per_epoch,
            "finished": finished,
            "elapsed_s": elapsed_s,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": capture_rng_state(),
            "skipped": self.skipped,
            "knn_random_init_top1": self.monitor.random_init_top1 if self.monitor else None,
        })
        write_jsonl_atomic(self.run_dir / "skipped.jsonl",
                           [{"path": path, "reason": reason} for path, reason in sorted(self.skipped.items())])
        if self.saved_step is None or self.saved_step == self.resumed_from:
            self.on_first_save()
        self.saved_step = self.step
        seconds = time.monotonic() - began
        if self.budget is not None:
            self.budget.save_seconds = seconds   # the final checkpoint is paid out of the budget too
        return seconds

    # -- training ----------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        config = self.config
        augment = simsiam_augmentation(config.crop_size, config.blur, min_crop_scale=config.min_crop_scale,
                                       color_jitter=config.color_jitter)
        draft = training_draft_side(config.crop_size, config.min_crop_scale) if config.decode_draft else None
        sampler = StepBatchSampler(len(self.paths), config.batch_size, config.seed, self.step, self.context)
        workers = config.num_workers
        return DataLoader(
            TwoViewDataset(self.paths, augment, draft),
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_skipping_unreadable,
            pin_memory=self.device.startswith("cuda"),
            persistent_workers=workers > 0,
            worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
        )

    def _train_step(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        view1 = view1.to(self.device, non_blocking=True, memory_format=memory_format)
        view2 = view2.to(self.device, non_blocking=True, memory_format=memory_format)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        autocast = (torch.autocast(device_type=torch.device(self.device).type, dtype=amp_dtype)
                    if amp_dtype else nullcontext())
        with autocast:
            output = self.network(view1, view2)
            loss = simsiam_loss(output, symmetric=config.symmetric_loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), output_std(output.z1.detach())

    def run(self, stop: StopRequest, started: float, show_progress: bool) -> PretrainResult:
        config = self.config
        collapse_level = COLLAPSE_FRACTION / math.sqrt(config.dim)
        self.network.train()
        timed_from: tuple[int, float] | None = None
        window = RunningMeans()
        epoch_means = RunningMeans()
        last: dict[str, float] = {}
        is_tty = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not show_progress,
                   dynamic_ncols=True, mininterval=0.5 if is_tty else 30, file=sys.stderr)
        loader = iter(self._loader())
        metrics = open(self.metrics_path, "a") if self.context.is_main else None
        elapsed = lambda: self.elapsed_before + time.monotonic() - started  # noqa: E731  (this run's own clock)
        if self.budget is not None and self.total_steps is not None:
            self.budget.resume(self.step, elapsed(), self.total_steps)   # a resumed budget run keeps checking its plan
        if self.monitor is not None and self.monitor.random_init_top1 is None and self.step == 0:
            self.monitor.random_init_top1 = self._knn_top1()
            self.report(f"kNN top-1 on {config.val_dir} at random init: {self.monitor.random_init_top1:.3f}")
            metrics.write(json.dumps({"step": 0, "knn_top1_random_init": self.monitor.random_init_top1}) + "\n")
        try:
            while self.total_steps is None or self.step < self.total_steps:
                batch, failures = next(loader)
                self.skipped.update(failures)
                lr = set_learning_rate(self.optimizer, config, self.step, self.total_steps)
                if batch is not None and len(batch[0]) >= 2:
                    loss, z_std = self._train_step(*batch)
                    window.add(loss=loss, z_std=z_std)
                    epoch_means.add(loss=loss, z_std=z_std)
                self.step += 1
                bar.update(1)
                now = time.monotonic()
                if timed_from is None:
                    timed_from = (self.step, now)   # the first step pays for start-up; not timed
                timed_steps = self.step - timed_from[0]
                pairs_per_s = timed_steps * config.batch_size / (now - timed_from[1]) if timed_steps else None

                if timed_steps == self.BUDGET_WARMUP_STEPS:
                    seconds_per_step = (now - timed_from[1]) / timed_steps
                    if self.total_steps is None:
                        self._plan_time_budget(seconds_per_step, elapsed)
                        bar.total = self.total_steps
                        bar.refresh()
                    else:
                        self._report_duration(seconds_per_step)

                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    last = {key: float(mean_over_ranks(value, self.context)) for key, value in window.means().items()}
                    self._stop_if_diverged(math.isfinite(last.get("loss", 0.0)), "the loss")
                    window = RunningMeans()
                    record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr,
                              **last, "z_std_reference": 1 / math.sqrt(config.dim),
                              "pairs_per_s": pairs_per_s, "time_s": round(self.elapsed_before + now - started, 2)}
                    bar.set_postfix_str(self._postfix(last, lr, pairs_per_s), refresh=False)
                    if metrics:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()

                end_of_epoch = self.step % self.steps_per_epoch == 0
                finished = self.total_steps is not None and self.step >= self.total_steps
                if end_of_epoch or finished:
                    epoch_record = {key: float(mean_over_ranks(v, self.context)) for key, v in epoch_means.means().items()}
                    epoch_means = RunningMeans()
                    if self.monitor is not None and (finished or (self.step // self.steps_per_epoch) % config.val_every == 0):
                        self.knn_top1 = epoch_record["knn_top1"] = self._knn_top1()
                        bar.set_postfix_str(self._postfix(last, lr, pairs_per_s), refresh=False)
                    self._end_epoch(epoch_record, collapse_level, metrics)
                if finished:
                    break
                # Under torchrun, asking every rank is a collective (a device sync on GPUs): only at
                # logged steps. A single process checks its own flag every step.
                ask_ranks = not self.context.enabled or self.step % config.log_every == 0
                if ask_ranks and any_rank(stop.should_stop(self.step), self.context, self.device):
                    stopped_at = elapsed()
                    self.save(finished=False, elapsed_s=stopped_at)
                    bar.close()
                    self.report(f"stopped at step {self.step}/{self.total_steps or '?'}; checkpoint saved. "
                                f"Continue with: simsiam-embed pretrain {config.data_dir} --resume"
                                + (f" --name {config.run_name}" if config.run_name != run_name_for(Path(config.data_dir)) else ""))
                    return self._result(False, last, pairs_per_s, stopped_at)
                elif end_of_epoch:
                    self.save(finished=False, elapsed_s=elapsed())
                if self.budget is not None and self.step % config.log_every == 0 and self._correct_time_plan(elapsed()):
                    bar.total = self.total_steps
                    bar.refresh()
                    if metrics:
                        metrics.write(json.dumps(self.replans[-1]) + "\n")
        finally:
            bar.close()
            if metrics:
                metrics.close()
        elapsed = self.elapsed_before + time.monotonic() - started
        self.save(finished=True, elapsed_s=elapsed)
        return self._result(True, last, pairs_per_s, elapsed)

    def _stop_if_diverged(self, finite: bool, what: str) -> None:
        """A non-finite loss or weight never reaches a checkpoint: the last good one is kept."""
        if finite:
            return
        kept = (f"the last good checkpoint (step {self.saved_step}) is kept" if self.saved_step is not None
                else "no checkpoint was written")
        raise UserError(f"training diverged: {what} became NaN or infinite by step {self.step}; {kept}. "
                        f"Lower --base-lr (now {self.config.base_lr:g}) and start again with --name NEW")

    def _knn_top1(self) -> float:
        # Embedding draws from the global generator (DataLoader seeds); training must not notice.
        with torch.random.fork_rng(devices=[]):
            return self.monitor.top1(self.model.backbone)

    def _end_epoch(self, means: dict[str, float], collapse_level: float, metrics) -> None:
        epoch = math.ceil(self.step / self.steps_per_epoch)
        record = {"step": self.step, "epoch_end": epoch, **means}
        z_std = means.get("z_std")
        if z_std is not None and z_std < collapse_level:
            record["collapse_warning"] = True
            self.report(
                f"warning: epoch {epoch}: the outputs are collapsing (z-std {z_std:.4f}, a healthy run stays near "
                f"1/sqrt(dim) = {1 / math.sqrt(self.config.dim):.4f}); lower the learning rate, or check the ablation flags"
            )
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def _plan_time_budget(self, seconds_per_step: float, elapsed: Callable[[], float]) -> None:
        """Fix the number of steps that fits the budget, so the cosine schedule finishes on time.

        Planned on rank 0's clock and broadcast: ranks that planned on their own clocks would
        stop at different steps (and hang in a collective), after drifting on different lrs.
        """
        config = self.config
        save_seconds = self.save(finished=False, elapsed_s=elapsed())   # also measures a checkpoint's cost
        planned = self.budget.plan(self.step, elapsed(), seconds_per_step, save_seconds)
        self.total_steps = value_of_main(planned, self.context, self.device)
        self.budget.total_steps = config.total_steps = self.total_steps
        if self.context.is_main:
            write_json_atomic(self.run_dir / "config.json", config.to_dict())
        self.report(
            f"time budget {_format_duration(config.time_budget_s)}: {seconds_per_step:.2f} s/step measured -> "
            f"{self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.1f} epochs), "
            "cosine schedule planned over exactly those"
        )

    def _correct_time_plan(self, elapsed_s: float) -> bool:
        """Re-plan (on rank 0's clock, for every rank) if the pace since planning drifted by more
        than 3%: the run still ends on time and on a finished schedule."""
        corrected = value_of_main(self.budget.observe(self.step, elapsed_s) or 0, self.context, self.device)
        if corrected == 0:
            return False
        if not self.replans:   # the first correction is news; later ones are in metrics.jsonl
            self.report(f"\nre-planned: the pace since the plan -> {corrected} steps instead of {self.total_steps}, "
                        "to end on time (further corrections: metrics.jsonl)")
        self.replans.append({"step": self.step, "replanned_total_steps": corrected})
        self.total_steps = self.budget.total_steps = self.config.total_steps = corrected
        if self.context.is_main:
            write_json_atomic(self.run_dir / "config.json", self.config.to_dict())
        return True

    def _report_duration(self, seconds_per_step: float) -> None:
        remaining = (self.total_steps - self.step) * seconds_per_step
        if remaining > 600:
            self.report(f"at {self.config.batch_size / seconds_per_step:.0f} image pairs/s this run needs about "
                        f"{_format_duration(remaining)} more. Ctrl-C saves a checkpoint (--resume continues); "
                        "--time-budget plans a shorter run that still finishes its schedule.")

    def _postfix(self, last: dict[str, float], lr: float, pairs_per_s: float | None) -> str:
        parts = [f"loss {last['loss']:.3f}" if "loss" in last else "", f"lr {lr:.3g}",
                 f"kNN {self.knn_top1:.3f}" if self.knn_top1 is not None else "",
                 f"z-std {last['z_std']:.4f}" if "z_std" in last else "",
                 f"{pairs_per_s:.0f} img/s" if pairs_per_s else ""]
        return ", ".join(part for part in parts if part)

    def _result(self, finished: bool, last: dict[str, float], pairs_per_s: float | None,
                elapsed: float) -> PretrainResult:
        return PretrainResult(
            run_dir=self.run_dir, config=self.config, step=self.step, total_steps=self.total_steps or self.step,
            steps_per_epoch=self.steps_per_epoch, finished=finished, loss=last.get("loss"),
            z_std=last.get("z_std"), pairs_per_second=pairs_per_s, elapsed_s=elapsed, skipped=sorted(self.skipped.items()),
            model=self.model,
            knn_verdict=self.monitor.verdict(self.knn_top1) if self.monitor and self.knn_top1 is not None else None,
        )


class RunningMeans:
    """Sums of per-step tensors, read out (one device sync) only when logged."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()
        self.count += 1

    def means(self) -> dict[str, torch.Tensor]:
        return {key: total / self.count for key, total in self.sums.items()} if self.count else {}
