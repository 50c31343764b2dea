"""Embedding throughput: ONNX Runtime (CPU provider) against PyTorch eager, same model, same images.

    python bench/bench_embed.py

Two cases on real images: Fashion-MNIST at 28 px (the small-image ResNet-18) and the ants/bees
JPEGs at 224 px (ResNet-18 and ResNet-50, the ImageNet recipe). Weights are random: speed does
not depend on them. Also reports the share of wall time spent waiting for decoded images.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import machine, require_shared_data, write_fashion_mnist_folder
from simsiam_embed.trained_model import build_model
from simsiam_embed.artefacts import Checkpoint
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.image_files import discover_images
from simsiam_embed.inference.onnx_encoder import OnnxEncoder
from simsiam_embed.inference.embed import TorchEncoder, embed_paths
from simsiam_embed.inference.export import export_onnx


def make_checkpoint(folder: Path, recipe: str, backbone: str, crop: int, data_dir: Path) -> Path:
    config = PretrainConfig(str(data_dir), "bench", recipe=recipe, backbone=backbone, crop_size=crop,
                            small_image_stem=recipe == "cifar", projector_layers=2 if recipe == "cifar" else 3)
    torch.manual_seed(0)
    path = folder / f"{backbone}-{crop}.pt"
    Checkpoint(kind="pretrain", settings=config.to_dict(), model=build_model(config).state_dict(), step=0,
               total_steps=0, finished=True, extra={"steps_per_epoch": 1}).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    data = require_shared_data()
    print(f"machine: {machine()}; batch {args.batch_size}, {args.workers} decoding workers; torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fmnist = write_fashion_mnist_folder(tmp / "fmnist", "test", 4000)
        photos = data / "hymenoptera"
        cases = [("resnet18 small-image, 28 px, Fashion-MNIST PNGs", fmnist, "cifar", "resnet18", 28),
                 ("resnet18, 224 px, ants/bees JPEGs", photos, "imagenet", "resnet18", 224),
                 ("resnet50, 224 px, ants/bees JPEGs", photos, "imagenet", "resnet50", 224)]
        for label, folder, recipe, backbone, crop in cases:
            checkpoint = make_checkpoint(tmp, recipe, backbone, crop, folder)
            onnx_path = export_onnx(checkpoint, tmp / f"{backbone}-{crop}.onnx").path
            paths = discover_images(folder)
            encoders = [("PyTorch eager", TorchEncoder(checkpoint, "cpu")), ("ONNX Runtime CPU", OnnxEncoder(onnx_path, "cpu"))]
            measured = {}
            for name, encoder in encoders:
                embed_paths(paths[: args.batch_size * 2], encoder, args.batch_size, args.workers, show_progress=False)
                result = embed_paths(paths, encoder, args.batch_size, args.workers, show_progress=False)
                measured[name] = result
                print(f"{label}: {name} {result.images_per_second:.0f} images/s "
                      f"(waiting for decoded images {100 * result.decode_share:.0f}% of the time)", flush=True)
            rows.append((label, len(paths), measured))
    print("\n| case | images | PyTorch eager (images/s) | ONNX Runtime CPU (images/s) | speed-up | decode wait, ORT |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, count, measured in rows:
        torch_rate = measured["PyTorch eager"].images_per_second
        ort = measured["ONNX Runtime CPU"]
        print(f"| {label} | {count} | {torch_rate:.0f} | {ort.images_per_second:.0f} | "
              f"{ort.images_per_second / torch_rate:.2f}x | {100 * ort.decode_share:.0f}% |")


if __name__ == "__main__":
    main()
