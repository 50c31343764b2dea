"""Calibrate `dedup`: plant edited copies among distinct real images, then score the groups
`dedup` finds (pair precision and recall, by kind of edit), today's pixel check and the
geometric check side by side in one run, with the time per 1,000 images.

    python bench/bench_dedup_threshold.py --images PHOTOS --model runs/x/encoder.onnx [--images ... --model ...]

Each --images folder is paired with the --model after it. From each folder, --planted images are
drawn at random and each gets one copy edited as people's copies are (in turn): JPEG re-encoded at
quality 30, resized to 60%, centre-cropped to 85%, brightened by 15%, mirrored and re-encoded at
quality 60, rotated by 5 degrees, a caption strip across the bottom. Every image and copy is
indexed with the model and `find_duplicates` runs at each threshold and at the default. A pair
counts as found when the original and its copy land in one group; precision is over all pairs
the groups imply (distinct images wrongly joined lower it). The same folder with nothing planted
shows the false groups each rule makes on its own.
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from simsiam_embed.artefacts import file_digest
from simsiam_embed.image_files import discover_images, open_image
from simsiam_embed.inference.onnx_encoder import OnnxEncoder
from simsiam_embed.explore.analyses import find_duplicates
from simsiam_embed.index.store import EncoderIdentity, load_index, update_index

THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.93, 0.95, 0.97, 0.99)


def jpeg_low_quality(image: Image.Image, out: Path) -> None:
    image.save(out.with_suffix(".jpg"), quality=30)


def half_size(image: Image.Image, out: Path) -> None:
    image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.BICUBIC).save(out.with_suffix(".png"))


def crop_five_percent(image: Image.Image, out: Path) -> None:
    dx, dy = round(image.width * 0.05), round(image.height * 0.05)
    image.crop((dx, dy, image.width - dx, image.height - dy)).save(out.with_suffix(".png"))


def brighter(image: Image.Image, out: Path) -> None:
    ImageEnhance.Brightness(image).enhance(1.15).save(out.with_suffix(".png"))


def resize_60(image: Image.Image, out: Path) -> None:
    image.resize((max(1, round(image.width * 0.6)), max(1, round(image.height * 0.6))), Image.BICUBIC).save(
        out.with_suffix(".png"))


def centre_crop_85(image: Image.Image, out: Path) -> None:
    width, height = round(image.width * 0.85), round(image.height * 0.85)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image.crop((left, top, left + width, top + height)).save(out.with_suffix(".png"))


def mirror_jpeg_q60(image: Image.Image, out: Path) -> None:
    image.transpose(Image.FLIP_LEFT_RIGHT).save(out.with_suffix(".jpg"), quality=60)


def rotate_5(image: Image.Image, out: Path) -> None:
    image.rotate(5, resample=Image.BICUBIC, expand=False).save(out.with_suffix(".png"))


def caption_strip(image: Image.Image, out: Path) -> None:
    """A white strip with a line of text across the bottom eighth, as a meme or a watermark."""
    from PIL import ImageDraw

    captioned = image.copy()
    strip = max(8, image.height // 8)
    draw = ImageDraw.Draw(captioned)
    draw.rectangle([0, image.height - strip, image.width, image.height], fill=(255, 255, 255))
    draw.text((4, image.height - strip + 2), "shared from my phone  #nature", fill=(0, 0, 0))
    captioned.save(out.with_suffix(".png"))


EDITS = {"jpeg q30": jpeg_low_quality, "resize 60%": resize_60, "centre crop 85%": centre_crop_85,
         "brightness +15%": brighter, "mirror + jpeg q60": mirror_jpeg_q60, "rotate 5 deg": rotate_5,
         "caption strip": caption_strip}


def plant(images: list[Path], planted: int, folder: Path, seed: int,
          edits: dict | None = None) -> dict[str, tuple[str, str]]:
    """Copy the distinct images into ``folder`` and add one edited copy of ``planted`` of them,
    ``edits`` (default: all of EDITS) in turn; returns {copy path: (original path, edit name)}."""
    originals = folder / "originals"
    copies = folder / "copies"
    originals.mkdir(parents=True)
    copies.mkdir()
    placed = []
    for number, path in enumerate(images):
        target = originals / f"{number:05d}{path.suffix.lower()}"
        shutil.copyfile(path, target)
        placed.append(target)
    truth = {}
    edits = itertools.cycle((EDITS if edits is None else edits).items())
    for number, original in enumerate(random.Random(seed).sample(placed, planted)):
        name, edit = next(edits)
        stem = copies / f"copy-{number:04d}"
        edit(open_image(original), stem)
        made = next(copies.glob(stem.name + ".*"))
        truth[str(made.resolve())] = (str(original.resolve()), name)
    return truth


def paths_of(result) -> list[list[str]]:
    return [[member.path for member in group.members] for group in result.groups]


def f_score(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def score(groups: list[list[str]], truth: dict[str, tuple[str, str]]) -> tuple[float, float, dict[str, float]]:
    group_of = {path: number for number, group in enumerate(groups) for path in group}
    implied = sum(len(group) * (len(group) - 1) // 2 for group in groups)
    found_by_edit: dict[str, list[bool]] = {}
    for copy, (original, edit) in truth.items():
        found = copy in group_of and group_of.get(original) == group_of[copy]
        found_by_edit.setdefault(edit, []).append(found)
    found = sum(sum(values) for values in found_by_edit.values())
    precision = found / implied if implied else 1.0
    recall = found / len(truth)
    return precision, recall, {edit: float(np.mean(values)) for edit, values in found_by_edit.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, action="append", required=True)
    parser.add_argument("--model", type=Path, action="append", required=True, help="encoder.onnx")
    parser.add_argument("--planted", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--thresholds", type=float, nargs="*", default=list(THRESHOLDS))
    args = parser.parse_args()
    if len(args.images) != len(args.model):
        parser.error("give one --model after each --images")
    print(f"machine: {machine()}")
    for images_dir, model in zip(args.images, args.model):
        images = discover_images(images_dir)
        for planted in (0, min(args.planted, len(images))):
            with tempfile.TemporaryDirectory() as scratch:
                scratch = Path(scratch)
                truth = plant(images, planted, scratch / "images", args.seed)
                encoder = OnnxEncoder(model)
                identity = EncoderIdentity("onnx", str(model), file_digest(model), encoder.dim)
                update_index(scratch / "images", encoder, identity, scratch / "index", report=lambda _m: None,
                             show_progress=False)
                loaded = load_index(scratch / "index", for_search=False)
                print(f"\n{images_dir}: {len(images)} distinct images + {len(truth)} planted copies, model {model}")
                if not truth:
                    for label, geometry in (("pixel check (before)", False), ("geometric check", True)):
                        result = find_duplicates(loaded, None, geometry=geometry)
                        print(f"  nothing planted, {label}: {len(result.groups)} groups "
                              f"({', '.join(str([Path(m.path).name for m in g.members]) for g in result.groups[:5])})")
                    continue
                print(f"| rule | threshold | groups | pair precision | recall | F1 | {' | '.join(EDITS)} | s / 1,000 images |")
                print("|---" * (7 + len(EDITS)) + "|")
                for label, geometry in (("pixel check (before)", False), ("geometric check", True)):
                    for threshold in (*args.thresholds, None):
                        started = time.monotonic()
                        result = find_duplicates(loaded, threshold, geometry=geometry)
                        seconds = time.monotonic() - started
                        precision, recall, by_edit = score(paths_of(result), truth)
                        shown = "**default**" if threshold is None else threshold
                        print(f"| {label} | {shown} | {len(result.groups)} | {precision:.3f} | {recall:.3f} | "
                              f"{f_score(precision, recall):.3f} | "
                              + " | ".join(f"{by_edit.get(edit, 0):.2f}" for edit in EDITS)
                              + f" | {1000 * seconds / loaded.count:.1f} |", flush=True)
                    print(f"  ({label} default: {find_duplicates(loaded, None, geometry=geometry).rule.describe()})")


if __name__ == "__main__":
    main()
