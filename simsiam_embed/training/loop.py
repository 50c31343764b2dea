"""THE training loop: everything about a run that is not the method.

    >>> loop = TrainingLoop(task, RunFolder(run_dir), LoopPlan(steps_per_epoch=100, total_steps=None,
    ...                     log_every=10, budget_s=1200, batch_size=256), context, device, report)
    >>> outcome = loop.run(StopRequest(), started=time.monotonic(), show_progress=True)

A method (SimSiam pretraining, detection fine-tuning) is a :class:`TrainingTask`: its model and
optimiser, its dataset, one step on a batch -> metrics, and the state it adds to a checkpoint.
The loop owns the rest, once for every method: the step sampler, stop signals, the time budget,
checkpoint cadence, atomic save and restore, the metrics log, agreement of every rank,
divergence (decided on every rank), the loader's memory plan, the random generators, the
progress bar and the finished-run rule.

Training is organised by global *step*, not by epoch: the sampler maps a step to its batch, the
schedule maps a step to its learning rate, and a checkpoint records the step. That is what makes
a run resumable mid-epoch, and a time budget plannable as an exact number of steps.

The time-budget planner is pure: it never reads a clock. The loop passes in its own readings, so
tests drive it with a fake clock and, under torchrun, rank 0 alone plans and broadcasts the
result, so every rank stops at the same step on the same cosine schedule.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, ContextManager, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from simsiam_embed.artefacts import Checkpoint, RunFolder, check_space_for
from simsiam_embed.distributed import (
    DistributedContext, any_rank, average_bn_statistics, gather_to_main, mean_over_ranks, value_of_main,
)
from simsiam_embed.errors import Report, UserError
from simsiam_embed.files import atomic_write, write_json_atomic, write_jsonl_atomic
from simsiam_embed.images import collate_skipping_unreadable, start_workers, stop_workers
from simsiam_embed.optional import installed


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
    """Set by a signal handler (or a test); the loop checkpoints and stops at the next step.

    The loop tells it when each step began, how long steps take and which step the last complete
    checkpoint holds, so a Ctrl-C can say how long stopping will take and what a second one keeps.
    """

    def __init__(self, stop_at_step: int | None = None, clock: Callable[[], float] = time.monotonic,
                 abort: Callable[[int], None] = os._exit):
        self.requested = False
        self.stop_at_step = stop_at_step
        self.signal_number: int | None = None   # the signal that asked, for the exit status (128 + it)
        self.clock = clock
        self.abort = abort                      # ends the process now, with this exit status
        self.step_started_at: float | None = None
        self.seconds_per_step: float | None = None
        self.checkpoint_step: int | None = None

    @property
    def exit_status(self) -> int:
        """What a command that stopped early exits with: 128 + the signal, as a shell reports it
        (130 for Ctrl-C, 143 for SIGTERM); 130 when no signal asked (a test's stop_at_step)."""
        return 128 + (self.signal_number or signal.SIGINT)

    def should_stop(self, step: int) -> bool:
        return self.requested or (self.stop_at_step is not None and step >= self.stop_at_step)

    def step_began(self, at: float, seconds_per_step: float | None, checkpoint_step: int | None) -> None:
        self.step_started_at, self.seconds_per_step, self.checkpoint_step = at, seconds_per_step, checkpoint_step

    def wait_described(self) -> str:
        """How long until the step in progress ends, as far as the pace so far tells."""
        if self.step_started_at is None or self.seconds_per_step is None:
            return ""
        left = max(self.seconds_per_step - (self.clock() - self.step_started_at), 0.0)
        return f" (about {format_duration(left)} left of it)" if left >= 1 else ""

    def kept_described(self) -> str:
        return f"the checkpoint of step {self.checkpoint_step}" if self.checkpoint_step else "no checkpoint yet"


@contextmanager
def stop_on_signals(stop: StopRequest, report: Report) -> Iterator[None]:
    """First Ctrl-C or SIGTERM: finish the step, save, stop. A second Ctrl-C stops now.

    Python runs a signal handler only between bytecodes, so inside one long C call (a large
    convolution can take minutes on a CPU) a handler would neither answer nor stop anything. The
    handler here only keeps the signal from raising; the C-level handler also writes the signal's
    number to a wakeup pipe at once, and a thread that waits on that pipe acts: it says what will
    happen, and on the second Ctrl-C ends the process (exit 130). Checkpoints are written to a
    temporary file and renamed, so what is on disk is then the last complete one.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def watch() -> None:
        while True:
            try:
                received = os.read(read_end, 64)
            except OSError:
                return
            if not received:
                return
            for signum in received:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                if stop.requested and signum == signal.SIGINT and stop.signal_number == signal.SIGINT:
                    report(f"\nstopping now; {stop.kept_described()} is kept")
                    stop.abort(128 + signal.SIGINT)
                    continue
                if stop.requested:
                    continue
                stop.signal_number = signum
                stop.requested = True
                report(f"\nstopping after this step{stop.wait_described()} and saving a checkpoint "
                       f"(Ctrl-C again stops now, keeping {stop.kept_described()})")

    previous = {sig: signal.signal(sig, lambda _signum, _frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="stop-on-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_end)   # the watcher reads the end of the pipe and returns
        watcher.join(timeout=5)
        os.close(read_end)


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C and SIGTERM reach the whole process group (a terminal,
    systemd, Slurm and Kubernetes all signal the group); the main process decides when loaders
    stop. A worker that died of SIGTERM would make the main process raise instead of saving.

    A SIGTERM from the main process itself is different: it is multiprocessing's ``terminate()``
    as the main process exits (after an error, say), which then waits for the worker. Ignored,
    the main process waited for ever (issue 27). So SIGTERM is blocked and taken by a thread that
    asks who sent it: the parent ends the worker, anyone else is ignored.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):   # macOS: ignored; the loop still stops its workers itself
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # before the thread: it inherits the mask
    threading.Thread(target=_exit_on_sigterm_from, args=(parent,), name="sigterm-from-parent", daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    while True:
        received = signal.sigwaitinfo({signal.SIGTERM})
        if received.si_pid == parent:
            os._exit(0)   # 0: the main process's loader reads any other status as a crashed worker


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


def open_run(run: RunFolder, kind: str, resume: bool) -> Checkpoint | None:
    """The checkpoint to resume from (None: start afresh), under the rules both commands share.

    A finished run is returned as it is (the caller says "nothing to do"); an unfinished one
    needs ``resume``; ``resume`` without a checkpoint is an error.
    """
    previous = Checkpoint.load(run.checkpoint, kind=kind) if run.checkpoint.exists() else None
    if previous is not None and not previous.finished and not resume:
        raise UserError(
            f"{run.path} holds an unfinished run (step {previous.step}): add --resume to continue it, "
            "or --name NEW to start another"
        )
    if previous is None and resume:
        raise UserError(f"nothing to resume: {run.checkpoint} does not exist (drop --resume to start a run)")
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
    """``metrics.jsonl``, one JSON object a line; written by the main process only. With
    ``tensorboard`` installed, every number also goes to TensorBoard event files in
    ``tensorboard_dir``, under its step.

    On resume, lines (and events) after the checkpoint's step are dropped first: those steps run
    again, and would otherwise be logged twice.
    """

    def __init__(self, path: Path, resumed_step: int | None, is_main: bool, tensorboard_dir: Path | None = None):
        self.path = path
        self.handle: IO[str] | None = None
        self.tensorboard = None
        if not is_main:
            return
        if resumed_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
            with atomic_write(path) as rewritten:
                rewritten.write("".join(line + "\n" for line in kept))
        self.handle = open(path, "a")
        if tensorboard_dir is not None and tensorboard_installed():
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(tensorboard_dir),
                                             purge_step=resumed_step + 1 if resumed_step is not None else None)

    def write(self, record: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        if self.tensorboard is not None and isinstance(record.get("step"), int):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def tensorboard_installed() -> bool:
    return installed("tensorboard")


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
    workers: int                     # as asked, or fewer when even one batch each passes the budget


def plan_loader_memory(pairs_per_batch: int, bytes_per_pair: int, workers: int, what: str,
                       shared_memory_bytes: int | None = None) -> LoaderMemoryPlan:
    """Prefetch depth so that the batches in flight stay within LOADER_BYTES_BUDGET, and a hint
    when /dev/shm cannot hold them (Docker's default is 64 MB: the first batch would fail).
    ``what``: the form the pairs travel in, for the printed summary."""
    batch_bytes = pairs_per_batch * bytes_per_pair
    asked = workers
    if workers > 1 and workers * batch_bytes > LOADER_BYTES_BUDGET:
        # Each worker holds at least one batch: past the budget even at prefetch 1, fewer workers.
        workers = max(1, LOADER_BYTES_BUDGET // max(batch_bytes, 1))
    prefetch = max(1, min(MAX_PREFETCH, LOADER_BYTES_BUDGET // max(workers * batch_bytes, 1)))
    in_flight = workers * prefetch * batch_bytes
    fewer = (f" ({asked} asked: {asked} batches in flight would pass the {LOADER_BYTES_BUDGET / 2**30:.0f} GiB "
             "loader budget)") if workers < asked else ""
    summary = (f"loader: {workers} workers{fewer} x prefetch {prefetch} x {batch_bytes / 2**20:.1f} MiB a batch "
               f"({what}) = {in_flight / 2**20:.0f} MiB in flight")
    if shared_memory_bytes is None:
        shared_memory_bytes = _shared_memory_bytes()
    hint = None
    if workers > 0 and shared_memory_bytes is not None and shared_memory_bytes < 1.25 * in_flight:
        hint = (f"hint: /dev/shm holds {shared_memory_bytes / 2**20:.0f} MiB and the loader keeps up to "
                f"{in_flight / 2**20:.0f} MiB there: give the container more (docker run --shm-size="
                f"{max(1, -(-2 * in_flight // 2**30))}g), or pass --workers 0")
    return LoaderMemoryPlan(prefetch, in_flight, summary, hint, workers)


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
    slower epochs), so a run ends on time with its schedule finished.

    ``relative_cost(progress)`` is a step's cost at that share of the schedule, relative to the
    schedule's costliest step (progressive resizing runs cheap small crops first); None: every
    step costs the same. The plan then counts time in units of a full step.
    """

    budget_s: float
    steps_per_epoch: int
    tolerance: float = 0.03
    total_steps: int | None = None
    origin: tuple[int, float] | None = None   # (step, elapsed seconds) the current plan starts from
    save_seconds: float = 0.0
    relative_cost: Callable[[float], float] | None = None

    def plan(self, step: int, elapsed_s: float, seconds_per_step: float, save_seconds: float) -> int:
        """The total steps that fit, given the measured step and checkpoint costs.

        ``elapsed_s`` is read after the measuring checkpoint; the final checkpoint, and one per
        epoch still to come, are paid out of the budget too. The measured steps are the
        schedule's first, so they cost what its start does.
        """
        remaining = self.budget_s - elapsed_s - save_seconds
        full_step = seconds_per_step / self._cost(0.0)
        self.total_steps = step + self._steps_that_fit(step, remaining, full_step, save_seconds / max(self.steps_per_epoch, 1))
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
        if step - origin_step < 2 or step >= self.total_steps:
            return None
        total = self.total_steps
        full_step = (elapsed_s - origin_elapsed) / max(self._cost_of_steps(origin_step, step, total), 1e-9)   # checkpoints included
        remaining = self.budget_s - elapsed_s - self.save_seconds
        # Within the tolerance, in time (what tolerance x total steps of this pace take): the plan
        # holds, and the search below is not needed (it runs at most once a step otherwise).
        if abs(full_step * self._cost_of_steps(step, total, total) - remaining) <= \
                self.tolerance * full_step * self._cost_of_steps(0, total, total):
            return None
        corrected = step + max(1, self._steps_that_fit(step, remaining, full_step, 0.0))
        if abs(corrected - self.total_steps) <= self.tolerance * self.total_steps:
            return None
        self.total_steps = corrected
        return corrected

    def _cost(self, progress: float) -> float:
        return 1.0 if self.relative_cost is None else self.relative_cost(progress)

    #: Steps costed one by one up to this many; a longer stretch by this many evenly spaced ones.
    COST_SAMPLES = 256

    def _cost_of_steps(self, first: int, end: int, total: int) -> float:
        """Steps ``first``..``end - 1`` of a ``total``-step schedule, in full steps."""
        count = end - first
        if count <= 0:
            return 0.0
        if self.relative_cost is None:
            return float(count)
        if count <= self.COST_SAMPLES:
            return sum(self.relative_cost(i / total) for i in range(first, end))
        spacing = count / self.COST_SAMPLES
        return spacing * sum(self.relative_cost((first + (j + 0.5) * spacing) / total) for j in range(self.COST_SAMPLES))

    def _steps_that_fit(self, step: int, remaining_s: float, full_step_s: float, per_step_s: float) -> int:
        """The most steps after ``step`` whose cost (``full_step_s`` a full step, plus
        ``per_step_s`` each) fits in ``remaining_s``, the schedule ending with them."""
        def fits(count: int) -> bool:
            return full_step_s * self._cost_of_steps(step, step + count, step + count) + per_step_s * count <= remaining_s

        if self.relative_cost is None:   # every step alike: a division, exactly
            return max(0, int(remaining_s / (full_step_s + per_step_s)))
        low, high = 0, 1
        while fits(high) and high < 1 << 40:   # the cost grows with the count: double, then bisect
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low


# --------------------------------------------------------------------------------------------
# Random generators: saved with every checkpoint, so a resumed run draws what an uninterrupted one would


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


# --------------------------------------------------------------------------------------------
# The loop and the tasks it runs


class TrainingTask(Protocol):
    """What a training method gives the loop; everything else is the loop's.

    A third method is one task file and one model file. BYOL, for example::

        class ByolTask:
            kind = "pretrain"
            def __init__(self, settings, paths, context, device):
                self.settings = settings
                self.model, self.network = place_model(Byol(build_backbone(...)), device, context, True, True)
                self.optimizer = torch.optim.SGD(self.model.parameters(), lr=settings.lr, momentum=0.9)
                self.amp = MixedPrecision(settings.amp, device)
                self.dataset = TwoViewDataset(paths, byol_augmentation(settings.crop_size))
            def loader_shape(self):                      # how samples stack, and their size in flight
                return default_collate, 2 * 3 * 224 ** 2 * 4, "float32 views"
            def begin_step(self, step, total_steps):     # what the schedule sets for a step; -> lr
                return set_lr(self.optimizer, cosine_lr(self.settings.lr, step, total_steps or step + 1))
            def train_step(self, batch):
                loss = self.network(*batch)             # -> metrics, "loss" among them
                self.amp.backward_and_step(loss, self.optimizer)
                self.model.update_target_network()
                return {"loss": loss.detach()}

    ``extra_state``/``load_extra_state`` (what the task adds to a checkpoint), ``on_start``,
    ``on_log``, ``on_epoch_end``, ``postfix`` and ``relative_step_cost`` (for a time budget, when
    steps cost more as the schedule goes on) are optional: :class:`TaskDefaults` supplies them.
    """

    kind: str
    settings: Any                  # a SavedSettings dataclass: saved as config.json and in the checkpoint
    model: nn.Module               # the module whose weights are saved
    network: nn.Module             # the module that trains (DDP under torchrun)
    optimizer: torch.optim.Optimizer
    amp: MixedPrecision
    dataset: Any                   # indexed by the sampler's (sample_seed, index) keys

    def loader_shape(self) -> tuple[Callable[[list], Any], int, str]: ...
    def begin_step(self, step: int, total_steps: int | None) -> float: ...
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]: ...
    def extra_state(self) -> dict[str, Any]: ...
    def load_extra_state(self, extra: dict[str, Any]) -> None: ...
    def on_start(self, step: int, log: "MetricsLog") -> None: ...
    def on_log(self, step: int, means: dict[str, float]) -> None: ...
    def on_epoch_end(self, step: int, means: dict[str, float], finished: bool) -> dict[str, Any]: ...
    def postfix(self, means: dict[str, float], lr: float) -> list[str]: ...
    def relative_step_cost(self, progress: float) -> float: ...


class TaskDefaults:
    """The optional parts of a :class:`TrainingTask`, doing nothing."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def on_start(self, step: int, log: "MetricsLog") -> None:
        pass

    def on_log(self, step: int, means: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, step: int, means: dict[str, float], finished: bool) -> dict[str, Any]:
        return {}

    def postfix(self, means: dict[str, float], lr: float) -> list[str]:
        return [f"loss {means['loss']:.3f}" if "loss" in means else "", f"lr {lr:.3g}"]

    def relative_step_cost(self, progress: float) -> float:
        return 1.0


@dataclass
class LoopPlan:
    """How long a run is and how often it logs: ``total_steps`` None means ``budget_s`` plans it."""

    steps_per_epoch: int
    total_steps: int | None
    log_every: int
    batch_size: int                  # samples a step over all ranks: the pace is reported per sample
    seed: int
    workers: int
    budget_s: float | None = None
    # A time budget's steps as estimated before the first (by a probe): the progress bar's total,
    # and so its ETA, until the first step measures the real pace and plans the run.
    expected_steps: int | None = None
    sample_name: str = "images"      # what a sample is, in the progress line ("image pairs")
    rate_key: str = "images_per_s"   # the pace's name in metrics.jsonl
    schedule: str = "learning-rate schedule"   # what a time budget plans, in its report
    log_constants: dict[str, float] = field(default_factory=dict)   # written with every logged step
    epoch_records: bool = True       # a line of epoch means (and the task's epoch-end record) a epoch
    resume_hint: str = "the same command and --resume"
    shorter_run_hint: str = ""       # how to ask this task for a shorter run, said when a run is long
    slow_step_hint: str = "a smaller batch"   # how to make this task's steps cheaper, said when one is too slow
    divergence_hint: str = "lower --base-lr"


@dataclass
class LoopOutcome:
    finished: bool
    step: int
    total_steps: int
    elapsed_s: float
    means: dict[str, float]          # the last logged means (loss, ...)
    samples_per_s: float | None
    skipped: list[tuple[str, str]]
    replans: int = 0                 # corrections of a time budget's plan to the pace (metrics.jsonl has each)


class TrainingLoop:
    """Runs a :class:`TrainingTask` from its first (or resumed) step to the planned last one."""

    #: Timed steps (after one untimed) that measure the pace a long run's duration is told from.
    BUDGET_WARMUP_STEPS = 5
    #: A time-budget run ends within this share of the budget past it (or one step, if longer).
    BUDGET_MARGIN = 0.05

    def __init__(self, task: TrainingTask, run: RunFolder, plan: LoopPlan, context: DistributedContext,
                 device: str, report: Report, clock: Callable[[], float] = time.monotonic):
        self.task, self.folder, self.plan = task, run, plan
        self.context, self.device, self.report, self.clock = context, device, report, clock
        self.step = 0
        self.total_steps = plan.total_steps
        self.elapsed_before = 0.0
        self.skipped: dict[str, str] = {}   # path -> why it could not be read, over every rank
        self.saved_step: int | None = None
        self.resumed_from: int | None = None
        self.budget = (TimeBudget(plan.budget_s, plan.steps_per_epoch, relative_cost=task.relative_step_cost)
                       if plan.budget_s else None)
        self.replans: list[dict] = []       # corrections of the budget's plan, written to metrics.jsonl
        self.on_first_save: Callable[[], None] = lambda: None   # e.g. LATEST moves once the run has a checkpoint

    # -- persistence -------------------------------------------------------------------------

    def restore(self, checkpoint: Checkpoint) -> None:
        task = self.task
        try:
            task.model.load_state_dict(checkpoint.model)
            task.optimizer.load_state_dict(checkpoint.optimizer or {})
        except (RuntimeError, KeyError, ValueError) as error:
            raise UserError(f"the checkpoint does not fit its own network ({str(error).splitlines()[0]})") from None
        task.amp.load_state_dict(checkpoint.scaler)
        if checkpoint.rng:
            restore_rng_state(checkpoint.rng)
        self.step = self.saved_step = self.resumed_from = checkpoint.step
        self.total_steps = checkpoint.total_steps if checkpoint.total_steps is not None else self.total_steps
        self.elapsed_before = checkpoint.elapsed_s
        self.skipped.update(checkpoint.skipped)
        task.load_extra_state(checkpoint.extra)

    def _checkpoint(self, finished: bool, elapsed_s: float) -> Checkpoint:
        task = self.task
        return Checkpoint(
            kind=task.kind, settings=task.settings.to_dict(), step=self.step, total_steps=self.total_steps,
            finished=finished, elapsed_s=elapsed_s, model=task.model.state_dict(),
            optimizer=task.optimizer.state_dict(), scaler=task.amp.state_dict(), rng=capture_rng_state(),
            skipped=dict(self.skipped), extra=task.extra_state(),
        )

    def check_space(self) -> None:
        """Before the first step: the folder must hold a checkpoint, or hours of training are lost.

        Sized from the tensors it will hold, nearly all of its bytes: weights and buffers, and one
        tensor the size of each trained parameter for the optimiser's state (SGD's momentum, which
        does not exist before the first step), rather than by serialising one, which would copy
        every tensor once more.
        """
        if self.context.is_main:
            trained = [p for group in self.task.optimizer.param_groups for p in group["params"]]
            tensors = [*self.task.model.state_dict().values(), *trained]
            size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            check_space_for(self.folder.checkpoint, size)

    def save(self, finished: bool, elapsed_s: float) -> float:
        """Write the checkpoint (main process only; every rank must call it); returns its seconds.

        Weights that went non-finite never reach a checkpoint: the last good one is kept. After
        the BN statistics are averaged every rank holds the same weights, so every rank decides alike.
        """
        began = self.clock()
        average_bn_statistics(self.task.model, self.context)
        finite = all(bool(torch.isfinite(p).all()) for p in self.task.model.parameters())
        self._stop_if_diverged(finite, "the weights")
        for found in gather_to_main(self.skipped, self.context):   # each rank met its own unreadable files
            self.skipped.update(found)
        if self.context.is_main:
            self._checkpoint(finished, elapsed_s).save(self.folder.checkpoint)
            write_jsonl_atomic(self.folder.skipped, [{"path": path, "reason": reason}
                                                  for path, reason in sorted(self.skipped.items())])
            if self.saved_step is None or self.saved_step == self.resumed_from:
                self.on_first_save()
        self.saved_step = self.step
        seconds = self.clock() - began
        if self.budget is not None:
            self.budget.save_seconds = seconds   # the final checkpoint is paid out of the budget too
        return seconds

    def _stop_if_diverged(self, finite: bool, what: str) -> None:
        if finite:
            return
        kept = (f"the last good checkpoint (step {self.saved_step}) is kept" if self.saved_step is not None
                else "no checkpoint was written")
        raise UserError(f"training diverged: {what} became NaN or infinite by step {self.step}; {kept}. "
                        f"{self.plan.divergence_hint[:1].upper()}{self.plan.divergence_hint[1:]} and start again with --name NEW")

    # -- the loader --------------------------------------------------------------------------

    def _loader(self) -> Iterator:
        stack, sample_bytes, what = self.task.loader_shape()
        sampler = StepBatchSampler(len(self.task.dataset), self.plan.batch_size, self.plan.seed, self.step, self.context)
        memory = plan_loader_memory(self.plan.batch_size // self.context.world_size, sample_bytes, self.plan.workers, what)
        workers = memory.workers
        self.report(memory.summary)
        if memory.shared_memory_hint:
            self.report(memory.shared_memory_hint)
        loader = DataLoader(
            self.task.dataset, batch_sampler=sampler, num_workers=workers,
            collate_fn=partial(collate_skipping_unreadable, stack=stack),
            pin_memory=self.device.startswith("cuda"), persistent_workers=workers > 0,
            worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
            prefetch_factor=memory.prefetch if workers > 0 else None,
        )
        # The loader draws its base seed from the global generator, which a task's own sampling
        # (a detector's box samplers) uses too: isolate it, so a resumed run draws what the
        # uninterrupted one would.
        with torch.random.fork_rng(devices=[]):
            return start_workers(loader)

    # -- the run -----------------------------------------------------------------------------

    def resume_and_run(self, previous: Checkpoint | None, stop: StopRequest, started: float,
                       show_progress: bool) -> LoopOutcome:
        """Continue from ``previous`` (None: the first step), with Ctrl-C and SIGTERM asking ``stop``."""
        if previous is not None:
            self.restore(previous)
            self.report(f"resuming {self.folder.path} at step {self.step}/{self.total_steps or '?'}")
        with stop_on_signals(stop, self.report):
            return self.run(stop, started, show_progress)

    def run(self, stop: StopRequest, started: float, show_progress: bool) -> LoopOutcome:
        """Train to the last step (finished), or until ``stop`` asks; checkpoints every epoch."""
        self.task.network.train()
        self.check_space()
        loader = self._loader()
        try:
            return self._run_steps(loader, stop, started, show_progress)
        finally:
            stop_workers(loader)   # on every way out: an error must not leave the process waiting for them

    def _run_steps(self, loader: Iterator, stop: StopRequest, started: float, show_progress: bool) -> LoopOutcome:
        task, plan = self.task, self.plan
        timed_from: tuple[int, float] | None = None
        window, epoch_means = RunningMeans(), RunningMeans()
        means: dict[str, float] = {}
        samples_per_s: float | None = None
        lr = 0.0
        bar = tqdm(total=self.total_steps or plan.expected_steps, initial=self.step, unit="step",
                   disable=not show_progress, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30, file=sys.stderr)
        metrics = MetricsLog(self.folder.metrics, self.resumed_from, self.context.is_main, self.folder.tensorboard)
        if metrics.tensorboard is not None and self.step == 0:
            self.report(f"TensorBoard: tensorboard --logdir {self.folder.tensorboard}")
        elapsed = lambda: self.elapsed_before + self.clock() - started  # noqa: E731  (this run's own clock)
        if self.budget is not None and self.total_steps is not None:
            self.budget.resume(self.step, elapsed(), self.total_steps)   # a resumed budget run keeps checking its plan
        task.on_start(self.step, metrics)
        step_seconds: float | None = None   # the latest step's wall time (the first one's includes start-up)
        step_began = self.clock()
        logged_step: int | None = None

        def log(now: float) -> None:
            nonlocal means, window, logged_step
            if window.count:
                # A mean over every rank: each rank sees the same value, so a non-finite
                # loss stops every rank at this step, where one rank alone raising would
                # leave the others waiting in DDP's backward.
                means = {key: float(mean_over_ranks(v, self.context)) for key, v in window.means().items()}
                self._stop_if_diverged(math.isfinite(means.get("loss", 0.0)), "the loss")
                task.on_log(self.step, means)
            window = RunningMeans()
            metrics.write({"step": self.step, "epoch": self.step / plan.steps_per_epoch, "lr": lr, **means,
                           **plan.log_constants, plan.rate_key: samples_per_s,
                           "time_s": round(self.elapsed_before + now - started, 2)})
            bar.set_postfix_str(self._postfix(means, lr, samples_per_s), refresh=False)
            logged_step = self.step

        try:
            while self.total_steps is None or self.step < self.total_steps:
                # Every step in one process; under torchrun at the logged steps, where every rank asks.
                if (self.budget is not None and step_seconds is not None
                        and (not self.context.enabled or self.step % plan.log_every == 0)
                        and self._another_step_overruns(elapsed(), step_seconds)):
                    if logged_step != self.step:   # the last step's metrics: a short run's curve ends where it did
                        log(self.clock())
                    break
                stop.step_began(step_began, step_seconds, self.saved_step)
                batch, failures = next(loader)
                self.skipped.update(failures)
                lr = task.begin_step(self.step, self.total_steps)
                if batch is not None:
                    values = task.train_step(batch)
                    window.add(**values)
                    epoch_means.add(**values)
                self.step += 1
                bar.update(1)
                now = self.clock()
                step_seconds, step_began = now - step_began, now
                if timed_from is None:
                    timed_from = (self.step, now)   # the first step pays for start-up; not in the pace
                timed_steps = self.step - timed_from[0]
                samples_per_s = timed_steps * plan.batch_size / (now - timed_from[1]) if timed_steps else None

                if self.total_steps is None:
                    # Planned on the first step, start-up included: a budget may not afford more
                    # before it knows how many steps fit (corrections follow, see _correct_time_plan).
                    self._plan_time_budget(step_seconds, elapsed)
                    bar.total = self.total_steps
                    bar.refresh()
                    step_began = self.clock()   # the measuring checkpoint is not the next step's time
                elif timed_steps == self.BUDGET_WARMUP_STEPS and self.budget is None:
                    self._report_duration((now - timed_from[1]) / timed_steps)

                finished = self.total_steps is not None and self.step >= self.total_steps
                # The first step of every process too: a run stopped before its first log_every
                # still has curves to draw from its first step (the report quotes what it drew).
                if self.step % plan.log_every == 0 or finished or self.step == timed_from[0]:
                    log(now)

                end_of_epoch = self.step % plan.steps_per_epoch == 0
                if end_of_epoch or finished:
                    epoch_record = {key: float(mean_over_ranks(v, self.context)) for key, v in epoch_means.means().items()}
                    epoch_means = RunningMeans()
                    epoch_record.update(task.on_epoch_end(self.step, epoch_record, finished))
                    if plan.epoch_records:
                        metrics.write({"step": self.step, "epoch_end": math.ceil(self.step / plan.steps_per_epoch),
                                       **epoch_record})
                    bar.set_postfix_str(self._postfix(means, lr, samples_per_s), refresh=False)
                if finished:
                    break
                # Under torchrun, asking every rank is a collective (a device sync on GPUs): only at
                # logged steps. A single process checks its own flag every step.
                ask_ranks = not self.context.enabled or self.step % plan.log_every == 0
                if ask_ranks and any_rank(stop.should_stop(self.step), self.context, self.device):
                    stopped_at = elapsed()
                    self.save(finished=False, elapsed_s=stopped_at)
                    bar.close()
                    self.report(f"stopped at step {self.step}/{self.total_steps or '?'}; checkpoint saved. "
                                f"Continue with: {plan.resume_hint}")
                    return self._outcome(False, means, samples_per_s, stopped_at)
                if end_of_epoch:
                    self.save(finished=False, elapsed_s=elapsed())
                    step_began = self.clock()
                # Corrected every step in one process (the first plan includes start-up, so the
                # first correction comes two steps later); under torchrun at the logged steps.
                if (self.budget is not None and (not self.context.enabled or self.step % plan.log_every == 0)
                        and self._correct_time_plan(elapsed())):
                    bar.total = self.total_steps
                    bar.refresh()
                    metrics.write(self.replans[-1])
                    step_began = self.clock()
        finally:
            bar.close()
            metrics.close()
        total = elapsed()
        self.save(finished=True, elapsed_s=total)
        return self._outcome(True, means, samples_per_s, total)

    def _outcome(self, finished: bool, means: dict[str, float], samples_per_s: float | None,
                 elapsed_s: float) -> LoopOutcome:
        return LoopOutcome(finished, self.step, self.total_steps or self.step, elapsed_s, means, samples_per_s,
                           sorted(self.skipped.items()), len(self.replans))

    def _postfix(self, means: dict[str, float], lr: float, samples_per_s: float | None) -> str:
        parts = self.task.postfix(means, lr) + [f"{samples_per_s:.0f} img/s" if samples_per_s else ""]
        return ", ".join(part for part in parts if part)

    def _write_settings(self) -> None:
        if self.context.is_main:
            write_json_atomic(self.folder.config, self.task.settings.to_dict())

    def _plan_time_budget(self, seconds_per_step: float, elapsed: Callable[[], float]) -> None:
        """Fix the number of steps that fits the budget, so the schedule finishes on time.

        Planned on rank 0's clock and broadcast: ranks that planned on their own clocks would
        stop at different steps (and hang in a collective), after drifting on different lrs.
        """
        save_seconds = self.save(finished=False, elapsed_s=elapsed())   # also measures a checkpoint's cost
        planned = self.budget.plan(self.step, elapsed(), seconds_per_step, save_seconds)
        self.total_steps = value_of_main(planned, self.context, self.device)
        self.budget.total_steps = self.task.settings.total_steps = self.total_steps
        self._write_settings()
        self.report(
            f"time budget {format_duration(self.plan.budget_s)}: {seconds_per_step:.2f} s/step measured -> "
            f"{self.total_steps} steps ({self.total_steps / self.plan.steps_per_epoch:.1f} epochs), "
            f"{self.plan.schedule} planned over exactly those"
        )
        if seconds_per_step > self.plan.budget_s / 3:
            self.report(f"warning: one step took {format_duration(seconds_per_step)}, more than a third of the "
                        f"{format_duration(self.plan.budget_s)} budget: {self.total_steps} step(s) fit, too few to "
                        f"learn from. For more steps in this time use {self.plan.slow_step_hint}")

    def _another_step_overruns(self, elapsed_s: float, step_seconds: float) -> bool:
        """Whether one more step and the final checkpoint would end past the budget's 5% margin;
        then the run ends here, on time, though its schedule is cut short (the plan and its
        corrections keep this rare: it takes a pace that changed since the last logged step)."""
        limit = self.plan.budget_s * (1 + self.BUDGET_MARGIN)
        overruns = elapsed_s + step_seconds + self.budget.save_seconds > limit
        if not value_of_main(int(overruns), self.context, self.device):   # rank 0's clock decides for all
            return False
        ending = self.total_steps = self.budget.total_steps = self.task.settings.total_steps = self.step
        self._write_settings()
        self.report(f"\nending at step {ending}: another step would end past the time budget "
                    f"({format_duration(self.plan.budget_s)})")
        return True

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
        self.total_steps = self.budget.total_steps = self.task.settings.total_steps = corrected
        self._write_settings()
        return True

    def _report_duration(self, seconds_per_step: float) -> None:
        remaining = (self.total_steps - self.step) * seconds_per_step
        if remaining > 600:
            self.report(f"at {self.plan.batch_size / seconds_per_step:.0f} {self.plan.sample_name}/s this run needs "
                        f"about {format_duration(remaining)} more. Ctrl-C saves a checkpoint (--resume continues)"
                        + (f"; {self.plan.shorter_run_hint}." if self.plan.shorter_run_hint else "."))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
