"""The learning curve: kNN top-1 of the SimSiam encoder after each training budget, against two
flat lines: raw pixels, and the same network at random init.

    python bench/bench_quality.py --budgets 5m 15m 45m

Fashion-MNIST: the first 10,000 training images are the unlabelled training set and the kNN
bank, the first 2,000 test images the queries. Each budget is a separate run with a finished
schedule and every other setting at its default. Run it when nothing else loads the machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import machine, raw_pixel_knn, write_fashion_mnist_folder
from simsiam_embed.config import parse_duration
from simsiam_embed.embed import TorchEncoder
from simsiam_embed.evaluate import KNN_SETTINGS, evaluate_knn
from simsiam_embed.pretrain import pretrain
from simsiam_embed.workspace import Workspace

TRAIN_IMAGES, TEST_IMAGES = 10_000, 2_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", nargs="+", default=["5m", "15m", "45m"])
    args = parser.parse_args()
    settings = " and ".join(f"k={k}, T={t}" for k, t in KNN_SETTINGS)
    print(f"machine: {machine()}; Fashion-MNIST {TRAIN_IMAGES} train (bank) / {TEST_IMAGES} test; kNN {settings}")
    rows = [("raw pixels", "-", *raw_pixel_knn(TRAIN_IMAGES, TEST_IMAGES))]
    print(f"raw pixels: {rows[0][2:]}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = write_fashion_mnist_folder(tmp / "train", "train", TRAIN_IMAGES)
        test = write_fashion_mnist_folder(tmp / "test", "test", TEST_IMAGES)
        for budget in args.budgets:
            result = pretrain(train, Workspace(tmp / f"run-{budget}"), dict(time_budget_s=parse_duration(budget)),
                              report=lambda _m: None, show_progress=False)
            scores = evaluate_knn(TorchEncoder(result.checkpoint), train, test, show_progress=False)
            rows.append((f"SimSiam, {budget}", f"{result.step} steps ({result.epochs_done:.1f} epochs), "
                         f"z-std {result.z_std:.4f}", *[r.top1 for r in scores.reports]))
            print(f"{rows[-1]}", flush=True)
            if len(rows) == 2:
                random_scores = evaluate_knn(TorchEncoder(result.checkpoint, random_init=True), train, test,
                                             show_progress=False)
                rows.insert(1, ("same network, random init", "-", *[r.top1 for r in random_scores.reports]))
                print(f"{rows[1]}", flush=True)
    header = " | ".join(f"kNN top-1 (k={k}, T={t})" for k, t in KNN_SETTINGS)
    print(f"\n| encoder | training | {header} |")
    print("| --- | --- | " + " | ".join("---" for _ in KNN_SETTINGS) + " |")
    for name, training, *scores in rows:
        print(f"| {name} | {training} | " + " | ".join(f"{s:.3f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
