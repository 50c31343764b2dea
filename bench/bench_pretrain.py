"""Training throughput: simsiam-embed's loop against a plain reference loop, same run, same machine.

    python bench/bench_pretrain.py [--steps 4]

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

from common import machine, require_shared_data, write_fashion_mnist_folder
from simsiam_embed.trained_model import build_model
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.images import discover_images, open_image
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
    done, started = 0, None
    while done <= steps:
        for view1, view2 in loader:
            loss = simsiam_loss(model(view1, view2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == 1:
                started = time.monotonic()
            if done > steps:
                break
    return steps * config.batch_size / (time.monotonic() - started)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
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
