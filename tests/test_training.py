"""The time-budget planner, driven by a fake clock: no test here depends on this machine's speed."""

from __future__ import annotations

import pytest

from simsiam_embed.training.loop import TimeBudget


def test_the_plan_fits_the_steps_and_the_checkpoints_in_the_budget():
    budget = TimeBudget(budget_s=100.0, steps_per_epoch=10)
    # 10 s gone, 1 s a step, 2 s a checkpoint: 88 s left after the final save, 1.2 s a step
    # with one checkpoint every 10 steps -> 73 more steps.
    assert budget.plan(step=6, elapsed_s=10.0, seconds_per_step=1.0, save_seconds=2.0) == 6 + 73


def simulate(budget: TimeBudget, planned_pace: float, real_pace: float, log_every: int = 10) -> tuple[float, int, int]:
    """Run a fake loop: steps take ``real_pace`` s after a plan measured at ``planned_pace``.
    Returns (finish time, final total, corrections)."""
    clock, step = 6 * planned_pace, 6
    budget.plan(step, clock, planned_pace, save_seconds=0.0)
    corrections = 0
    while step < budget.total_steps:
        step += 1
        clock += real_pace
        if step % log_every == 0 and budget.observe(step, clock) is not None:
            corrections += 1
    return clock, budget.total_steps, corrections


@pytest.mark.parametrize("real_pace", [0.5, 0.8, 1.25, 2.0])
def test_a_drifting_pace_is_corrected_so_the_run_ends_on_time(real_pace):
    budget = TimeBudget(budget_s=600.0, steps_per_epoch=1000)
    finished_at, total, corrections = simulate(budget, planned_pace=1.0, real_pace=real_pace)
    assert corrections >= 1
    # Ends within the last logging interval of the budget, never far past it.
    assert 600.0 - 10 * real_pace - 1e-6 <= finished_at <= 600.0 + 10 * real_pace + 1e-6, (finished_at, total)


def test_a_pace_within_the_tolerance_keeps_the_plan():
    budget = TimeBudget(budget_s=600.0, steps_per_epoch=1000)
    planned = budget.plan(6, 6.0, 1.0, 0.0)
    assert budget.observe(100, 100.0 * 1.02) is None   # 2% slower: inside the 3% tolerance
    assert budget.total_steps == planned


def test_too_few_steps_since_the_plan_or_no_plan_decide_nothing():
    budget = TimeBudget(budget_s=600.0, steps_per_epoch=100)
    assert budget.observe(50, 500.0) is None          # not planned yet
    budget.plan(6, 6.0, 1.0, 0.0)
    assert budget.observe(7, 60.0) is None            # one step is no pace


def _progressive_cost(progress: float) -> float:
    from simsiam_embed.training.pretrain import progressive_side

    return (progressive_side(16, 32, progress) / 32) ** 2


def _run_with_costs(budget: TimeBudget, full_step_s: float, step_cost) -> tuple[float, int]:
    """A fake loop whose steps take ``full_step_s x step_cost(progress)``: (finish time, steps)."""
    clock = full_step_s * step_cost(0.0)
    step = 1
    budget.plan(step, clock, clock, save_seconds=0.0)
    while step < budget.total_steps:
        clock += full_step_s * step_cost(step / budget.total_steps)
        step += 1
        budget.observe(step, clock)
    return clock, step


def test_cheap_early_steps_are_planned_as_cheap_and_the_run_still_ends_on_time():
    """Progressive resizing: the first (measured) step costs a quarter of the last ones. Planned
    as if every step cost what the first did, the run would overrun by ~2x; planned by cost, it
    ends on time with the schedule finished."""
    uniform = TimeBudget(budget_s=600.0, steps_per_epoch=1000)
    naive_total = uniform.plan(1, 0.25, 0.25, 0.0)
    budget = TimeBudget(budget_s=600.0, steps_per_epoch=1000, relative_cost=_progressive_cost)
    finished_at, steps = _run_with_costs(budget, 1.0, _progressive_cost)
    assert 600.0 - 1.0 <= finished_at <= 600.0 + 1.0, finished_at   # within one step of the budget
    assert 600 < steps < naive_total   # more steps than full-size ones would allow, fewer than quarter-cost ones
    # Steps with overheads the model does not see (small ones cost 0.3 + 0.7 x their FLOPs):
    # corrections keep the run inside the budget and near its end.
    budget = TimeBudget(budget_s=600.0, steps_per_epoch=1000, relative_cost=_progressive_cost)
    finished_at, _ = _run_with_costs(budget, 1.0, lambda progress: 0.3 + 0.7 * _progressive_cost(progress))
    assert 600.0 * 0.9 <= finished_at <= 600.0 * 1.05 + 1.0, finished_at


def test_the_cost_of_a_long_stretch_of_steps_is_sampled_close_to_the_exact_sum():
    budget = TimeBudget(budget_s=1.0, steps_per_epoch=1, relative_cost=_progressive_cost)
    exact = sum(_progressive_cost(i / 5000) for i in range(100, 5000))
    assert budget._cost_of_steps(100, 5000, 5000) == pytest.approx(exact, rel=0.01)


def test_a_resumed_plan_is_checked_from_where_the_run_resumed():
    budget = TimeBudget(budget_s=600.0, steps_per_epoch=100)
    budget.resume(step=300, elapsed_s=300.0, total_steps=600)
    assert budget.observe(400, 400.0) is None                 # on pace
    assert budget.observe(420, 460.0) == 420 + int((600 - 460) / (160 / 120))   # 1.33 s a step since the resume


def test_the_loader_keeps_a_bounded_number_of_bytes_in_flight():
    from simsiam_embed.training.loop import LOADER_BYTES_BUDGET, plan_loader_memory

    pair_bytes = lambda crop, value_bytes: 2 * 3 * crop * crop * value_bytes  # noqa: E731  (two views)
    small = plan_loader_memory(256, pair_bytes(32, 1), workers=2, what="uint8 crops", shared_memory_bytes=8 << 30)
    assert small.prefetch == 4 and small.shared_memory_hint is None and "uint8 crops" in small.summary
    # The default GPU batch at 224 px as float32 views (the per-image path): 617 MB a batch.
    large = plan_loader_memory(512, pair_bytes(224, 4), workers=8, what="float32 views", shared_memory_bytes=64 << 20)
    assert large.prefetch == 1 and large.bytes_in_flight <= 8 * 617 * 2 ** 20
    assert "--shm-size" in large.shared_memory_hint and "64 MiB" in large.shared_memory_hint
    # uint8 views (the device-augmented path) need a quarter of the bytes.
    device_path = plan_loader_memory(512, pair_bytes(224, 1), workers=8, what="uint8 crops",
                                     shared_memory_bytes=64 << 30)
    assert device_path.bytes_in_flight <= LOADER_BYTES_BUDGET and device_path.prefetch == 3


def test_workers_are_fewer_when_one_batch_each_would_pass_the_budget():
    """Prefetch is at least 1 a worker: 16 workers of 2 GiB batches planned 31 GiB against 4."""
    from simsiam_embed.training.loop import LOADER_BYTES_BUDGET, plan_loader_memory

    plan = plan_loader_memory(1024, 2 << 20, workers=16, what="decoded images", shared_memory_bytes=64 << 30)
    assert plan.workers == 2 and plan.prefetch == 1 and plan.bytes_in_flight <= LOADER_BYTES_BUDGET
    assert "16 asked" in plan.summary
    assert plan_loader_memory(1024, 2 << 20, workers=0, what="x", shared_memory_bytes=64 << 30).workers == 0


# --------------------------------------------------------------------------------------------
# The budget in the loop: slow steps and Ctrl-C, on a fake clock


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _budget_loop(tmp_path, budget_s: float, step_seconds, reports: list, log_every: int = 2):
    """``step_seconds``: a number, or a function of the step (1, 2, ...) for a pace that changes."""
    from test_house import _Dataset, _TinyTask

    from simsiam_embed.artefacts import RunFolder
    from simsiam_embed.distributed import DistributedContext
    from simsiam_embed.training.loop import LoopPlan, TrainingLoop

    clock = FakeClock()

    class SlowTask(_TinyTask):
        def train_step(self, batch):
            clock.now += step_seconds(self.steps + 1) if callable(step_seconds) else step_seconds
            return super().train_step(batch)

    task = SlowTask()
    task.dataset = _Dataset(range(8))
    (tmp_path / "run").mkdir(exist_ok=True)
    plan = LoopPlan(steps_per_epoch=4, total_steps=None, log_every=log_every, batch_size=2, seed=0, workers=0,
                    budget_s=budget_s, slow_step_hint="a smaller --batch-size")
    loop = TrainingLoop(task, RunFolder(tmp_path / "run"), plan, DistributedContext(), "cpu",
                        lambda message: reports.append((task.steps, message)), clock=clock)
    return loop, task, clock


@pytest.mark.parametrize("budget_s, step_seconds", [(120, 250), (120, 50), (600, 10), (300, 0.7), (7200, 130)])
def test_a_time_budget_ends_on_time_however_slow_a_step_is(tmp_path, budget_s, step_seconds):
    """A 2-minute budget with 250-s steps ran for 10 minutes: the plan waited for 6 steps."""
    from simsiam_embed.training.loop import StopRequest

    reports = []
    loop, task, clock = _budget_loop(tmp_path, budget_s, step_seconds, reports)
    outcome = loop.run(StopRequest(), started=0.0, show_progress=False)
    assert outcome.finished and outcome.step == task.steps >= 1
    assert clock.now <= max(1.05 * budget_s, budget_s + step_seconds), (clock.now, task.steps)
    if step_seconds < budget_s:   # and uses the budget: no more than the last logging interval unused
        assert clock.now >= budget_s - 2 * loop.plan.log_every * step_seconds, (clock.now, task.steps)
    planned = [steps for steps, message in reports if message.startswith("time budget")]
    assert planned == [1]   # planned from the first timed step


def test_a_run_that_ends_early_on_its_budget_logs_its_last_step(tmp_path):
    """A 4-step run's report had one point: the steps after the last logged one were never written."""
    import json

    from simsiam_embed.training.loop import StopRequest

    reports = []
    loop, task, _clock = _budget_loop(tmp_path, 120, lambda step: 10 if step <= 5 else 100, reports, log_every=4)
    outcome = loop.run(StopRequest(), started=0.0, show_progress=False)
    assert any("ending at step" in message for _steps, message in reports)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in logged if "loss" in record]
    assert steps[-1] == outcome.step == task.steps


@pytest.mark.parametrize("step_seconds, warned", [(50, True), (30, False)])
def test_a_step_longer_than_a_third_of_the_budget_is_said_at_once(tmp_path, step_seconds, warned):
    from simsiam_embed.training.loop import StopRequest

    reports = []
    loop, _task, _clock = _budget_loop(tmp_path, 120, step_seconds, reports)
    loop.run(StopRequest(), started=0.0, show_progress=False)
    slow = [(steps, message) for steps, message in reports if "a third of" in message]
    assert bool(slow) == warned
    if warned:
        assert slow[0][0] == 1 and "a smaller --batch-size" in slow[0][1]


def test_the_first_ctrl_c_says_how_long_the_step_has_left_and_the_second_stops_now():
    import os
    import signal
    import time

    from simsiam_embed.training.loop import StopRequest, stop_on_signals

    handler_before = signal.getsignal(signal.SIGINT)   # SIG_IGN when the suite runs in the background

    def eventually(condition):
        deadline = time.monotonic() + 10
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        return condition()

    clock, reports, aborted = FakeClock(), [], []
    stop = StopRequest(clock=clock, abort=aborted.append)
    stop.step_began(at=100.0, seconds_per_step=240.0, checkpoint_step=6)
    clock.now = 160.0
    with stop_on_signals(stop, reports.append):
        os.kill(os.getpid(), signal.SIGINT)
        assert eventually(lambda: stop.requested and reports)
        assert "about 3m00s left" in reports[-1] and "checkpoint of step 6" in reports[-1], reports
        assert aborted == []
        os.kill(os.getpid(), signal.SIGINT)
        assert eventually(lambda: aborted == [130]) and "stopping now" in reports[-1]
    assert stop.exit_status == 130
    assert signal.getsignal(signal.SIGINT) is handler_before   # restored


def test_a_second_ctrl_c_stops_now_and_keeps_the_last_complete_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from simsiam_embed.artefacts import Checkpoint

    worker = subprocess.Popen([sys.executable, str(Path(__file__).parent / "slow_step_worker.py"), str(tmp_path / "run")],
                              stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in worker.stderr:
            lines.append(line)
            if "long step begins" in line:
                break
        time.sleep(0.5)
        worker.send_signal(signal.SIGINT)
        for line in worker.stderr:
            lines.append(line)
            if "stopping after this step" in line:
                break
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=120)
        lines += worker.stderr.readlines()
    finally:
        worker.kill()
    assert worker.returncode == 130, "".join(lines)
    assert not any("long step ends" in line for line in lines), "".join(lines)   # stopped inside the call
    saved = Checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert saved.step == 2 and not saved.finished


def test_the_loader_plans_decoded_photos_by_their_real_size():
    """At batch 512 on a GPU the plan counted 3.83 MiB a pair (twice the draft side) for photos
    of 0.19-0.54 MiB, and left 2 workers at prefetch 1."""
    from simsiam_embed.training.data import training_draft_side
    from simsiam_embed.training.loop import plan_loader_memory
    from simsiam_embed.training.pretrain import decoded_image_bytes

    draft = training_draft_side(224, 0.2)
    photo = decoded_image_bytes(draft, 224, median_short_side=375)
    assert photo == 3 * 375 * 375 * 4 // 3 and photo < 0.6 * 2**20
    assert decoded_image_bytes(draft, 224, median_short_side=3000) == decoded_image_bytes(draft, 224, None)
    plan = plan_loader_memory(512, photo, workers=16, what="decoded images", shared_memory_bytes=64 << 30)
    largest = plan_loader_memory(512, decoded_image_bytes(draft, 224, None), 16, "decoded images", 64 << 30)
    assert largest.workers == 2 and plan.workers >= 12   # the 4 GiB loader budget still bounds it


def test_a_one_step_run_says_its_pace_was_not_measured_not_zero(tmp_path):
    from conftest import FAST_TRAINING, invoke, make_image_folder

    make_image_folder(tmp_path / "images", per_class=3)   # 9 images at batch 8: one step
    result = invoke("pretrain", "images", "--epochs", "1", *FAST_TRAINING, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "done: 1 steps" in result.stdout and "pace not measured (one step)" in result.stdout
    assert "0 image pairs/s" not in result.stdout
