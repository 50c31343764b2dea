"""What the trainers share that is not SimSiam: here, the time-budget planner.

    >>> budget = TimeBudget(budget_s=1200, steps_per_epoch=50)
    >>> total = budget.plan(step=6, elapsed_s=14.0, seconds_per_step=2.0, save_seconds=1.0)
    >>> budget.observe(step=60, elapsed_s=150.0)   # a new total if the pace drifted, else None

The planner is pure: it never reads a clock. The loop passes in its own readings, so tests drive
it with a fake clock and, under torchrun, rank 0 alone plans and broadcasts the result, so every
rank stops at the same step on the same cosine schedule.
"""

from __future__ import annotations

from dataclasses import dataclass


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
