"""Does ours learn as fast per pair as the reference? lightly 1.6's SimSiam against ours, step for step.

    PYTHONPATH=LIGHTLY python bench/bench_fidelity.py --dataset fashion-mnist --steps 200 \\
        --eval-at 50 100 200 --seeds 0 1 2 --batch 64

Both train the same network from the same random init (torchvision's ResNet-18 with the standard
stem; a 2-layer 2048-d projector and a 2048-512-2048 predictor, the paper's CIFAR heads, as
lightly's CIFAR-10 benchmark has them) on the same unlabelled images with the same recipe (the
paper's CIFAR one: SGD, lr 0.03 x batch / 256 on a cosine schedule over --steps, the predictor's
lr fixed, momentum 0.9, weight decay 5e-4, no blur, 32-px crops), for the same steps of the same
batch, for each seed. lightly's side is its own loss (NegativeCosineSimilarity), heads
(ProjectionHead, SimSiamPredictionHead) and transform (SimSiamTransform), in a plain loop of its
example's shape; ours is ``pretrain()`` in fp32 and in bf16, and in fp32 with torchvision's init
(lightly's) instead of the official code's zero-init residual blocks, each stopped at each --eval-at step and resumed (resume
is exact: tests/test_pretrain.py). Every snapshot is scored by one evaluation: the library's
weighted kNN (bank: the training images; queries: the test set), on the same preprocessing.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common import DATASETS, LightlySimSiam, labelled_folders, machine
from simsiam_embed.images import Preprocessing
from simsiam_embed.inference.evaluate import KNN_SETTINGS, evaluate_knn
from simsiam_embed.inference.embed import TorchEncoder
from simsiam_embed.settings import RECIPE_SETTINGS
from simsiam_embed.training.loop import StopRequest
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace

CROP = 32
#: One evaluation for both sides: each whole image resized to the crop (its shorter side, then the
#: centre), as lightly's benchmarks evaluate; ours' own checkpoint would crop 32 of 37 from a photo.
EVALUATION = Preprocessing(input_size=CROP, resize_size=CROP)
RECIPE = RECIPE_SETTINGS["cifar"]
OUR_SETTINGS = dict(recipe="cifar", small_image_stem=False, crop_size=CROP, projector_layers=2, blur=False,
                    num_workers=2, log_every=10, store_images=False)


class BackboneEncoder:
    """A bare torchvision ResNet trunk (lightly's backbone) as the library's evaluation takes an encoder."""

    def __init__(self, backbone: nn.Module, preprocessing: Preprocessing):
        self.backbone, self.preprocessing = backbone.eval(), preprocessing
        self.dim, self.on_gpu, self.description = 512, False, "lightly's backbone"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.backbone(torch.from_numpy(images)).flatten(start_dim=1).float().numpy()


def knn_top1(encoder, train: Path, test: Path) -> float:
    return evaluate_knn(encoder, train, test, show_progress=False).reports[0].top1


def train_lightly(train: Path, steps: int, batch: int, seed: int, eval_at: list[int], score) -> dict[int, float]:
    """lightly 1.6's components in its example's loop, with the recipe's optimizer and schedule."""
    from lightly.data import LightlyDataset
    from lightly.transforms import SimSiamTransform

    model = LightlySimSiam(seed)
    backbone = model.backbone
    lr = RECIPE["base_lr"] * batch / 256
    optimizer = torch.optim.SGD([{"params": [*backbone.parameters(), *model.projector.parameters()], "decay": True},
                                 {"params": model.predictor.parameters(), "decay": False}],
                                lr=lr, momentum=0.9, weight_decay=RECIPE["weight_decay"])
    dataset = LightlyDataset(str(train), transform=SimSiamTransform(input_size=CROP, gaussian_blur=0.0))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=2,
                        persistent_workers=True, generator=generator)
    scores, step = {}, 0
    while step < steps:
        for (x0, x1), _, _ in loader:
            for group in optimizer.param_groups:   # the paper's cosine schedule; the predictor's lr fixed
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps)) if group["decay"] else lr
            loss = model.loss(x0, x1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step in eval_at:
                scores[step] = score(BackboneEncoder(backbone, EVALUATION))
                print(f"  lightly seed {seed} step {step}: kNN {scores[step]:.4f}", flush=True)
            if step >= steps:
                break
    del loader
    return scores


def train_ours(train: Path, workspace: Path, steps: int, batch: int, seed: int, overrides: dict, name: str,
               eval_at: list[int], score) -> dict[int, float]:
    settings = dict(OUR_SETTINGS, batch_size=batch, total_steps=steps, seed=seed, **overrides)
    scores = {}
    for point in eval_at:
        result = pretrain(train, Workspace(workspace), settings, resume=point != eval_at[0],
                          report=lambda _m: None, show_progress=False, stop=StopRequest(stop_at_step=point))
        assert result.step == point, (result.step, point)
        encoder = TorchEncoder(result.checkpoint)
        encoder.preprocessing = EVALUATION
        scores[point] = score(encoder)
        print(f"  {name} seed {seed} step {point}: kNN {scores[point]:.4f}", flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--only", nargs="+", help="run only these variants (names as in the table)")
    args = parser.parse_args()
    eval_at = sorted(set(args.eval_at) | {args.steps})
    print(f"machine: {machine()}; {args.dataset}; {args.steps} steps of batch {args.batch}; seeds {args.seeds}; "
          f"kNN k={KNN_SETTINGS[0][0]}, T={KNN_SETTINGS[0][1]}", flush=True)
    # Ours three ways: fp32 and bf16 (whichever this CPU's default is), with the official code's
    # zero-init residual blocks; and fp32 with torchvision's init (lightly's).
    variants = {"lightly 1.6 (fp32)": None, "ours fp32": {"amp": "off"}, "ours bf16": {"amp": "bf16"},
                "ours fp32, --torchvision-init": {"amp": "off", "zero_init_residual": False}}
    if args.only:
        variants = {name: settings for name, settings in variants.items() if name in args.only}
    results: dict[str, list[dict[int, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = labelled_folders(args.dataset, tmp)
        score = lambda encoder: knn_top1(encoder, train, test)  # noqa: E731
        for seed in args.seeds:
            for number, (name, settings) in enumerate(variants.items()):
                if settings is None:
                    results[name].append(train_lightly(train, args.steps, args.batch, seed, eval_at, score))
                else:
                    results[name].append(train_ours(train, tmp / f"{number}-{seed}", args.steps, args.batch, seed,
                                                    settings, name, eval_at, score))
    print(f"\n| step | " + " | ".join(f"{name}: per seed, mean" for name in variants) + " |")
    print("| --- |" + " --- |" * len(variants))
    for step in eval_at:
        cells = []
        for name in variants:
            values = [run[step] for run in results[name]]
            cells.append(" / ".join(f"{v:.3f}" for v in values) + f", **{statistics.mean(values):.3f}**")
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
