"""A CPU time budget's batch and crop, chosen before the first step from a probe's pace (never
from this machine's real speed here: the pace is given), so that a short budget still learns."""

from __future__ import annotations

import json

import pytest

from conftest import invoke, make_image_folder
from simsiam_embed.settings import resolve_pretrain_config
from simsiam_embed.training import budget_plan
from simsiam_embed.training.budget_plan import MIN_LEARNING_STEPS, STEP_SHARE, adapt_to_budget, plan_budget

GIB = 1 << 30


def pace(seconds_at_224: float):
    return lambda crop: seconds_at_224 * (crop / 224) ** 2


def test_a_budget_that_affords_enough_steps_keeps_the_recipes_batch_and_crop():
    plan = plan_budget(3000, pace(0.05), batch=256, crop=224, smallest_crop=112, memory_bytes=24 * GIB)
    assert (plan.batch, plan.crop, plan.learns) == (256, 224, True)
    assert plan.steps == int(3000 * STEP_SHARE / (256 * 0.05))


def test_a_short_budget_halves_the_batch_first():
    # 600 photos at 224 px, 5 minutes: batch 256 affords 19 steps, batch 64 affords 79.
    plan = plan_budget(300, pace(0.05), batch=256, crop=224, smallest_crop=112, memory_bytes=24 * GIB)
    assert (plan.batch, plan.crop) == (64, 224) and plan.steps >= MIN_LEARNING_STEPS and plan.learns
    assert "batch 256 at 224 px would give 19" in plan.reason


def test_then_shrinks_the_crop_and_says_so_when_nothing_affords_enough():
    plan = plan_budget(300, pace(0.15), batch=256, crop=224, smallest_crop=112, memory_bytes=24 * GIB)
    assert plan.batch == 64 and plan.crop < 224 and plan.learns
    hopeless = plan_budget(300, pace(2.0), batch=256, crop=224, smallest_crop=112, memory_bytes=24 * GIB)
    assert (hopeless.batch, hopeless.crop, hopeless.learns) == (64, 112, False)
    assert "even batch 64 at 112 px affords only" in hopeless.reason


def test_the_batch_fits_half_the_free_memory():
    # 40 MiB a pair at 224 px: 2 GiB free holds 25 pairs in its half, so batch 256 and 128 do not fit.
    plan = plan_budget(30_000, pace(0.001), batch=256, crop=224, smallest_crop=112, memory_bytes=2 * GIB,
                       pair_bytes_at_224=40 << 20)
    assert plan.batch * (40 << 20) * (plan.crop / 224) ** 2 <= GIB and plan.learns
    assert "batch 256 at 224 px needs about 10.0 GiB, more than half the 2.0 GiB free" in plan.reason


def test_a_given_batch_or_crop_is_kept():
    plan = plan_budget(300, pace(0.15), batch=256, crop=224, smallest_crop=112, memory_bytes=None, batch_given=True)
    assert plan.batch == 256 and plan.crop == 112
    plan = plan_budget(300, pace(0.15), batch=256, crop=224, smallest_crop=112, memory_bytes=None, crop_given=True)
    assert plan.crop == 224 and plan.batch == 64


def test_only_cpu_budgets_from_random_init_are_planned_and_the_cifar_crop_stays():
    photos = resolve_pretrain_config("d", "r", 600, 300, "cpu", {"time_budget_s": 300.0})
    plan = adapt_to_budget(photos, set(), 300, seconds_per_pair_at=pace(0.05), memory_bytes=24 * GIB)
    assert (photos.batch_size, photos.crop_size) == (plan.batch, plan.crop) == (64, 224)
    assert any(choice.startswith("batch 64, crop 224 px: the budget affords about") for choice in photos.choices)
    small = resolve_pretrain_config("d", "r", 5000, 28, "cpu", {"time_budget_s": 60.0})
    adapt_to_budget(small, set(), 28, seconds_per_pair_at=lambda crop: 0.5, memory_bytes=24 * GIB)
    assert small.crop_size == 28 and small.batch_size == 64
    epochs = resolve_pretrain_config("d", "r", 600, 300, "cpu", {})
    assert adapt_to_budget(epochs, set(), 300, seconds_per_pair_at=pace(1.0)) is None
    warm = resolve_pretrain_config("d", "r", 600, 300, "cpu", {"time_budget_s": 300.0, "init": "w.pth"})
    assert adapt_to_budget(warm, {"init"}, 300, seconds_per_pair_at=pace(1.0)) is None


def test_the_probe_times_a_real_step_of_the_runs_network():
    config = resolve_pretrain_config("d", "r", 600, 28, "cpu", {"time_budget_s": 60.0, "dim": 64,
                                                                 "projector_hidden_dim": 64, "predictor_hidden_dim": 16})
    ticks = iter(range(100))
    seconds = budget_plan.measure_seconds_per_pair(config, 16, clock=lambda: float(next(ticks)))
    assert seconds == pytest.approx(1 / budget_plan.PROBE_PAIRS)   # one tick a step, the second step's


def test_a_budget_too_short_to_learn_is_said_before_the_first_step_with_an_eta_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(budget_plan, "measure_seconds_per_pair", lambda config, crop: 0.2)
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--time-budget", "4s", "--workers", "0", "--dim", "64",
                    "--projector-hidden-dim", "64", "--predictor-hidden-dim", "16", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stderr.replace("\r", "\n").splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: the time budget affords about"))
    first_step = next(i for i, line in enumerate(lines) if "time budget 0m04s:" in line and "s/step measured" in line)
    assert warning < first_step
    expected = int(4 * STEP_SHARE / (8 * 0.2))   # 12 images: batch 8, the probe's 0.2 s a pair
    assert any(f"0/{expected} [" in line for line in lines[:first_step]), "the bar has a total (an ETA) from the start"
    config = json.loads((tmp_path / "runs" / "images" / "config.json").read_text())
    assert config["batch_size"] == 8 and any("affords only about" in choice for choice in config["choices"])
