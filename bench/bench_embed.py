"""Embedding throughput: ONNX Runtime (CPU provider) fp32 and int8 against PyTorch eager, same
model, same images, one run.

    python bench/bench_embed.py [--checkpoint RUN/checkpoint.pt] [--cases resnet50] [--bf16]

Cases on real images: Fashion-MNIST at 28 px (the small-image ResNet-18) and the ants/bees JPEGs
at 224 px (ResNet-18 and ResNet-50, the ImageNet recipe). Weights are random: speed does not
depend on them, but which neighbours int8 keeps does, so the int8 export's neighbour overlap is
printed for the random weights and, with ``--checkpoint``, for a trained encoder on its own
images. Also reports the share of wall time spent waiting for decoded images. ``--bf16`` adds
PyTorch in bf16 (autocast, channels_last): ONNX Runtime's CPU provider has no bf16 arithmetic,
so PyTorch is the way to bf16 on a CPU; ``--cases`` keeps the cases whose label has the text.
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
from simsiam_embed.errors import UserError
from simsiam_embed.inference.export import export_onnx


def make_checkpoint(folder: Path, recipe: str, backbone: str, crop: int, data_dir: Path) -> Path:
    config = PretrainConfig(str(data_dir), "bench", recipe=recipe, backbone=backbone, crop_size=crop,
                            small_image_stem=recipe == "cifar", projector_layers=2 if recipe == "cifar" else 3)
    torch.manual_seed(0)
    path = folder / f"{backbone}-{crop}.pt"
    Checkpoint(kind="pretrain", settings=config.to_dict(), model=build_model(config).state_dict(), step=0,
               total_steps=0, finished=True, extra={"steps_per_epoch": 1}).save(path)
    return path


class TorchBf16Encoder(TorchEncoder):
    """The checkpoint's backbone in PyTorch, bf16 autocast and channels_last, on the CPU."""

    def __init__(self, checkpoint: Path):
        super().__init__(checkpoint, "cpu")
        self.backbone = self.backbone.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, images):
        batch = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.backbone(batch).float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="also export this trained run int8 and print its neighbour overlap")
    parser.add_argument("--cases", default="", help="only the cases whose label contains this text")
    parser.add_argument("--bf16", action="store_true", help="also PyTorch bf16 (autocast, channels_last)")
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
        for label, folder, recipe, backbone, crop in [case for case in cases if args.cases in case[0]]:
            checkpoint = make_checkpoint(tmp, recipe, backbone, crop, folder)
            onnx_path = export_onnx(checkpoint, tmp / f"{backbone}-{crop}.onnx").path
            paths = discover_images(folder)
            encoders = [("PyTorch eager", TorchEncoder(checkpoint, "cpu")), ("ONNX Runtime CPU", OnnxEncoder(onnx_path, "cpu"))]
            if args.bf16:
                encoders.append(("PyTorch bf16", TorchBf16Encoder(checkpoint)))
            overlap = "-"
            try:
                int8 = export_onnx(checkpoint, tmp / f"{backbone}-{crop}-int8.onnx", precision="int8")
                encoders.append(("ONNX Runtime CPU int8", OnnxEncoder(int8.path, "cpu")))
                overlap = f"{int8.neighbour_overlap:.3f}"
            except UserError as error:   # refused by the neighbour gate: no file to time
                overlap = f"refused ({str(error)[:80]})"
            print(f"{label}: int8 neighbour overlap with fp32 (random weights) {overlap}", flush=True)
            measured = {}
            for name, encoder in encoders:
                embed_paths(paths[: args.batch_size * 2], encoder, args.batch_size, args.workers, show_progress=False)
                result = embed_paths(paths, encoder, args.batch_size, args.workers, show_progress=False)
                measured[name] = result
                print(f"{label}: {name} {result.images_per_second:.0f} images/s "
                      f"(waiting for decoded images {100 * result.decode_share:.0f}% of the time)", flush=True)
            rows.append((label, len(paths), measured, overlap))
        if args.checkpoint:
            trained = export_onnx(args.checkpoint, tmp / "trained-int8.onnx", precision="int8")
            print(f"trained {args.checkpoint}: int8 top-10 neighbour overlap with fp32 on its own images "
                  f"{trained.neighbour_overlap:.3f}, smallest cosine to PyTorch {trained.min_cosine:.4f}")
    bf16_header = " PyTorch bf16 (images/s) |" if args.bf16 else ""
    print(f"\n| case | images | PyTorch eager (images/s) |{bf16_header} ORT fp32 (images/s) | ORT int8 (images/s) | "
          "int8 / fp32 | int8 overlap (random weights) | decode wait, ORT int8 |")
    print("| --- " * (9 if args.bf16 else 8) + "|")
    for label, count, measured, overlap in rows:
        torch_rate = measured["PyTorch eager"].images_per_second
        fp32 = measured["ONNX Runtime CPU"]
        int8 = measured.get("ONNX Runtime CPU int8")
        int8_cells = (f"{int8.images_per_second:.0f} | {int8.images_per_second / fp32.images_per_second:.2f}x"
                      if int8 else "- | -")
        bf16_cell = f" {measured['PyTorch bf16'].images_per_second:.0f} |" if args.bf16 else ""
        print(f"| {label} | {count} | {torch_rate:.0f} |{bf16_cell} {fp32.images_per_second:.0f} | {int8_cells} | {overlap} | "
              f"{100 * (int8 or fp32).decode_share:.0f}% |")


if __name__ == "__main__":
    main()
