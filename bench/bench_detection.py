"""Detection transfer on the raccoon set: SimSiam initialisation against random initialisation.

    python bench/bench_detection.py --pretrain-budget 15m --epochs 8 --min-size 320 --roi-samples 128

1. SimSiam pretraining (defaults, ``--pretrain-budget``) on the 160 raccoon *training* images,
   their boxes unused: the user's situation, a folder of their own photos.
2. Faster R-CNN ResNet-18-FPN fine-tuned on the 160 training images' boxes, once from that
   backbone and once from random weights, with the same recipe and steps.
3. COCO AP, AP50, AP75 on the 40 test images, side by side, with each run's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from common import machine, require_shared_data
from simsiam_embed.settings import parse_duration
from simsiam_embed.detection.finetune import DetectionConfig, finetune_detection
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace


def csv_to_coco(rows_csv: Path, images: Path, out: Path) -> tuple[Path, list[str]]:
    """The set's CSV (filename, width, height, class, xmin, ymin, xmax, ymax) as a COCO file."""
    rows = list(csv.DictReader(rows_csv.open()))
    names = sorted({row["filename"] for row in rows})
    image_id = {name: i for i, name in enumerate(names)}
    first = {row["filename"]: row for row in rows}
    document = {
        "images": [{"id": image_id[n], "file_name": str(images / n), "width": int(first[n]["width"]),
                    "height": int(first[n]["height"])} for n in names],
        "annotations": [{"id": i, "image_id": image_id[r["filename"]], "category_id": 1, "iscrowd": 0,
                         "bbox": [float(r["xmin"]), float(r["ymin"]), float(r["xmax"]) - float(r["xmin"]),
                                  float(r["ymax"]) - float(r["ymin"])]} for i, r in enumerate(rows)],
        "categories": [{"id": 1, "name": "raccoon"}],
    }
    out.write_text(json.dumps(document))
    return out, names


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-budget", default="15m")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=533)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--roi-samples", type=int, default=128,
                        help="box-head proposals per image; detectron2's 512 makes each CPU step 1.2-1.3x slower")
    args = parser.parse_args()
    raccoon = require_shared_data() / "raccoon"
    print(f"machine: {machine()}; raccoon 160 train / 40 test images; pretraining {args.pretrain_budget}; "
          f"fine-tuning {args.epochs} epochs, batch {args.batch_size}, images {args.min_size}-{args.max_size} px, "
          f"{args.roi_samples} RoI samples per image",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_json, train_names = csv_to_coco(raccoon / "train_labels.csv", raccoon / "images", tmp / "train.json")
        test_json, _ = csv_to_coco(raccoon / "test_labels.csv", raccoon / "images", tmp / "test.json")
        unlabelled = tmp / "raccoon-photos"
        unlabelled.mkdir()
        for name in train_names:
            (unlabelled / name).symlink_to(raccoon / "images" / name)
        workspace = Workspace(tmp / "ws")
        began = time.monotonic()
        run = pretrain(unlabelled, workspace, {"time_budget_s": parse_duration(args.pretrain_budget)},
                       report=lambda _m: None, show_progress=False)
        print(f"pretraining: {run.step} steps ({run.epochs_done:.0f} epochs) in {time.monotonic() - began:.0f} s, "
              f"{run.config.backbone} crop {run.config.crop_size}, z-std {run.z_std:.4f}", flush=True)
        rows = []
        for init in ("simsiam", "random"):
            config = DetectionConfig(data=str(train_json), val_data=str(test_json), checkpoint=str(run.run_dir),
                                     init=init, backbone=None if init == "simsiam" else run.config.backbone,
                                     epochs=args.epochs, batch_size=args.batch_size, min_size=args.min_size,
                                     max_size=args.max_size, roi_samples=args.roi_samples)
            began = time.monotonic()
            result = finetune_detection(config, workspace, report=log, show_progress=False)
            seconds = time.monotonic() - began
            evaluation = result.evaluation
            rows.append((init, result.step, seconds, result.losses[-1], evaluation.ap, evaluation.ap50, evaluation.ap75,
                         result.loaded_tensors))
            print(rows[-1], flush=True)
    print("\n| backbone init | steps | fine-tuning wall time | final loss | AP | AP50 | AP75 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for init, steps, seconds, loss, ap, ap50, ap75, loaded in rows:
        label = f"SimSiam ({loaded} tensors loaded)" if init == "simsiam" else "random"
        print(f"| {label} | {steps} | {seconds / 60:.1f} min | {loss:.3f} | {ap:.3f} | {ap50:.3f} | {ap75:.3f} |")


if __name__ == "__main__":
    main()
