"""Seconds per Faster R-CNN training step on raccoon photos: RoI samples and image size side by side.

    python bench/bench_detection_step.py --steps 3

Sizes the detection benchmark and the `--roi-samples` advice. The detector is the project's
own (`build_detector`, ResNet-18-FPN at random init); every variant trains on the same 8
photos (two alternating batches of 4) from the same seed. The first step is a warm-up and not
counted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF

from bench_detection import csv_to_coco
from common import machine, require_shared_data
from simsiam_embed.image_files import open_image
from simsiam_embed.detection.finetune import DetectionConfig, build_detector
from simsiam_embed.detection.data import load_detection_set

VARIANTS = [  # (min_size, max_size, roi_samples): the recipe's default size, then the benchmark's
    (512, 853, 512), (512, 853, 128), (320, 533, 512), (320, 533, 128),
]


def seconds_per_step(images, targets, min_size: int, max_size: int, roi_samples: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    config = DetectionConfig(data="-", backbone="resnet18", min_size=min_size, max_size=max_size,
                             roi_samples=roi_samples)
    detector, _ = build_detector(config, num_classes=1, weights=None)
    detector.train()
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.001, momentum=0.9)
    times = []
    for step in range(steps + 1):
        batch = slice(4 * (step % 2), 4 * (step % 2) + 4)
        began = time.perf_counter()
        loss = sum(detector(images[batch], targets[batch]).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - began)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after one warm-up step")
    args = parser.parse_args()
    raccoon = require_shared_data() / "raccoon"
    with tempfile.TemporaryDirectory() as tmp:
        coco, _ = csv_to_coco(raccoon / "train_labels.csv", raccoon / "images", Path(tmp) / "train.json")
        records = load_detection_set(coco).images[:8]
    images = [TF.to_tensor(open_image(record.path, upright=False)) for record in records]
    targets = [{"boxes": torch.from_numpy(record.boxes.copy()), "labels": torch.from_numpy(record.labels + 1)}
               for record in records]
    print(f"machine: {machine()}, {torch.get_num_threads()} threads; batch 4, fp32, ResNet-18-FPN, "
          f"{args.steps} timed steps per variant\n")
    print("| images (px) | RoI samples per image | s/step (mean) | each step |")
    print("| --- | --- | --- | --- |")
    for min_size, max_size, roi_samples in VARIANTS:
        times = seconds_per_step(images, targets, min_size, max_size, roi_samples, args.steps)
        print(f"| {min_size}-{max_size} | {roi_samples} | {sum(times) / len(times):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()
