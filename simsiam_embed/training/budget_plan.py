"""A CPU time budget's batch and crop, chosen before the first step so that the run can learn.

On a CPU one step of the paper's batch can take most of a short budget: 600 photos at 224 px,
batch 256, took 225 s for its first step under a 5-minute budget, which then afforded one step,
and a network that few steps from random init is still random. So before training, a probe
times two small steps of the run's own network at its crop, and the plan keeps the recipe's
batch and crop if the budget affords MIN_LEARNING_STEPS of them; else it halves the batch (down
to the paper's smallest, 64), then shrinks the crop (down to half the recipe's), until it does.
What a step costs scales with its pairs and its pixels on a CPU (no idle units to fill, unlike a
GPU, where a small probe would underrate a large batch: there the plan is left to the first step).

    >>> plan = plan_budget(300, seconds_per_pair_at=lambda crop: 0.05 * (crop / 224) ** 2,
    ...                    batch=256, crop=224, smallest_crop=112, memory_bytes=24 << 30)
    >>> plan.batch, plan.crop, plan.steps     # (64, 224, 79): batch 256 would afford 19 steps
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from simsiam_embed.settings import PAIR_BYTES_224_AMP, PretrainConfig, training_pair_bytes

#: Steps from random init before the encoder beats random init, as measured on the demo's
#: sample (bench/RESULTS.md, "The demo's gain"): 11-12 steps of batch 256 left it at or below
#: random init (one seed of three below), 42-48 steps of batch 64 beat it on all three seeds.
MIN_LEARNING_STEPS = 40
#: The smallest batch of the paper's batch-size study (Table 2: 64 pairs, 66.1% against 68.1% at 512).
SMALLEST_BATCH = 64
#: Crops the plan steps down through, as a share of the recipe's (224 -> 192 -> 160 -> 128 -> 112).
CROP_STEP = 32
#: The budget's share left for steps: start-up, the first step's compilation and checkpoints take the rest.
STEP_SHARE = 0.85
#: Pairs a probe step holds: enough for batch norm, few enough to cost a second or two.
PROBE_PAIRS = 8


@dataclass(frozen=True)
class BudgetPlan:
    batch: int
    crop: int
    steps: int                  # the steps the budget affords at this batch and crop, by the probe
    learns: bool                # whether that is MIN_LEARNING_STEPS or more
    reason: str


def plan_budget(budget_s: float, seconds_per_pair_at: Callable[[int], float], batch: int, crop: int,
                smallest_crop: int, memory_bytes: int | None, pair_bytes_at_224: float = PAIR_BYTES_224_AMP["resnet18"],
                batch_given: bool = False, crop_given: bool = False) -> BudgetPlan:
    """The first (largest) batch, then crop, whose steps the budget affords MIN_LEARNING_STEPS
    of, within memory; the smallest plan if none is, with ``learns`` False. Pure: the probe's
    pace comes in as ``seconds_per_pair_at(crop)``."""
    batches = [batch] if batch_given else _halvings(batch, SMALLEST_BATCH)
    crops = [crop] if crop_given else list(range(crop, smallest_crop - 1, -CROP_STEP)) or [crop]
    if crops[-1] != smallest_crop and not crop_given and smallest_crop < crop:
        crops.append(smallest_crop)

    def steps(b: int, c: int) -> int:
        return int(budget_s * STEP_SHARE / (b * seconds_per_pair_at(c)))

    def fits(b: int, c: int) -> bool:
        return memory_bytes is None or b * pair_bytes_at_224 * (c / 224) ** 2 <= memory_bytes / 2

    candidates = [(b, c) for c in crops for b in batches if fits(b, c)] or [(batches[-1], crops[-1])]
    chosen = next(((b, c) for b, c in candidates if steps(b, c) >= MIN_LEARNING_STEPS), candidates[-1])
    affordable = steps(*chosen)
    learns = affordable >= MIN_LEARNING_STEPS
    pace = f"{seconds_per_pair_at(chosen[1]) * 1000:.0f} ms a pair at {chosen[1]} px by a probe"
    minimum = f"the {MIN_LEARNING_STEPS} a run from random init needs to beat it (bench/RESULTS.md)"
    if not learns:
        smallest = "even " if chosen != (batch, crop) else ""
        reason = (f"{smallest}batch {chosen[0]} at {chosen[1]} px affords only about {affordable} steps ({pace}), "
                  f"fewer than {minimum}")
    elif chosen == (batch, crop):
        reason = f"the budget affords about {affordable} steps of them ({pace}), at least {minimum}"
    else:
        needed = batch * pair_bytes_at_224 * (crop / 224) ** 2
        why_not = (f"batch {batch} at {crop} px needs about {needed / 2**30:.1f} GiB, more than half the "
                   f"{memory_bytes / 2**30:.1f} GiB free" if not fits(batch, crop) else
                   f"batch {batch} at {crop} px would give {steps(batch, crop)}, fewer than {minimum}")
        reason = f"the budget affords about {affordable} steps at batch {chosen[0]} and crop {chosen[1]} px ({pace}); {why_not}"
    return BudgetPlan(chosen[0], chosen[1], affordable, learns, reason)


def _halvings(batch: int, smallest: int) -> list[int]:
    batches = [batch]
    while batches[-1] // 2 >= smallest:
        batches.append(batches[-1] // 2)
    return batches


def measure_seconds_per_pair(config: PretrainConfig, crop: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one pair costs in a training step of ``config``'s network at ``crop`` px on the CPU:
    the second of two PROBE_PAIRS steps on random pixels (the first pays for oneDNN's kernels)."""
    from simsiam_embed.models import simsiam_loss
    from simsiam_embed.trained_model import build_model
    from simsiam_embed.training.loop import MixedPrecision

    model = build_model(config).train()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = MixedPrecision(config.amp, "cpu")
    views = torch.randn(2, PROBE_PAIRS, 3, crop, crop)
    seconds = 0.0
    for _ in range(2):
        began = clock()
        with amp.autocast():
            loss = simsiam_loss(model(views[0], views[1]), symmetric=config.symmetric_loss)
        loss.backward()
        model.zero_grad(set_to_none=True)
        seconds = clock() - began
    return seconds / PROBE_PAIRS


def available_memory_bytes() -> int | None:
    """What the kernel says a new process can use now (MemAvailable), or None off Linux."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def adapt_to_budget(config: PretrainConfig, given: set[str], median_short_side: int,
                    seconds_per_pair_at: Callable[[int], float] | None = None,
                    memory_bytes: int | None = None) -> BudgetPlan | None:
    """Choose ``config``'s batch and crop for its CPU time budget before training (in place, the
    choice and its reason added to ``config.choices``), unless the user gave both. None when
    there is nothing to plan: no budget, a GPU, or a warm start (which has no random init to beat)."""
    if (config.time_budget_s is None or config.device != "cpu" or config.init is not None
            or {"batch_size", "crop_size"} <= given):
        return None
    # Crops stay the recipe's when something is tied to them: the CIFAR recipe's are the images'
    # own size, multi-crop and progressive resizing size their views from the crop.
    crop_fixed = ("crop_size" in given or config.recipe == "cifar" or config.small_views > 0
                  or config.start_crop_size is not None)
    recipe_crop = config.crop_size
    smallest_crop = recipe_crop if crop_fixed else max(64, recipe_crop // 2)
    pair_bytes = training_pair_bytes(config.backbone, 224, config.small_image_stem, config.amp)
    # One probe at the recipe's crop; other crops by their pixels (a CPU's step cost follows them).
    probed = (seconds_per_pair_at or (lambda crop: measure_seconds_per_pair(config, crop)))(recipe_crop)
    plan = plan_budget(config.time_budget_s, lambda crop: probed * (crop / recipe_crop) ** 2, config.batch_size,
                       recipe_crop, smallest_crop, memory_bytes if memory_bytes is not None else available_memory_bytes(),
                       pair_bytes, batch_given="batch_size" in given, crop_given=crop_fixed)
    changed = (plan.batch, plan.crop) != (config.batch_size, recipe_crop)
    config.batch_size, config.crop_size = plan.batch, plan.crop
    config.images_within_crop = median_short_side <= config.crop_size
    config.choices.append(f"batch {plan.batch}, crop {plan.crop} px{'' if changed else ' kept'}: {plan.reason}")
    return plan


def too_short_warning(plan: BudgetPlan) -> str:
    return (f"warning: the time budget affords about {plan.steps} steps, too few to learn from random init: give "
            "a longer --time-budget, or start from pretrained weights (--init imagenet)")
