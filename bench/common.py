"""Helpers shared by the benchmarks: real data from ../shared/data, machine description."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simsiam_embed.inference.evaluate import KNN_SETTINGS


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# One IDX reader: the one that made the bundled sample.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from make_fashion_mnist_sample import read_idx  # noqa: E402


def require_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"this benchmark needs the real data at {SHARED_DATA} (see the project README)")
    return SHARED_DATA


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}"


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    root = require_shared_data() / "fashion-mnist"
    prefix = "train" if split == "train" else "t10k"
    return read_idx(root / f"{prefix}-images-idx3-ubyte.gz"), read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")


def write_fashion_mnist_folder(out: Path, split: str, count: int, size: int = 28) -> Path:
    """The first ``count`` images of a split as PNG class folders (resized to ``size`` if not 28)."""
    images, labels = fashion_mnist(split)
    for index in range(count):
        folder = out / str(int(labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(images[index], mode="L")
        if size != 28:
            image = image.resize((size, size), Image.BILINEAR)
        image.save(folder / f"{index:05d}.png")
    return out


#: The labelled sets of the quality benches: Fashion-MNIST's first 10,000 training images (the
#: unlabelled set and the kNN bank) and first 2,000 test images; the ants/bees photos' own split.
DATASETS = ("fashion-mnist", "hymenoptera")
FASHION_MNIST_TRAIN, FASHION_MNIST_TEST = 10_000, 2_000


def labelled_folders(dataset: str, tmp: Path) -> tuple[Path, Path]:
    """(unlabelled training set and kNN bank, test queries) of one of DATASETS, as class folders."""
    if dataset == "fashion-mnist":
        return (write_fashion_mnist_folder(tmp / "train", "train", FASHION_MNIST_TRAIN),
                write_fashion_mnist_folder(tmp / "test", "test", FASHION_MNIST_TEST))
    root = require_shared_data() / "hymenoptera"
    return root / "train", root / "test"


def raw_pixel_knn(train_dir: Path, test_dir: Path) -> list[float]:
    """kNN on the images' own pixels (the library's RawPixelEncoder, as `knn --compare-raw-pixels`
    scores them): the floor."""
    from simsiam_embed.inference.embed import RawPixelEncoder
    from simsiam_embed.inference.evaluate import evaluate_knn

    evaluation = evaluate_knn(RawPixelEncoder(), train_dir, test_dir, KNN_SETTINGS, show_progress=False)
    return [report.top1 for report in evaluation.reports]


class LightlySimSiam:
    """lightly 1.6's SimSiam as its example and CIFAR-10 benchmark build it: ResNet-18 with the
    standard stem, its ProjectionHead as a 2-layer 2048-d projector, its SimSiamPredictionHead
    (2048-512-2048) and its NegativeCosineSimilarity, symmetrised. Raises ImportError without lightly."""

    def __init__(self, seed: int = 0):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import ProjectionHead, SimSiamPredictionHead
        from torch import nn
        from torchvision import models as tv_models

        torch.manual_seed(seed)
        self.backbone = nn.Sequential(*list(tv_models.resnet18().children())[:-1])
        self.projector = ProjectionHead([(512, 2048, nn.BatchNorm1d(2048), nn.ReLU()),
                                         (2048, 2048, nn.BatchNorm1d(2048, affine=False), None)])
        self.predictor = SimSiamPredictionHead(2048, 512, 2048)
        self.criterion = NegativeCosineSimilarity()
        self.parts = nn.ModuleList([self.backbone, self.projector, self.predictor])

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        self.parts.train()
        z0, z1 = (self.projector(self.backbone(x).flatten(start_dim=1)) for x in (x0, x1))
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
