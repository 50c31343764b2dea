"""Rebuild examples/fashion-mnist/ from the original Fashion-MNIST IDX files (how the sample was made).

    python examples/make_fashion_mnist_sample.py ../shared/data/fashion-mnist

Takes the first 100 training and 20 test images of each class, in file order, as 28x28
grayscale PNGs in class folders: train/<class>/ and test/<class>/.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, per_class: int, out: Path) -> None:
    for label, name in enumerate(CLASSES):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for number, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[index], mode="L").save(folder / f"{name}-{number:03d}.png", optimize=True)


def main(source: Path) -> None:
    out = Path(__file__).parent / "fashion-mnist"
    shutil.rmtree(out, ignore_errors=True)
    write_split(read_idx(source / "train-images-idx3-ubyte.gz"), read_idx(source / "train-labels-idx1-ubyte.gz"), 100, out / "train")
    write_split(read_idx(source / "t10k-images-idx3-ubyte.gz"), read_idx(source / "t10k-labels-idx1-ubyte.gz"), 20, out / "test")
    shutil.copy(source / "copyright", out / "COPYRIGHT")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/fashion-mnist"))
