"""The learning curve: kNN top-1 of the SimSiam encoder after each training budget, against two
flat lines: raw pixels, and the same network at random init.

    python bench/bench_quality.py --dataset fashion-mnist --budgets 5m 15m 45m
    python bench/bench_quality.py --dataset hymenoptera --budgets 15m

Fashion-MNIST: the first 10,000 training images are the unlabelled training set and the kNN
bank, the first 2,000 test images the queries. Ants/bees: the 244 training photos, the 153 test
photos. Each budget is a separate run with a finished schedule and every other setting at its
default. Points are added to bench/learning_curve.json (so budgets can be run separately) and
the whole curve is drawn to bench/learning_curve.png. Run it when nothing else loads the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import DATASETS, labelled_folders, machine, raw_pixel_knn
from simsiam_embed.settings import parse_duration
from simsiam_embed.inference.embed import TorchEncoder
from simsiam_embed.inference.evaluate import KNN_SETTINGS, evaluate_knn
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace

HERE = Path(__file__).resolve().parent
CURVE_JSON, CURVE_PNG = HERE / "learning_curve.json", HERE / "learning_curve.png"

def draw_curve(curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for axis, (dataset, curve) in zip(axes[0], sorted(curves.items())):
        points = sorted(curve["points"], key=lambda p: p["budget_s"])
        minutes = [p["budget_s"] / 60 for p in points]
        axis.plot(minutes, [p["top1"][0] for p in points], "o-", color="tab:blue", label="SimSiam (defaults)")
        for p, m in zip(points, minutes):
            axis.annotate(f"{p['top1'][0]:.3f}", (m, p["top1"][0]), textcoords="offset points", xytext=(0, 6),
                          ha="center", fontsize=8)
        axis.axhline(curve["raw_pixels"][0], color="tab:green", linestyle="--", label="raw pixels")
        axis.axhline(curve["random_init"][0], color="tab:red", linestyle=":", label="same network, random init")
        axis.set_xlim(0, max(minutes + [5]) * 1.1)
        axis.set_xlabel("training budget (minutes, 2 CPU cores)")
        axis.set_ylabel(f"kNN top-1 (k={KNN_SETTINGS[0][0]}, T={KNN_SETTINGS[0][1]})")
        axis.set_title(dataset)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(CURVE_PNG, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--budgets", nargs="+", default=["5m", "15m", "45m"])
    parser.add_argument("--plot-only", action="store_true", help="Redraw the PNG and tables from the JSON; train nothing.")
    args = parser.parse_args()
    settings = " and ".join(f"k={k}, T={t}" for k, t in KNN_SETTINGS)
    print(f"machine: {machine()}; {args.dataset}; kNN {settings}", flush=True)
    curves = json.loads(CURVE_JSON.read_text()) if CURVE_JSON.exists() else {}
    if args.plot_only:
        draw_and_print(curves)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = labelled_folders(args.dataset, tmp)
        curve = curves.setdefault(args.dataset, {"points": []})
        curve["raw_pixels"] = raw_pixel_knn(train, test)
        print(f"raw pixels: {curve['raw_pixels']}", flush=True)
        for budget in args.budgets:
            seconds = parse_duration(budget)
            result = pretrain(train, Workspace(tmp / f"run-{budget}"), dict(time_budget_s=seconds),
                              report=lambda _m: None, show_progress=False)
            scores = evaluate_knn(TorchEncoder(result.checkpoint), train, test, show_progress=False)
            architecture = json.dumps(result.config.architecture(), sort_keys=True)
            if curve.get("random_init_architecture") != architecture:   # the same start for every budget
                curve["random_init"] = [r.top1 for r in evaluate_knn(
                    TorchEncoder(result.checkpoint, random_init=True), train, test, show_progress=False).reports]
                curve["random_init_architecture"] = architecture
            point = {"budget_s": seconds, "steps": result.step, "epochs": round(result.epochs_done, 1),
                     "z_std": result.z_std, "top1": [r.top1 for r in scores.reports],
                     "wall_s": round(result.elapsed_s), "settings": result.config.choices}
            curve["points"] = [p for p in curve["points"] if p["budget_s"] != seconds] + [point]
            print(f"{budget}: {point}; random init {curve['random_init']}", flush=True)
            CURVE_JSON.write_text(json.dumps(curves, indent=1) + "\n")
    draw_and_print(curves)


def draw_and_print(curves: dict) -> None:
    draw_curve(curves)
    header = " | ".join(f"kNN top-1 (k={k}, T={t})" for k, t in KNN_SETTINGS)
    for dataset, curve in sorted(curves.items()):
        print(f"\n{dataset}\n| encoder | training | {header} |")
        print("| --- | --- | " + " | ".join("---" for _ in KNN_SETTINGS) + " |")
        print("| raw pixels | - | " + " | ".join(f"{s:.3f}" for s in curve["raw_pixels"]) + " |")
        print("| same network, random init | - | " + " | ".join(f"{s:.3f}" for s in curve["random_init"]) + " |")
        for p in sorted(curve["points"], key=lambda p: p["budget_s"]):
            source = f" ({p['source']})" if p.get("source") else ""
            print(f"| SimSiam, {p['budget_s'] / 60:g} min{source} | {p['steps']} steps ({p['epochs']} epochs), z-std "
                  f"{p['z_std']:.4f} | " + " | ".join(f"{s:.3f}" for s in p["top1"]) + " |")


if __name__ == "__main__":
    main()
