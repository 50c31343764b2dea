"""The training input path, side by side in one run: per-image PIL augmentation in the loader
(before); uint8 crops from the loader with batched augmentation on the device (the CPU default);
decoding only in the loader, with crops and augmentation on the device (the GPU default).

    python bench/bench_loader.py [--steps 6] [--pairs 128]
    python bench/bench_loader.py --store [--pairs 128]
    python bench/bench_loader.py --against REV [--pairs 512]   # the CPU default's loader, REV vs this tree
    python bench/bench_loader.py --crops [--pairs 64]          # crop_on_device batched vs a resize per view

For each recipe (the paper's CIFAR recipe on 32 px Fashion-MNIST, its ImageNet recipe on the
ants/bees JPEGs at 224 px):
1. Loader CPU per image pair, one process, for each path: what a GPU would wait on when the
   loader cannot keep up (decode + everything the workers do).
2. The device half of the two new paths (crops if there, then jitter, grayscale, blur,
   normalise, batched), here on the CPU, which a GPU run moves off the CPU entirely.
3. End-to-end training pairs/s of the real `pretrain()` on this CPU, both paths (no loss on the
   CPU is the goal), and the model-FLOP utilisation: pairs/s x FLOPs per pair (counted by
   torch.utils.flop_counter) / this machine's measured peak matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import machine, require_shared_data, write_fashion_mnist_folder
from simsiam_embed.training.augment import (
    AugmentationRecipe, BatchAugment, CroppedViews, crop_on_device, draw_uncropped_views, stack_uncropped,
)
from simsiam_embed.trained_model import build_model
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.training.data import TwoViewDataset, simsiam_augmentation, training_draft_side
from simsiam_embed.training.image_store import DecodedImageStore
from simsiam_embed.image_files import discover_images
from simsiam_embed.models import simsiam_loss
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace


def loader_ms_per_pair(dataset: TwoViewDataset, paths: list[Path], pairs: int) -> float:
    dataset[(0, 0)]   # warm caches and lazy imports
    started = time.perf_counter()
    for i in range(pairs):
        dataset[(i, i % len(paths))]
    return 1000 * (time.perf_counter() - started) / pairs


def device_ms_per_pair(recipe: AugmentationRecipe, paths: list[Path], draft: int | None, batch: int,
                       crops_too: bool) -> float:
    """The device half of a new path on this CPU; ``crops_too``: the crop-on-device path."""
    augment = BatchAugment(recipe, "cpu")
    if crops_too:
        dataset = TwoViewDataset(paths, draft_side=draft, pair=partial(draw_uncropped_views, recipe=recipe))
        groups, boxes, flips, parameters = stack_uncropped([dataset[(i, i % len(paths))][0] for i in range(batch)])
        parameters = torch.cat([parameters[:, 0], parameters[:, 1]])
        work = lambda: augment(crop_on_device(groups, boxes, flips, recipe.crop_size, "cpu"), parameters)  # noqa: E731
    else:
        dataset = TwoViewDataset(paths, draft_side=draft, pair=CroppedViews(recipe))
        samples = [dataset[(i, i % len(paths))][0] for i in range(batch)]
        crops = torch.stack([view for pair in samples for view, _ in pair])
        parameters = torch.stack([p for pair in samples for _, p in pair])
        work = lambda: augment(crops, parameters)  # noqa: E731
    work()
    started = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        work()
    return 1000 * (time.perf_counter() - started) / (repeats * batch)


def flops_per_pair(config: PretrainConfig) -> float:
    model = build_model(config).train()
    views = torch.randn(2, 3, config.crop_size, config.crop_size)
    with FlopCounterMode(display=False) as counter:
        simsiam_loss(model(views, views.clone())).backward()
    return counter.get_total_flops() / 2


def peak_matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size ** 3 / (time.perf_counter() - started)


def train_pairs_per_second(folder: Path, settings: dict, steps: int, workspace: Path) -> tuple[float, PretrainConfig]:
    images = len(discover_images(folder))
    epochs = -(-(steps + 1) // (images // settings["batch_size"]))
    result = pretrain(folder, Workspace(workspace), dict(settings, epochs=epochs, log_every=1),
                      report=lambda _m: None, show_progress=False)
    return result.pairs_per_second, result.config


def store_trial(pairs: int) -> None:
    """What the decoded-image store saves the loader: CPU per pair of the CPU default's loader
    (uint8 crops), decoding the file each time against reading the store's pixels back (filled
    beforehand, as in every epoch after the first), on 32-px PNGs and on the ants/bees JPEGs."""
    data = require_shared_data()
    print(f"machine: {machine()}")
    print("\n| images | crop | decoded each time | from the store | cut |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [("Fashion-MNIST PNGs, 32 px", write_fashion_mnist_folder(tmp / "fmnist32", "train", 1024, size=32), 32),
                 ("ants/bees JPEGs (median ~500 x 375, up to 2592 wide)", data / "hymenoptera" / "train", 224),
                 ("ants/bees JPEGs, full-size decode (no draft)", data / "hymenoptera" / "train", 224)]
        for number, (label, folder, crop) in enumerate(cases):
            paths = discover_images(folder)
            recipe = AugmentationRecipe(crop, blur=crop > 64)
            draft = None if "no draft" in label else training_draft_side(crop)
            decoded = loader_ms_per_pair(TwoViewDataset(paths, draft_side=draft, pair=CroppedViews(recipe)), paths, pairs)
            store = DecodedImageStore(tmp / f"store-{number}", draft, capacity_bytes=8 << 30)
            stored = TwoViewDataset(paths, draft_side=draft, pair=CroppedViews(recipe), store=store)
            for index in range(len(paths)):   # the first epoch: every image decoded once and kept
                stored[(index, index)]
            from_store = loader_ms_per_pair(stored, paths, pairs)
            print(f"| {label} | {crop} | {decoded:.2f} ms | {from_store:.2f} ms | {decoded / from_store:.2f}x |", flush=True)


#: Loader CPU per pair of the CPU default's path (uint8 crops), built as pretrain() builds it in
#: either version: with view makers that take the sample's generator (CroppedViews), or, before,
#: a view function drawing from torch's global generator, seeded for each sample.
_LOADER_COST = """
import sys, time
from functools import partial
from pathlib import Path
import simsiam_embed.training.augment as augment
from simsiam_embed.image_files import discover_images
from simsiam_embed.training.data import TwoViewDataset, training_draft_side
folder, crop, pairs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
paths = discover_images(folder)
recipe = augment.AugmentationRecipe(crop, blur=crop > 64)
draft = training_draft_side(crop)
if hasattr(augment, "CroppedViews"):
    dataset = TwoViewDataset(paths, draft_side=draft, pair=augment.CroppedViews(recipe))
else:
    dataset = TwoViewDataset(paths, partial(augment.draw_view, recipe=recipe), draft)
print(augment.__file__, file=sys.stderr)
for i in range(16):   # warm caches and lazy imports
    dataset[(i, i % len(paths))]
best = float("inf")
for _ in range(3):
    started = time.perf_counter()
    for i in range(pairs):
        dataset[(i, i % len(paths))]
    best = min(best, 1000 * (time.perf_counter() - started) / pairs)
print(best)
"""


def per_view_crops(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """crop_on_device before 7ec2097, the baseline: a resize and a flip per view."""
    views = [[], []]
    for image, sample_boxes, sample_flips in zip(images, boxes.tolist(), flips.tolist()):
        for number, ((top, left, height, width), flip) in enumerate(zip(sample_boxes, sample_flips)):
            crop = image[:, top:top + height, left:left + width].unsqueeze(0).float()
            view = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                                   antialias=True)
            views[number].append(view.flip(-1) if flip else view)
    return torch.cat(views[0] + views[1])


def crops_trial(pairs: int) -> None:
    """The crop-on-device path's crops on this CPU, same samples: a resize and a flip per view
    (before) against two batched products per group of images (crop_on_device), best of three,
    with the ATen operations each dispatches and the largest difference between them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        operations = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operations += 1
            return func(*args, **(kwargs or {}))

    paths = discover_images(require_shared_data() / "hymenoptera")
    recipe = AugmentationRecipe(224)
    dataset = TwoViewDataset(paths, draft_side=training_draft_side(224),
                             pair=partial(draw_uncropped_views, recipe=recipe))
    samples = [dataset[(i, i % len(paths))][0] for i in range(pairs)]
    images = [sample[0] for sample in samples]
    groups, boxes, flips, _ = stack_uncropped(samples)
    ways = {"a resize and a flip per view (before)": lambda: per_view_crops(images, boxes, flips, 224),
            "two batched products a group (crop_on_device)": lambda: crop_on_device(groups, boxes, flips, 224, "cpu")}
    print(f"machine: {machine()}; {pairs} ants/bees photos (drafted decode), 2 views each at 224 px, on the CPU")
    print("| crops | ms a batch (best of 3) | ATen operations |\n| --- | --- | --- |")
    views = {}
    for label, crop in ways.items():
        seconds = []
        for _ in range(3):
            began = time.perf_counter()
            views[label] = crop()
            seconds.append(time.perf_counter() - began)
        with Count() as count:
            crop()
        print(f"| {label} | {1000 * min(seconds):.0f} | {count.operations} |", flush=True)
    before, after = views.values()
    print(f"largest difference between them: {(before - after).abs().max().item():.4f} of 255")


def against_revision(revision: str, pairs: int) -> None:
    """The CPU default's loader CPU per pair at ``revision`` and in this working tree, one after
    the other in one run (best of three passes each), on 32-px PNGs and the ants/bees JPEGs."""
    data = require_shared_data()
    repository = Path(__file__).resolve().parents[1]
    print(f"machine: {machine()}")
    print(f"\n| images | crop | {revision} | this tree | cut |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "old"
        subprocess.run(["git", "-C", str(repository), "worktree", "add", "--detach", str(old_tree), revision],
                       check=True, capture_output=True)
        try:
            cases = [("Fashion-MNIST PNGs, 32 px", write_fashion_mnist_folder(tmp / "fmnist32", "train", 1024, size=32), 32),
                     ("ants/bees JPEGs (drafted decode)", data / "hymenoptera" / "train", 224)]
            for label, folder, crop in cases:
                costs = []
                for tree in (old_tree, repository):
                    # The installed package is this tree's; the old tree's comes first on the path.
                    environment = {**os.environ, "PYTHONPATH": str(tree)}
                    run = subprocess.run([sys.executable, "-c", _LOADER_COST, str(folder), str(crop), str(pairs)],
                                         env=environment, cwd=tmp, check=True, capture_output=True, text=True)
                    assert run.stderr.strip().startswith(str(tree)), run.stderr   # the version asked for
                    costs.append(float(run.stdout.split()[-1]))
                print(f"| {label} | {crop} | {costs[0]:.3f} ms | {costs[1]:.3f} ms | {costs[0] / costs[1]:.2f}x |",
                      flush=True)
        finally:
            subprocess.run(["git", "-C", str(repository), "worktree", "remove", "--force", str(old_tree)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per measurement")
    parser.add_argument("--pairs", type=int, default=128, help="pairs timed through each loader path")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", action="store_true", help="only: what the decoded-image store saves the loader")
    parser.add_argument("--against", metavar="REV", help="only: the CPU default's loader at REV and in this tree")
    parser.add_argument("--crops", action="store_true", help="only: crop_on_device against a resize per view")
    args = parser.parse_args()
    if args.crops:
        crops_trial(args.pairs)
        return
    if args.against:
        against_revision(args.against, args.pairs)
        return
    if args.store:
        store_trial(args.pairs)
        return
    data = require_shared_data()
    print(f"machine: {machine()}")
    peaks = {"off": peak_matmul_flops(torch.float32), "bf16": peak_matmul_flops(torch.bfloat16)}
    print(f"peak matmul (2048^2): fp32 {peaks['off'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [
            ("CIFAR recipe, resnet18 small stem, 32 px Fashion-MNIST",
             write_fashion_mnist_folder(tmp / "fmnist32", "train", 1024, size=32),
             dict(recipe="cifar", backbone="resnet18", crop_size=32, batch_size=128)),
            ("ImageNet recipe, resnet18, 224 px ants/bees JPEGs", data / "hymenoptera" / "train",
             dict(recipe="imagenet", backbone="resnet18", crop_size=224, batch_size=32)),
        ]
        for label, folder, settings in cases:
            paths = discover_images(folder)
            recipe = AugmentationRecipe(settings["crop_size"], blur=settings["recipe"] == "imagenet")
            draft = training_draft_side(settings["crop_size"])
            before = loader_ms_per_pair(TwoViewDataset(paths, simsiam_augmentation(recipe.crop_size, recipe.blur), draft),
                                        paths, args.pairs)
            after = loader_ms_per_pair(TwoViewDataset(paths, draft_side=draft, pair=CroppedViews(recipe)), paths, args.pairs)
            decode_only = loader_ms_per_pair(
                TwoViewDataset(paths, draft_side=draft, pair=partial(draw_uncropped_views, recipe=recipe)), paths, args.pairs)
            on_device = device_ms_per_pair(recipe, paths, draft, settings["batch_size"], crops_too=False)
            crops_on_device = device_ms_per_pair(recipe, paths, draft, settings["batch_size"], crops_too=True)
            print(f"{label}: loader CPU per pair {before:.2f} ms (per-image), {after:.2f} ms (uint8 crops, "
                  f"{before / after:.2f}x less), {decode_only:.2f} ms (decode only, {before / decode_only:.2f}x less); "
                  f"device half on this CPU {on_device:.2f} / {crops_on_device:.2f} ms a pair", flush=True)
            trained = {}
            for path_name, on_device_flag in (("per-image", False), ("device", True)):
                rate, config = train_pairs_per_second(
                    folder, dict(settings, num_workers=args.workers, augment_on_device=on_device_flag),
                    args.steps, tmp / f"{label.split()[0]}-{path_name}")
                trained[path_name] = (rate, config)
                print(f"  train {path_name}: {rate:.1f} pairs/s ({config.amp})", flush=True)
            config = trained["device"][1]
            flops = flops_per_pair(config)
            utilisation = {name: rate * flops / peaks[cfg.amp if cfg.amp == "bf16" else "off"]
                           for name, (rate, cfg) in trained.items()}
            rows.append((label, before, after, decode_only, on_device, crops_on_device, trained["per-image"][0],
                         trained["device"][0], flops, utilisation, config.amp))

    print("\n| recipe | loader CPU / pair: per-image | uint8 crops (cut) | decode only (cut) | device half on this CPU: "
          "colour / crops + colour | train pairs/s: per-image | uint8 crops | GFLOP / pair | MFU: per-image | uint8 crops |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (label, before, after, decode_only, on_device, crops_on_device, rate_before, rate_after, flops, utilisation,
         amp) in rows:
        print(f"| {label} ({amp}) | {before:.2f} ms | {after:.2f} ms ({before / after:.2f}x) | {decode_only:.2f} ms "
              f"({before / decode_only:.2f}x) | {on_device:.2f} / {crops_on_device:.2f} ms | {rate_before:.1f} "
              f"| {rate_after:.1f} | {flops / 1e9:.2f} | {utilisation['per-image']:.0%} | {utilisation['device']:.0%} |")


if __name__ == "__main__":
    main()
