"""What both trainers (SimSiam pretraining, detection fine-tuning) share; each keeps its own loop.

    >>> sampler = StepBatchSampler(num_images, global_batch=512, seed=0, start_step=resumed_step)
    >>> model, network = place_model(model, device, context, channels_last=True, sync_bn=True)
    >>> amp = MixedPrecision("bf16", device)
    >>> with amp.autocast(): loss = compute_loss(network, batch)
    >>> amp.backward_and_step(loss, optimizer)
    >>> previous = open_run(run_dir, "pretrain", resume)             # refuse, resume, or a finished run
    >>> metrics = MetricsLog(run_dir / "metrics.jsonl", resumed_step, is_main=True)   # cut to the checkpoint

Training is organised by global *step*, not by epoch: the sampler maps a step to its batch, the
schedule maps a step to its learning rate, and a checkpoint records the step. That is what makes
a run resumable mid-epoch, and a time budget plannable as an exact number of steps.

The time-budget planner is pure: it never reads a clock. The loop passes in its own readings, so
tests drive it with a fake clock and, under torchrun, rank 0 alone plans and broadcasts the
result, so every rank stops at the same step on the same cosine schedule.
"""

from __future__ import annotations

import json
import signal
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_checkpoint
from .distributed import DistributedContext
from .errors import UserError
from .files import atomic_write

Report = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Which batch a step trains on


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
# The model on its device(s), and one mixed-precision step


def place_model(model: nn.Module, device: str, context: DistributedContext, channels_last: bool,
                sync_bn: bool) -> tuple[nn.Module, nn.Module]:
    """``model`` on ``device`` (and its memory format), and the network to call: DDP under torchrun.

    ``sync_bn``: BN statistics over the global batch, as the paper's 8-GPU runs. PyTorch's SyncBN
    is GPU-only: on CPUs each process normalises over its own share of the batch (DDP broadcasts
    rank 0's running statistics, so the replicas stay identical). Returns (model, network).
    """
    on_gpu = device.startswith("cuda")
    if context.enabled and sync_bn and on_gpu:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if not context.enabled:
        return model, model
    return model, DistributedDataParallel(model, device_ids=[torch.device(device).index] if on_gpu else None)


class MixedPrecision:
    """Autocast and, for fp16, the loss scaler: one backward-and-step for both trainers.

    ``amp``: "bf16", "fp16" (GPU only: its 5-bit exponent underflows small gradients without
    the scaler) or "off". The autocast follows the device's type, so a CPU run under bf16 and
    a GPU run under either use the same code.
    """

    def __init__(self, amp: str, device: str):
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp == "fp16")

    def autocast(self) -> ContextManager:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype) if self.dtype else nullcontext()

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.scaler.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# The run folder: start, resume, or refuse; and its metrics log


def open_run(run_dir: Path, kind: str, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start afresh), under the rules both commands share.

    A finished run is returned as it is (the caller says "nothing to do"); an unfinished one
    needs ``resume``; ``resume`` without a checkpoint is an error.
    """
    checkpoint_path = run_dir / "checkpoint.pt"
    previous = load_checkpoint(checkpoint_path, kind=kind) if checkpoint_path.exists() else None
    if previous is not None and not previous["finished"] and not resume:
        raise UserError(
            f"{run_dir} holds an unfinished run (step {previous['step']}): add --resume to continue it, "
            "or --name NEW to start another"
        )
    if previous is None and resume:
        raise UserError(f"nothing to resume: {checkpoint_path} does not exist (drop --resume to start a run)")
    return previous


def refuse_changed_settings(saved: Any, explicit: dict[str, Any], may_change: frozenset[str], run_dir: Path) -> None:
    """A setting given on resume that contradicts the run's own is an error, not a silent switch:
    the run would otherwise end as neither the old nor the new recipe. ``may_change`` are the
    settings that change how, not what, the run computes (device, workers, logging)."""
    for key, value in explicit.items():
        if key not in may_change and getattr(saved, key, None) != value:
            raise UserError(
                f"the run in {run_dir} was trained with {key}={getattr(saved, key, None)!r}, not {value!r}: "
                "drop that option to resume, or start a new run with --name NEW"
            )


class MetricsLog:
    """``metrics.jsonl``, one JSON object a line; written by the main process only.

    On resume, lines after the checkpoint's step are dropped first: those steps run again, and
    would otherwise be logged twice.
    """

    def __init__(self, path: Path, resumed_step: int | None, is_main: bool):
        self.path = path
        self.handle: IO[str] | None = None
        if not is_main:
            return
        if resumed_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            with atomic_write(path) as rewritten:
                rewritten.write("".join(line + "\n" for line in kept))
        self.handle = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


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


# --------------------------------------------------------------------------------------------
# How much the loader keeps in flight

#: Batches a loader worker prepares ahead, at most (PyTorch's default is 2; more hides jitter).
MAX_PREFETCH = 4
#: What the batches in flight may take: they sit in shared memory (/dev/shm) between processes.
LOADER_BYTES_BUDGET = 4 << 30


@dataclass(frozen=True)
class LoaderMemoryPlan:
    prefetch: int
    bytes_in_flight: int
    summary: str
    shared_memory_hint: str | None


def plan_loader_memory(pairs_per_batch: int, bytes_per_pair: int, workers: int, what: str,
                       shared_memory_bytes: int | None = None) -> LoaderMemoryPlan:
    """Prefetch depth so that the batches in flight stay within LOADER_BYTES_BUDGET, and a hint
    when /dev/shm cannot hold them (Docker's default is 64 MB: the first batch would fail).
    ``what``: the form the pairs travel in, for the printed summary."""
    batch_bytes = pairs_per_batch * bytes_per_pair
    prefetch = max(1, min(MAX_PREFETCH, LOADER_BYTES_BUDGET // max(workers * batch_bytes, 1)))
    in_flight = workers * prefetch * batch_bytes
    summary = (f"loader: {workers} workers x prefetch {prefetch} x {batch_bytes / 2**20:.1f} MiB a batch "
               f"({what}) = {in_flight / 2**20:.0f} MiB in flight")
    if shared_memory_bytes is None:
        shared_memory_bytes = _shared_memory_bytes()
    hint = None
    if workers > 0 and shared_memory_bytes is not None and shared_memory_bytes < 1.25 * in_flight:
        hint = (f"hint: /dev/shm holds {shared_memory_bytes / 2**20:.0f} MiB and the loader keeps up to "
                f"{in_flight / 2**20:.0f} MiB there: give the container more (docker run --shm-size="
                f"{max(1, -(-2 * in_flight // 2**30))}g), or pass --workers 0")
    return LoaderMemoryPlan(prefetch, in_flight, summary, hint)


def _shared_memory_bytes() -> int | None:
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").total
    except OSError:   # not Linux, or no /dev/shm: nothing to say
        return None


# --------------------------------------------------------------------------------------------
# The time budget


@dataclass
class TimeBudget:
    """How many steps fit in ``budget_s``, planned once after a measured warm-up and corrected
    when the pace since the plan drifts by more than ``tolerance`` (other load, thermal limits,
    slower epochs), so a run ends on time with its schedule finished."""

    budget_s: float
    steps_per_epoch: int
    tolerance: float = 0.03
    total_steps: int | None = None
    origin: tuple[int, float] | None = None   # (step, elapsed seconds) the current plan starts from
    save_seconds: float = 0.0

    def plan(self, step: int, elapsed_s: float, seconds_per_step: float, save_seconds: float) -> int:
        """The total steps that fit, given the measured step and checkpoint costs.

        ``elapsed_s`` is read after the measuring checkpoint; the final checkpoint, and one per
        epoch still to come, are paid out of the budget too.
        """
        remaining = self.budget_s - elapsed_s - save_seconds
        per_step = seconds_per_step + save_seconds / max(self.steps_per_epoch, 1)
        self.total_steps = step + max(0, int(remaining / per_step))
        self.origin = (step, elapsed_s)
        self.save_seconds = save_seconds
        return self.total_steps

    def resume(self, step: int, elapsed_s: float, total_steps: int) -> None:
        """Keep checking a plan made before an interruption, from where the run resumed."""
        self.total_steps = total_steps
        self.origin = (step, elapsed_s)

    def observe(self, step: int, elapsed_s: float) -> int | None:
        """The corrected total when the pace since planning misses the plan by more than the
        tolerance; None when the plan holds (or there is too little to judge by)."""
        if self.origin is None or self.total_steps is None:
            return None
        origin_step, origin_elapsed = self.origin
        done = step - origin_step
        if done < 2 or step >= self.total_steps:
            return None
        seconds_per_step = (elapsed_s - origin_elapsed) / done   # checkpoints included
        remaining = self.budget_s - elapsed_s - self.save_seconds
        corrected = step + max(1, int(remaining / max(seconds_per_step, 1e-9)))
        if abs(corrected - self.total_steps) <= self.tolerance * self.total_steps:
            return None
        self.total_steps = corrected
        return corrected
