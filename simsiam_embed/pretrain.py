"""The SimSiam training loop: optimizer, cosine schedule, collapse monitor, kNN monitor.

    >>> result = pretrain("./images", Workspace(Path.cwd()), overrides={"epochs": 10})

What is not SimSiam (step sampler, signals, model placement, the mixed-precision step, the run
folder's resume rules, the metrics log, the time-budget planner) is in :mod:`.training`, which
detection fine-tuning shares.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from .augment import (
    AugmentationRecipe, BatchAugment, crop_on_device, draw_uncropped_views, draw_view, stack_uncropped,
)
from .checkpoint import (
    build_model, capture_rng_state, preprocessing_for, restore_rng_state, save_checkpoint,
)
from .config import PretrainConfig, resolve_pretrain_config
from .data import (
    TwoViewDataset,
    collate_skipping_unreadable,
    discover_images,
    scan_images,
    simsiam_augmentation,
    start_workers,
    training_draft_side,
)
from .distributed import (
    DistributedContext, agree_on_every_rank, any_rank, average_bn_statistics, device_for_rank, distributed_session,
    from_main, gather_to_main, mean_over_ranks, value_of_main,
)
from .errors import UserError
from .evaluate import KnnMonitor
from .files import ensure_writable_folder, write_json_atomic, write_jsonl_atomic
from .models import SimSiam, simsiam_loss
from .report import COLLAPSE_FRACTION, write_run_report
from .training import (
    MetricsLog, MixedPrecision, RunningMeans, StepBatchSampler, StopRequest, TimeBudget, ignore_stop_signals_in_worker,
    open_run, place_model, plan_loader_memory, refuse_changed_settings, stop_on_signals,
)
from .workspace import Workspace, run_name_for

#: Settings that may differ when resuming: they change how, not what, the run computes.
RESUMABLE_OVERRIDES = frozenset({"num_workers", "device", "log_every", "decode_draft", "val_dir", "val_every"})


Report = Callable[[str], None]


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
    previous = open_run(run_dir, "pretrain", resume)
    if previous is not None and previous["finished"]:
        config = PretrainConfig.from_dict(previous["config"], source=checkpoint_path)
        report(f"{run_dir} is a finished run ({previous['step']} steps): nothing to do. "
               "Use --name NEW for another run, or `simsiam-embed index` to use this one.")
        return PretrainResult(run_dir, config, previous["step"], previous["step"],
                              previous.get("steps_per_epoch", 1), finished=True, already_finished=True)

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
            str(data_dir.resolve()), run_name, len(scan.paths), scan.median_short_side, device, overrides,
            processes=context.world_size,
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
        result = trainer.run(stop, started, show_progress and context.is_main)
    if context.is_main:
        _write_report(run_dir, report)
    return result


def _write_report(run_dir: Path, report: Report) -> None:
    """The curves of a run that ended or stopped; a failure to draw them never fails the run."""
    try:
        written = write_run_report(run_dir)
    except (UserError, OSError) as error:
        report(f"note: the run report was not written ({error})")
        return
    report(f"report: {written.page}")


def _pairs_in(batch: tuple) -> int:
    """Pairs in a batch of any of the three loader layouts (see _Trainer._loader)."""
    first = batch[0]
    return len(first[0] if isinstance(first, tuple) else first)


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
    refuse_changed_settings(config, overrides, RESUMABLE_OVERRIDES, run_dir)
    for key in RESUMABLE_OVERRIDES & set(overrides):
        setattr(config, key, overrides[key])
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
        self.model, self.network = place_model(build_model(config), device, context, config.channels_last, sync_bn=True)
        if device.startswith("cuda"):
            # Training crops have one fixed size, so cuDNN's per-shape algorithm search pays off
            # after the first step (GPU-only; checked by bench/gpu_check.py).
            torch.backends.cudnn.benchmark = True
        self.optimizer = make_optimizer(self.model, config)
        self.amp = MixedPrecision(config.amp, device)
        self.recipe = AugmentationRecipe(config.crop_size, config.min_crop_scale, config.color_jitter, config.blur)
        self.augment_batch = BatchAugment(self.recipe, device)
        self.steps_per_epoch = len(paths) // config.batch_size
        self.step = 0
        self.total_steps: int | None = config.total_steps or (
            config.epochs * self.steps_per_epoch if config.epochs else None
        )
        self.elapsed_before = 0.0
        self.skipped: dict[str, str] = {}   # path -> why it could not be read
        self.metrics_path = run_dir / "metrics.jsonl"
        # On every rank: each embeds its share of the labelled images (see KnnMonitor.top1).
        self.monitor = (KnnMonitor(Path(config.val_dir), preprocessing_for(config), device, context=context)
                        if config.val_dir else None)
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
        self.amp.load_state_dict(state.get("scaler"))
        restore_rng_state(state["rng"])
        self.step = self.saved_step = self.resumed_from = state["step"]
        self.total_steps = state["total_steps"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
        if self.monitor is not None:
            self.monitor.random_init_top1 = state.get("knn_random_init_top1")
        self.skipped.update(state.get("skipped", {}))

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
            "scaler": self.amp.state_dict(),
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
        draft = training_draft_side(config.crop_size, config.min_crop_scale) if config.decode_draft else None
        view_bytes = 3 * config.crop_size ** 2
        stack = default_collate
        if config.crop_on_device:   # workers decode; crops, colour and blur on the device
            dataset = TwoViewDataset(self.paths, draft_side=draft, pair=partial(draw_uncropped_views, recipe=self.recipe))
            stack = stack_uncropped
            # A drafted decode keeps the shorter side >= draft (up to twice that), at 4:3 or so.
            side = 2 * (draft or 2 * config.crop_size)
            sample_bytes, what = 3 * side * side * 4 // 3, "decoded images"
        elif config.augment_on_device:   # workers crop; colour and blur on the device
            dataset = TwoViewDataset(self.paths, partial(draw_view, recipe=self.recipe), draft)
            sample_bytes, what = 2 * view_bytes, "uint8 crops"
        else:   # the per-image path, kept as the baseline bench/bench_loader.py compares against
            dataset = TwoViewDataset(self.paths, simsiam_augmentation(
                config.crop_size, config.blur, min_crop_scale=config.min_crop_scale, color_jitter=config.color_jitter),
                draft)
            sample_bytes, what = 2 * view_bytes * 4, "float32 views"
        sampler = StepBatchSampler(len(self.paths), config.batch_size, config.seed, self.step, self.context)
        workers = config.num_workers
        plan = plan_loader_memory(config.batch_size // self.context.world_size, sample_bytes, workers, what)
        self.report(plan.summary)
        if plan.shared_memory_hint:
            self.report(plan.shared_memory_hint)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=partial(collate_skipping_unreadable, stack=stack),
            pin_memory=self.device.startswith("cuda"),
            persistent_workers=workers > 0,
            worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
            prefetch_factor=plan.prefetch if workers > 0 else None,
        )

    def _views_on_device(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views as normalised float batches on the training device, in its memory format."""
        memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        if self.config.crop_on_device:
            images, boxes, flips, parameters = batch
            crops = crop_on_device(images, boxes, flips, self.config.crop_size, self.device)
            parameters = torch.cat([parameters[:, 0], parameters[:, 1]])
        elif self.config.augment_on_device:
            (crops1, parameters1), (crops2, parameters2) = batch
            crops = torch.cat([crops1, crops2]).to(self.device, non_blocking=True)
            parameters = torch.cat([parameters1, parameters2])
        else:
            return tuple(view.to(self.device, non_blocking=True, memory_format=memory_format) for view in batch)
        views = self.augment_batch(crops, parameters.to(self.device, non_blocking=True))
        views = views.contiguous(memory_format=memory_format)
        return views[:len(views) // 2], views[len(views) // 2:]

    def _train_step(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        view1, view2 = self._views_on_device(batch)
        with self.amp.autocast():
            output = self.network(view1, view2)
            loss = simsiam_loss(output, symmetric=config.symmetric_loss)
        self.amp.backward_and_step(loss, self.optimizer)
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
        loader = start_workers(self._loader())   # before the bar: it prints the loader's memory plan
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not show_progress,
                   dynamic_ncols=True, mininterval=0.5 if is_tty else 30, file=sys.stderr)
        metrics = MetricsLog(self.metrics_path, self.resumed_from, self.context.is_main)
        elapsed = lambda: self.elapsed_before + time.monotonic() - started  # noqa: E731  (this run's own clock)
        if self.budget is not None and self.total_steps is not None:
            self.budget.resume(self.step, elapsed(), self.total_steps)   # a resumed budget run keeps checking its plan
        if self.monitor is not None and self.monitor.random_init_top1 is None and self.step == 0:
            self.monitor.random_init_top1 = self._knn_top1()
            self.report(f"kNN top-1 on {config.val_dir} at random init: {self.monitor.random_init_top1:.3f}")
            metrics.write({"step": 0, "knn_top1_random_init": self.monitor.random_init_top1})
        try:
            while self.total_steps is None or self.step < self.total_steps:
                batch, failures = next(loader)
                self.skipped.update(failures)
                lr = set_learning_rate(self.optimizer, config, self.step, self.total_steps)
                if batch is not None and _pairs_in(batch) >= 2:
                    loss, z_std = self._train_step(batch)
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
                    metrics.write(record)

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
                    metrics.write(self.replans[-1])
        finally:
            bar.close()
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

    def _end_epoch(self, means: dict[str, float], collapse_level: float, metrics: MetricsLog) -> None:
        epoch = math.ceil(self.step / self.steps_per_epoch)
        record = {"step": self.step, "epoch_end": epoch, **means}
        z_std = means.get("z_std")
        if z_std is not None and z_std < collapse_level:
            record["collapse_warning"] = True
            self.report(
                f"warning: epoch {epoch}: the outputs are collapsing (z-std {z_std:.4f}, a healthy run stays near "
                f"1/sqrt(dim) = {1 / math.sqrt(self.config.dim):.4f}); lower the learning rate, or check the ablation flags"
            )
        metrics.write(record)

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


