"""The short-budget search: which settings make SimSiam beat random init (and raw pixels) soonest.

    python bench/bench_short_budget.py --budget 5m \\
        --variant "paper:" --variant "lr 0.06:base_lr=0.06" --variant "stride 2:stem_stride=2"

Each ``--variant "NAME:key=value,key=value"`` is one pretraining run of ``--budget`` on the
first 10,000 Fashion-MNIST training images (the unlabelled set and the kNN bank), with the
given settings over the defaults (any PretrainConfig field; values are read as JSON, else as
text). Every run is scored by weighted kNN on the first 2,000 test images, next to the same
architecture at random init and to raw pixels, all in one table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import machine, raw_pixel_knn, write_fashion_mnist_folder
from simsiam_embed.settings import parse_duration
from simsiam_embed.inference.embed import TorchEncoder
from simsiam_embed.inference.evaluate import KNN_SETTINGS, evaluate_knn
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace

TRAIN_IMAGES, TEST_IMAGES = 10_000, 2_000


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return name.strip(), overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,...")
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variant]
    settings = " and ".join(f"k={k}, T={t}" for k, t in KNN_SETTINGS)
    print(f"machine: {machine()}; Fashion-MNIST {TRAIN_IMAGES} train (bank) / {TEST_IMAGES} test; "
          f"{args.budget} per run; kNN {settings}", flush=True)
    random_init_scores: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = write_fashion_mnist_folder(tmp / "train", "train", TRAIN_IMAGES)
        test = write_fashion_mnist_folder(tmp / "test", "test", TEST_IMAGES)
        rows = [("raw pixels", "", "-", "-", *raw_pixel_knn(train, test), *["-"] * len(KNN_SETTINGS))]
        for number, (name, overrides) in enumerate(variants):
            result = pretrain(train, Workspace(tmp / f"run-{number}"),
                              {**overrides, "time_budget_s": parse_duration(args.budget)},
                              report=lambda _m: None, show_progress=False)
            trained = [r.top1 for r in evaluate_knn(TorchEncoder(result.checkpoint), train, test,
                                                    show_progress=False).reports]
            architecture = json.dumps(result.config.architecture(), sort_keys=True)
            if architecture not in random_init_scores:
                random_init_scores[architecture] = [
                    r.top1 for r in evaluate_knn(TorchEncoder(result.checkpoint, random_init=True), train, test,
                                                 show_progress=False).reports]
            baseline = random_init_scores[architecture]
            settings_text = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
            rows.append((name, settings_text, f"{result.step} ({result.epochs_done:.1f} ep)",
                         f"{result.z_std:.4f}", *trained, *baseline))
            print(rows[-1], flush=True)
    header = " | ".join(f"k={k}, T={t}" for k, t in KNN_SETTINGS)
    print(f"\n| variant | settings | steps | z-std | trained: {header} | random init: {header} |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in range(2 * len(KNN_SETTINGS))) + " |")
    for name, settings_text, steps, z_std, *scores in rows:
        print(f"| {name} | {settings_text} | {steps} | {z_std} | " + " | ".join(f"{s:.3f}" if isinstance(s, float) else s for s in scores) + " |")


if __name__ == "__main__":
    main()
