"""The short-budget study: which settings turn a few CPU minutes into a better encoder, over seeds.

    python bench/bench_short_budget.py --dataset fashion-mnist --budget 5m --seeds 0 1 \\
        --variant "paper:" --variant "multi-crop 4:small_views=4" --variant "narrow heads:dim=512"

Each ``--variant "NAME:key=value,key=value"`` is one pretraining run of ``--budget`` per seed,
with the given settings over the defaults (any PretrainConfig field; values are read as JSON,
else as text), on the dataset's unlabelled training set (bench/common.py: DATASETS). Every run
is scored by weighted kNN (bank: the training set; queries: the test set), next to the same
architecture at random init and to raw pixels, all in one table: each seed's score and their
mean, so a difference can be read against the spread between seeds. ``--reference RUN`` scores
another run's encoder as it is (a warm start's starting point) as a row of its own.

    python bench/bench_short_budget.py --budget 60s --seeds 0 1 --reference STANDIN \
        --variant "scratch:recipe=imagenet,crop_size=32" \
        --variant "warm x0.1:recipe=imagenet,crop_size=32,init=STANDIN,base_lr=0.005"
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import DATASETS, labelled_folders, machine, raw_pixel_knn
from simsiam_embed.settings import parse_duration
from simsiam_embed.inference.embed import TorchEncoder
from simsiam_embed.inference.evaluate import KNN_SETTINGS, evaluate_knn
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace


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


def knn_top1(encoder: TorchEncoder, train: Path, test: Path) -> list[float]:
    return [report.top1 for report in evaluate_knn(encoder, train, test, show_progress=False).reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,...")
    parser.add_argument("--reference", type=Path, help="a run folder scored as it is (e.g. a warm start's)")
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variant]
    knn = " and ".join(f"k={k}, T={t}" for k, t in KNN_SETTINGS)
    print(f"machine: {machine()}; {args.dataset}; {args.budget} per run; seeds {args.seeds}; kNN {knn}", flush=True)
    random_init: dict[str, list[float]] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = labelled_folders(args.dataset, tmp)
        raw_pixels = raw_pixel_knn(train, test)
        print(f"raw pixels: {raw_pixels}", flush=True)
        reference = (knn_top1(TorchEncoder(args.reference / "checkpoint.pt" if args.reference.is_dir() else args.reference),
                              train, test) if args.reference else None)
        if reference:
            print(f"reference {args.reference}: {reference}", flush=True)
        for number, (name, overrides) in enumerate(variants):
            runs = []
            for seed in args.seeds:
                result = pretrain(train, Workspace(tmp / f"run-{number}-{seed}"),
                                  {**overrides, "seed": seed, "time_budget_s": parse_duration(args.budget)},
                                  report=lambda _m: None, show_progress=False)
                runs.append((result.step, result.epochs_done, result.z_std, knn_top1(TorchEncoder(result.checkpoint), train, test),
                             result.elapsed_s))
                print(f"{name} seed {seed}: {result.step} steps in {result.elapsed_s:.0f} s, z-std {result.z_std:.4f}, kNN {runs[-1][3]}",
                      flush=True)
            architecture = json.dumps(result.config.architecture(), sort_keys=True)
            if architecture not in random_init:   # one start per architecture: the last seed's
                random_init[architecture] = knn_top1(TorchEncoder(result.checkpoint, random_init=True), train, test)
            rows.append((name, overrides, runs, random_init[architecture]))

    first = f"k={KNN_SETTINGS[0][0]}, T={KNN_SETTINGS[0][1]}"
    print(f"\n| variant | settings | steps (epochs) | training s (max) | z-std | kNN top-1 ({first}) per seed | mean | "
          f"mean at k={KNN_SETTINGS[1][0]}, T={KNN_SETTINGS[1][1]} | random init ({first}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| raw pixels | | - | - | - | | {raw_pixels[0]:.3f} | {raw_pixels[1]:.3f} | - |")
    if reference:
        print(f"| reference (no training here) | {args.reference.name} | - | - | - | | {reference[0]:.3f} | "
              f"{reference[1]:.3f} | - |")
    for name, overrides, runs, baseline in rows:
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        steps = f"{statistics.mean(r[0] for r in runs):.0f} ({statistics.mean(r[1] for r in runs):.1f})"
        z_std = f"{statistics.mean(r[2] for r in runs):.4f}"
        wall = f"{max(r[4] for r in runs):.0f}"
        per_seed = " / ".join(f"{r[3][0]:.3f}" for r in runs)
        means = [statistics.mean(r[3][i] for r in runs) for i in range(len(KNN_SETTINGS))]
        print(f"| {name} | {settings} | {steps} | {wall} | {z_std} | {per_seed} | {means[0]:.3f} | {means[1]:.3f} | {baseline[0]:.3f} |")


if __name__ == "__main__":
    main()
