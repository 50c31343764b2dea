"""Training throughput: simsiam-embed's loop against a plain reference loop, same run, same machine.

    python bench/bench_pretrain.py [--steps 4]
    python bench/bench_pretrain.py --against-lightly [--steps 12] [--images 10000]
    python bench/bench_pretrain.py --compile-trial [--steps 4]

Reference: the paper's Algorithm 1 as most people write it: torchvision transforms through a
TwoCropsTransform, an ImageFolder-style dataset, a standard DataLoader, fp32. Ours: the real
`pretrain()` with its defaults for this machine. Both train the same SimSiam network on the same
images with the same batch size; the first step (start-up) is not timed.
Also measures JPEG draft decoding (what decoding at reduced size saves on the ants/bees photos).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from common import LightlySimSiam, machine, require_shared_data, write_fashion_mnist_folder
from simsiam_embed.trained_model import build_model
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.image_files import discover_images, open_image
from simsiam_embed.training.data import simsiam_augmentation, training_draft_side
from simsiam_embed.models import simsiam_loss
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace


class TwoCrops:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


class PlainFolder(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def reference_pairs_per_second(paths, config: PretrainConfig, steps: int, workers: int) -> float:
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    augment = TwoCrops(simsiam_augmentation(config.crop_size, config.blur))
    loader = DataLoader(PlainFolder(paths, augment), batch_size=config.batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)

    def step(batch) -> None:
        view1, view2 = batch
        loss = simsiam_loss(model(view1, view2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return pairs_per_second(loader, step, steps, config.batch_size)


def pairs_per_second(loader: DataLoader, step, steps: int, batch: int) -> float:
    """``step`` on the loader's batches: the pace of ``steps`` steps after one untimed (start-up)."""
    done, started = 0, None
    while done <= steps:
        for item in loader:
            step(item)
            done += 1
            if done == 1:
                started = time.monotonic()
            if done > steps:
                break
    return steps * batch / (time.monotonic() - started)


def ours_pairs_per_second(folder: Path, settings: dict, steps: int, workspace: Path) -> tuple[float, PretrainConfig]:
    images = len(discover_images(folder))
    steps_per_epoch = images // settings["batch_size"]
    epochs = -(-(steps + 1) // steps_per_epoch)
    result = pretrain(folder, Workspace(workspace), dict(settings, epochs=epochs, log_every=1),
                      report=lambda _m: None, show_progress=False)
    return result.pairs_per_second, result.config


def draft_decode_seconds(paths, side: int | None) -> float:
    started = time.monotonic()
    for path in paths:
        open_image(path, side)
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------
# Against lightly 1.6 on lightly's CIFAR-10 benchmark model, and the default recipe's share of peak


def lightly_pairs_per_second(folder: Path, steps: int, workers: int, batch: int) -> float | None:
    """lightly's own SimSiam training loop (its example and CIFAR-10 benchmark): ResNet-18 with the
    standard stem, a 2-layer 2048 projector, its SimSiamTransform at 32 px without blur, fp32."""
    try:
        from lightly.data import LightlyDataset
        from lightly.transforms import SimSiamTransform
        model = LightlySimSiam(seed=0)
    except ImportError:
        print("lightly is not installed (pip install 'simsiam-embed[bench]'): its column is left out")
        return None
    optimizer = torch.optim.SGD(model.parts.parameters(), lr=0.06 * batch / 256, momentum=0.9, weight_decay=5e-4)
    dataset = LightlyDataset(str(folder), transform=SimSiamTransform(input_size=32, gaussian_blur=0.0))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)

    def step(item) -> None:
        (x0, x1), _, _ = item
        loss = model.loss(x0, x1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    rate = pairs_per_second(loader, step, steps, batch)
    del loader   # its persistent workers end here, not during the next measurement
    return rate


def ours_later_epochs_pairs_per_second(folder: Path, settings: dict, steps: int, workspace: Path) -> float:
    """``pretrain()``'s pace after its first epoch (the decoded-image store, when on, then full)."""
    import json

    images = len(discover_images(folder))
    steps_per_epoch = images // settings["batch_size"]
    result = pretrain(folder, Workspace(workspace), dict(settings, epochs=1 + -(-steps // steps_per_epoch), log_every=1),
                      report=lambda _m: None, show_progress=False)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time_s"] for r in records if "time_s" in r}
    first, last = steps_per_epoch + 1, steps_per_epoch + steps
    return (last - first) * settings["batch_size"] / (times[last] - times[first])


def against_lightly(steps: int, workers: int, images: int) -> None:
    from bench_loader import flops_per_pair, peak_matmul_flops

    print(f"machine: {machine()}")
    # The peaks first, before any loader's worker processes exist, best of three: this is a
    # shared 2-core machine, and a peak measured while anything else runs would be too low.
    peaks = {"fp32": max(peak_matmul_flops(torch.float32) for _ in range(3)),
             "bf16": max(peak_matmul_flops(torch.bfloat16) for _ in range(3))}
    batch = 256
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_fashion_mnist_folder(tmp / "fmnist32", "train", images, size=32)
        lightly_model = dict(recipe="cifar", backbone="resnet18", small_image_stem=False, crop_size=32,
                             projector_layers=2, batch_size=batch, num_workers=workers, blur=False)
        rows = []
        # 32-px images: the decoded-image store is planned off (decoding them is cheaper), so no label names it.
        for label, settings in (("lightly's model, ours fp32", dict(lightly_model, amp="off")),
                                ("lightly's model, ours defaults (bf16, channels_last)", lightly_model),
                                ("default CIFAR recipe (small-image stem), bf16",
                                 dict(recipe="cifar", batch_size=batch, num_workers=workers))):
            rate = ours_later_epochs_pairs_per_second(folder, settings, steps, tmp / str(len(rows)))
            rows.append((label, rate))
            print(f"{label}: {rate:.1f} pairs/s", flush=True)
        reference = lightly_pairs_per_second(folder, steps, workers, batch)
        if reference is not None:
            print(f"lightly 1.6 loop: {reference:.1f} pairs/s", flush=True)
        default = PretrainConfig(str(folder), "x", recipe="cifar", backbone="resnet18", small_image_stem=True,
                                 crop_size=32, projector_layers=2, blur=False)
        flops = flops_per_pair(default)
        print(f"\npeak matmul 2048^2: fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
              f"default recipe {flops / 1e9:.2f} GFLOP a pair (torch.utils.flop_counter)")
        print("\n| loop | pairs/s | vs lightly |")
        print("| --- | --- | --- |")
        if reference is not None:
            print(f"| lightly 1.6 (fp32, its SimSiamTransform, no blur) | {reference:.1f} | 1.00x |")
        for label, rate in rows:
            print(f"| {label} | {rate:.1f} | {f'{rate / reference:.2f}x' if reference else 'n/a'} |")
        default_rate = rows[-1][1]
        amp = default.amp if default.amp == "bf16" else "fp32"
        print(f"\ndefault recipe: {default_rate * flops / 1e9:.0f} GFLOP/s = "
              f"{default_rate * flops / peaks[amp]:.0%} of the {amp} matmul peak")


# --------------------------------------------------------------------------------------------
# torch.compile and channels_last on the CPU: the model's own step, without any loader


def model_step_seconds(config: PretrainConfig, compiled: bool, channels_last: bool, steps: int) -> tuple[float, float]:
    """(seconds a training step takes, seconds its first two steps took: start-up and, compiled,
    the compilation) on random views, so only the network, the loss and SGD are timed."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(config).train().to(memory_format=memory_format)
    network = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    views = [torch.randn(config.batch_size, 3, config.crop_size, config.crop_size).contiguous(memory_format=memory_format)
             for _ in range(2)]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.amp == "bf16"):
            loss = simsiam_loss(network(*views))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.monotonic()
    step()
    step()
    warm_up = time.monotonic() - started
    started = time.monotonic()
    for _ in range(steps):
        step()
    return (time.monotonic() - started) / steps, warm_up


def compile_trial(steps: int) -> None:
    print(f"machine: {machine()}")
    models = {"lightly's model (standard stem)": dict(small_image_stem=False),
              "default CIFAR recipe (small-image stem)": dict(small_image_stem=True)}
    print("\n| model | precision | eager, contiguous | eager, channels_last | compiled, channels_last (compile time) |")
    print("| --- | --- | --- | --- | --- |")
    for label, model in models.items():
        for amp in ("bf16", "off"):
            config = PretrainConfig("x", "x", recipe="cifar", backbone="resnet18", crop_size=32, projector_layers=2,
                                    blur=False, batch_size=256, amp=amp, **model)
            cells = []
            for compiled, channels_last in ((False, False), (False, True), (True, True)):
                seconds, warm_up = model_step_seconds(config, compiled, channels_last, steps)
                cells.append(f"{config.batch_size / seconds:.1f} pairs/s" + (f" ({warm_up:.0f} s)" if compiled else ""))
                print(f"{label}, {amp}, compiled={compiled}, channels_last={channels_last}: {cells[-1]}", flush=True)
            print(f"| {label} | {'bf16' if amp == 'bf16' else 'fp32'} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--against-lightly", action="store_true",
                        help="lightly 1.6's loop vs ours on its CIFAR-10 benchmark model, and the default recipe's "
                             "share of this machine's matmul peak")
    parser.add_argument("--images", type=int, default=10_000, help="CIFAR-size images for --against-lightly")
    parser.add_argument("--compile-trial", action="store_true",
                        help="torch.compile and channels_last against eager, on the model's own step (no loader)")
    args = parser.parse_args()
    if args.compile_trial:
        compile_trial(args.steps)
        return
    if args.against_lightly:
        against_lightly(args.steps, args.workers, args.images)
        return
    data = require_shared_data()
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = write_fashion_mnist_folder(tmp / "fmnist32", "train", 2048, size=32)
        photos = data / "hymenoptera"
        cases = [
            ("resnet18 small-image, 32 px", small, dict(recipe="cifar", backbone="resnet18", crop_size=32)),
            ("resnet50, 96 px (ants/bees JPEGs)", photos, dict(recipe="imagenet", backbone="resnet50", crop_size=96)),
        ]
        for label, folder, recipe in cases:
            settings = dict(recipe, batch_size=256, num_workers=args.workers)
            ours, config = ours_pairs_per_second(folder, settings, args.steps, tmp / label.split()[0])
            ours_fp32, _ = ours_pairs_per_second(folder, dict(settings, amp="off", channels_last=False), args.steps,
                                                  tmp / (label.split()[0] + "-fp32"))
            reference = reference_pairs_per_second(discover_images(folder), config, args.steps, args.workers)
            rows.append((label, reference, ours_fp32, ours, config.amp))
            print(f"{label}: reference {reference:.1f}, ours fp32 {ours_fp32:.1f}, ours default ({config.amp}, "
                  f"channels_last) {ours:.1f} image pairs/s", flush=True)

    print("\n| case | reference loop (fp32) | ours, fp32 | ours, defaults | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for label, reference, ours_fp32, ours, amp in rows:
        print(f"| {label} | {reference:.1f} | {ours_fp32:.1f} | {ours:.1f} ({amp}) | {ours / reference:.2f}x |")

    jpegs = discover_images(photos)
    print(f"\nJPEG decoding, {len(jpegs)} ants/bees photos (median ~500x375, up to 2592 wide):")
    full = draft_decode_seconds(jpegs, None)
    for crop in (96, 224):
        side = training_draft_side(crop)
        drafted = draft_decode_seconds(jpegs, side)
        print(f"  crop {crop}: full decode {full:.2f} s, draft (side >= {side}) {drafted:.2f} s: {full / drafted:.2f}x")


if __name__ == "__main__":
    main()
