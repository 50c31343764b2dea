"""The paper's stop-gradient ablation (Figure 2, Table 1a) on real data, as one table.

    python bench/bench_ablation.py [--budget 4m] [--images 4000]

Trains the same encoder on a Fashion-MNIST subset twice, with and without the stop-gradient,
for the same time budget, then prints the std of the l2-normalised projector output (against
1/sqrt(dim)) and the weighted kNN top-1 of each (bank: the training subset, test: 1,000 test
images), next to the same network at random init. Without the stop-gradient the outputs should
collapse: std near 0 and accuracy near chance (0.1).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from common import machine, write_fashion_mnist_folder
from simsiam_embed.settings import parse_duration
from simsiam_embed.inference.embed import TorchEncoder
from simsiam_embed.inference.evaluate import evaluate_knn
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="4m", help="training time per run")
    parser.add_argument("--images", type=int, default=4000, help="unlabelled training images")
    args = parser.parse_args()
    print(f"machine: {machine()}; {args.images} Fashion-MNIST images, {args.budget} per run, CIFAR recipe defaults")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = write_fashion_mnist_folder(tmp / "train", "train", args.images)
        test = write_fashion_mnist_folder(tmp / "test", "test", 1000)
        for label, stop_gradient in (("with stop-gradient (SimSiam)", True), ("without stop-gradient", False)):
            result = pretrain(train, Workspace(tmp / label[:12].replace(" ", "-")),
                              dict(time_budget_s=parse_duration(args.budget), stop_gradient=stop_gradient),
                              report=lambda _m: None, show_progress=False)
            epochs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
                      if "epoch_end" in line]
            knn = evaluate_knn(TorchEncoder(result.checkpoint), train, test, ((200, 0.1),), show_progress=False)
            rows.append((label, result.step, epochs[-1]["z_std"], epochs[-1]["loss"], knn.reports[0].top1))
            print(f"{label}: {result.step} steps, final epoch z-std {epochs[-1]['z_std']:.4f}, "
                  f"loss {epochs[-1]['loss']:.3f}, kNN top-1 {knn.reports[0].top1:.3f}", flush=True)
        random_init = evaluate_knn(TorchEncoder(result.checkpoint, random_init=True), train, test, ((200, 0.1),),
                                   show_progress=False).reports[0].top1
    dim = result.config.dim
    print(f"\n| run | steps | z-std (1/sqrt(dim) = {1 / math.sqrt(dim):.4f}) | loss | kNN top-1 (k=200) |")
    print("| --- | --- | --- | --- | --- |")
    for label, steps, z_std, loss, top1 in rows:
        print(f"| {label} | {steps} | {z_std:.4f} | {loss:.3f} | {top1:.3f} |")
    print(f"| random init (no training) | 0 | | | {random_init:.3f} |")


if __name__ == "__main__":
    main()
