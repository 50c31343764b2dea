"""Precision and recall of the image-quality checks (simsiam_embed/explore/quality.py) on photos
degraded on purpose, with each measure's spread over the photos as they are.

    python bench/bench_quality_checks.py --images PHOTOS [--per-kind 30]

From the folder, --per-kind photos each get one of these degradations (different photos per
kind): Gaussian blur of radius 3 px at 512 px, darkened to 12% brightness, over-exposed (x3,
clipped), reduced to fit 48 px, a solid colour with faint noise, and a JPEG with 16 bytes of its
compressed data overwritten (kept only if it still decodes, as the index would take it; a file
cut short, even by its last two bytes, does not decode, so `index` lists it as unreadable). Every
original and every degraded file is measured; a check's precision is the share of the files it
flags that were degraded its way (an original it flags counts against it, though some real photos
are blurry or dark), its recall the share of its own kind it flags.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from simsiam_embed.explore.quality import CHECKS, picture_quality  # noqa: E402
from simsiam_embed.explore.workers import map_in_workers  # noqa: E402
from simsiam_embed.image_files import UnreadableImage, discover_images, open_image  # noqa: E402


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def blurred(image: Image.Image, rng: random.Random) -> bytes:
    image = image.copy()
    image.thumbnail((512, 512))
    return jpeg(image.filter(ImageFilter.GaussianBlur(3)))


def dark(image: Image.Image, rng: random.Random) -> bytes:
    return jpeg(ImageEnhance.Brightness(image).enhance(0.12))


def bright(image: Image.Image, rng: random.Random) -> bytes:
    return jpeg(ImageEnhance.Brightness(image).enhance(3.0))


def tiny(image: Image.Image, rng: random.Random) -> bytes:
    image = image.copy()
    image.thumbnail((48, 48))
    return jpeg(image)


def uniform(image: Image.Image, rng: random.Random) -> bytes:
    colour = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 1.5, (image.height, image.width, 3))
    return jpeg(Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)))


def decodable(data: bytes) -> bytes | None:
    try:   # the index only holds files our decoder reads
        open_image(io.BytesIO(data))
    except UnreadableImage:
        return None
    return data


def damaged(image: Image.Image, rng: random.Random) -> bytes | None:
    data = bytearray(jpeg(image))
    scan = data.find(b"\xff\xda")
    for _ in range(16):
        data[rng.randrange(scan + 200, len(data) - 200)] = rng.randrange(256)
    return decodable(bytes(data))


#: Each degradation, and the check that should flag it.
KINDS = {"blurry": ("blurry", blurred), "too dark": ("too dark", dark), "too bright": ("too bright", bright),
         "tiny": ("tiny", tiny), "near-uniform": ("near-uniform", uniform),
         "damaged: 16 bytes overwritten": ("damaged", damaged)}


def measure(item: tuple[str, bytes]):
    kind, data = item
    return kind, picture_quality(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--per-kind", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rng = random.Random(args.seed)
    paths = discover_images(args.images)
    items = [("original", path.read_bytes()) for path in paths]
    chosen = rng.sample(paths, min(len(paths), args.per_kind * len(KINDS)))
    unreadable_damage = 0
    for number, path in enumerate(chosen):
        kind = list(KINDS)[number % len(KINDS)]
        made = KINDS[kind][1](open_image(path), rng)
        if made is None:
            unreadable_damage += 1
            continue
        items.append((kind, made))
    measured = map_in_workers(measure, items)
    print(f"\n{len(paths)} photos from {args.images} as they are, {len(items) - len(paths)} degraded "
          f"({unreadable_damage} damaged JPEGs that no longer decoded left out)\n")
    print("| check | threshold | degraded its way | flagged of them (recall) | originals flagged | other degraded flagged | precision |")
    print("|---|---|---|---|---|---|---|")
    check_of = {kind: check for kind, (check, _) in KINDS.items()}
    for check, words in CHECKS.items():
        flags = [(check_of.get(kind), q is not None and check in q.failed()) for kind, q in measured]
        own = sum(1 for c, _ in flags if c == check)
        flagged_own = sum(1 for c, flagged in flags if c == check and flagged)
        flagged_originals = sum(1 for (kind, _), (_, flagged) in zip(measured, flags) if kind == "original" and flagged)
        flagged = sum(1 for _, flagged in flags if flagged)
        precision = f"{flagged_own / flagged:.3f}" if flagged else "-"
        others: dict[str, int] = {}
        for (kind, _), (check_of_kind, flagged_here) in zip(measured, flags):
            if flagged_here and kind != "original" and check_of_kind != check:
                others[kind] = others.get(kind, 0) + 1
        other_text = ", ".join(f"{n} {kind}" for kind, n in others.items())
        print(f"| {check} | {words} | {own} | {flagged_own} ({flagged_own / max(1, own):.2f}) | "
              f"{flagged_originals} | {flagged - flagged_own - flagged_originals}"
              f"{' (' + other_text + ')' if other_text else ''} | {precision} |")
    for kind, (check, _) in KINDS.items():
        if kind != check:
            of_kind = [q for k, q in measured if k == kind]
            print(f"  {kind}: {sum(q is not None and check in q.failed() for q in of_kind)} of {len(of_kind)} flagged")
    measures = {"mean grey": lambda q: q.grey_mean, "grey std": lambda q: q.grey_std,
                "sharpness": lambda q: q.sharpness, "clipped share": lambda q: q.clipped,
                "mean grey of the unclipped": lambda q: q.rest_mean}
    print("\nEach measure by kind, percentiles 1 / 5 / 50 / 95 / 99:")
    for name, value in measures.items():
        for kind in ("original", *KINDS):
            values = [value(q) for k, q in measured if k == kind and q is not None and value(q) is not None]
            if values:
                print(f"  {name}, {kind}: " + " / ".join(f"{v:.3f}" for v in np.percentile(values, [1, 5, 50, 95, 99])))
    for (kind, q), path in zip(measured, paths):   # the originals come first, in paths' order
        if kind == "original" and q is not None and q.failed():
            print(f"  original flagged: {path.name}: {q.failed()} ({', '.join(q.measure(c) for c in q.failed())})")


if __name__ == "__main__":
    main()
