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
