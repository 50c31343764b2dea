"""Calibrate `dedup`'s threshold: plant near-duplicates among distinct real images, then score the
groups `dedup` finds at each threshold (pair precision and recall, by kind of edit).

    python bench/bench_dedup_threshold.py --images PHOTOS --model runs/x/encoder.onnx [--images ... --model ...]

Each --images folder is paired with the --model after it. From each folder, --planted images are
drawn at random and each gets one copy edited as people's copies are: JPEG re-encoded at low
quality, resized to half, cropped by 5% a side, or brightened by 15% (the four in turn). Every
image and copy is indexed with the model, and `find_duplicates` runs at each threshold. A pair
counts as found when the original and its copy land in one group; precision is over all pairs
that the groups imply (distinct images wrongly joined lower it). Side by side: the same rule
without the pixel check, and the baseline of single links (every neighbour pair at or above
the threshold joined, what a plain range search plus union-find gives) on the same graph.
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
from simsiam_embed.images import discover_images, open_image
from simsiam_embed.inference.onnx_encoder import OnnxEncoder
from simsiam_embed.explore.analyses import CentredVectors, _DisjointSets, find_duplicates, neighbour_graph
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


EDITS = {"jpeg q30": jpeg_low_quality, "half size": half_size, "crop 5%": crop_five_percent, "brightness +15%": brighter}


def plant(images: list[Path], planted: int, folder: Path, seed: int) -> dict[str, tuple[str, str]]:
    """Copy the distinct images into ``folder`` and add one edited copy of ``planted`` of them;
    returns {copy path: (original path, edit name)}."""
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
    edits = itertools.cycle(EDITS.items())
    for number, original in enumerate(random.Random(seed).sample(placed, planted)):
        name, edit = next(edits)
        stem = copies / f"copy-{number:04d}"
        edit(open_image(original), stem)
        made = next(copies.glob(stem.name + ".*"))
        truth[str(made.resolve())] = (str(original.resolve()), name)
    return truth


def single_link_groups(loaded, threshold: float) -> list[list[str]]:
    """The baseline: every pair of the 10-NN graph at or above ``threshold``, joined transitively."""
    graph = neighbour_graph(CentredVectors(loaded.vectors), 10)
    sets = _DisjointSets(loaded.count)
    for row, column in zip(*np.nonzero(graph.scores >= threshold)):
        sets.union(int(row), int(graph.positions[row, column]))
    paths = [loaded.entries[int(i)].path for i in loaded.ids]
    members: dict[int, list[str]] = {}
    for position, path in enumerate(paths):
        members.setdefault(sets.find(position), []).append(path)
    return [group for group in members.values() if len(group) > 1]


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
    args = parser.parse_args()
    if len(args.images) != len(args.model):
        parser.error("give one --model after each --images")
    print(f"machine: {machine()}")
    checked_f1: dict[float, list[float]] = {}
    checked_precision: dict[float, list[float]] = {}
    unchecked_precision: dict[float, list[float]] = {}
    for images_dir, model in zip(args.images, args.model):
        images = discover_images(images_dir)
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            truth = plant(images, min(args.planted, len(images)), scratch / "images", args.seed)
            encoder = OnnxEncoder(model)
            identity = EncoderIdentity("onnx", str(model), file_digest(model), encoder.dim)
            started = time.monotonic()
            update_index(scratch / "images", encoder, identity, scratch / "index", report=lambda _m: None,
                         show_progress=False)
            loaded = load_index(scratch / "index", for_search=False)
            print(f"\n{images_dir} ({len(images)} distinct images + {len(truth)} planted copies), model {model} "
                  f"(indexed in {time.monotonic() - started:.0f} s)")
            print(f"| threshold | groups | precision | recall | F1 | {' | '.join(EDITS)} "
                  "| no pixel check: P / R / F1 | single links: P / R / F1 |")
            print("|---" * (7 + len(EDITS)) + "|")
            for threshold in (*THRESHOLDS, None):
                result = find_duplicates(loaded, threshold)
                precision, recall, by_edit = score(paths_of(result), truth)
                f1 = f_score(precision, recall)
                checked = find_duplicates(loaded, threshold, pixel_check=False)
                p0, r0, _ = score(paths_of(checked), truth)
                if threshold is None:
                    print(f"| **default** | {len(result.groups)} | {precision:.3f} | {recall:.3f} | {f1:.3f} | "
                          + " | ".join(f"{by_edit.get(edit, 0):.2f}" for edit in EDITS)
                          + f" | {p0:.3f} / {r0:.3f} / {f_score(p0, r0):.3f} | |")
                    print(f"\ndefault: {result.rule.describe()}; without the pixel check: {checked.rule.describe()}")
                    continue
                checked_f1.setdefault(threshold, []).append(f1)
                checked_precision.setdefault(threshold, []).append(precision)
                unchecked_precision.setdefault(threshold, []).append(p0)
                p1, r1, _ = score(single_link_groups(loaded, threshold), truth)
                print(f"| {threshold} | {len(result.groups)} | {precision:.3f} | {recall:.3f} | {f1:.3f} | "
                      + " | ".join(f"{by_edit.get(edit, 0):.2f}" for edit in EDITS)
                      + f" | {p0:.3f} / {r0:.3f} / {f_score(p0, r0):.3f} | {p1:.3f} / {r1:.3f} / {f_score(p1, r1):.3f} |")
    print("\nthe calibration rules (one value per set, in the order given):")
    for number, name in enumerate(args.images):
        f1s = {t: values[number] for t, values in checked_f1.items()}
        top = max(f1s.values())
        near_best = max(t for t, f1 in f1s.items() if f1 >= top - 0.01)
        floor = min((t for t, values in checked_precision.items() if values[number] >= 0.8), default=None)
        print(f"  {name}: with the pixel check, highest threshold within 0.01 of the best F1 ({top:.3f}): {near_best}; "
              f"lowest with precision >= 0.8: {floor}")
    unchecked = min((t for t, values in unchecked_precision.items() if min(values) >= 0.8), default=None)
    print(f"  without the pixel check, lowest threshold with precision >= 0.8 on every set: {unchecked}")


if __name__ == "__main__":
    main()
