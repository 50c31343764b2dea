"""Calibrate dedup's geometric check pair by pair: copies against look-alikes, on real photos.

    python bench/bench_verify_pairs.py [--per-image 30] [--originals 60]

The check (simsiam_embed/explore/verify.py) measures, for a pair of pictures, the keypoints
agreeing on one similarity transform (inliers), the share of each picture the other covers under
it (overlap), and how well the aligned pictures' fine detail correlates (agreement). This bench
measures all three on pairs whose answer is known, without an encoder in the way:

- copies: ants/bees photos, each with one edit as people's copies are (bench_dedup_threshold's
  seven), at full size and reduced to about 300 x 200 px; and the raccoon set's known copies
  (resized: 50/52, 50/74, 21/45; a caption added: 51/85; two frames of one burst: 186/199);
- not copies: pairs of photos of one class (ants with ants, bees with bees: the look-alikes an
  encoder proposes), every pair of the raccoon set's other photos, and two shots of one scene
  (the left and right 60% of a photo, a photo against its centre zoomed 2x, and two other photos
  pasted over the middle of one photo: another subject in front of the same background).

It prints each set's count passing the inlier rule alone and the whole rule, and the measures of
the not-copies that pass the inlier rule (the cases the other two checks exist for).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dedup_threshold import EDITS  # noqa: E402
from common import machine, require_shared_data  # noqa: E402

from simsiam_embed.explore import verify  # noqa: E402
from simsiam_embed.image_files import open_image  # noqa: E402
from simsiam_embed.index.catalog import CatalogEntry  # noqa: E402

RACCOON_COPIES = [(50, 52), (50, 74), (21, 45), (51, 85), (186, 199)]   # 52 and 74 are byte-identical


def entry(path: Path, number: int) -> CatalogEntry:
    data = path.read_bytes()
    return CatalogEntry(number, str(path), len(data), 0, "", hashlib.sha256(data).hexdigest())


def reduced(image: Image.Image, side: int = 300) -> Image.Image:
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def two_shots(image: Image.Image, others: tuple[Image.Image, Image.Image]) -> list[tuple[str, Image.Image, Image.Image]]:
    """Two shots of one scene that are not copies of each other: panned (the left and right 60%:
    a third of each in common), zoomed (the whole and its centre at 2x), and another subject in
    front of the same background (two other photos over the middle 70% of the sides, half the area)."""
    w, h = image.size
    left, right = image.crop((0, 0, round(0.6 * w), h)), image.crop((round(0.4 * w), 0, w, h))
    centre = image.crop((w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)).resize((w, h), Image.BICUBIC)
    box = (round(0.15 * w), round(0.15 * h), round(0.85 * w), round(0.85 * h))
    subjects = []
    for other in others:
        composed = image.copy()
        composed.paste(other.resize((box[2] - box[0], box[3] - box[1]), Image.BICUBIC), box[:2])
        subjects.append(composed)
    return [("panned", left, right), ("zoomed 2x", image, centre), ("another subject", *subjects)]


def measure(pairs: list[tuple[Path, Path]]) -> list[verify.GeometricMatch | None]:
    paths = sorted({p for pair in pairs for p in pair})
    features = dict(zip(paths, verify.extract_features([entry(p, n) for n, p in enumerate(paths)])))
    found = []
    for a, b in pairs:
        first, second = features[a], features[b]
        usable = first is not None and second is not None and first.verifiable and second.verifiable
        found.append(verify.match(first, second) if usable else None)
    return found


def summarise(name: str, matches: list[verify.GeometricMatch | None], copies: bool, show: int = 8) -> None:
    judged = [m for m in matches if m is not None]
    by_inliers = [m for m in judged if m.inliers >= verify.MIN_INLIERS]
    whole = [m for m in judged if m.is_copy]
    word = "found" if copies else "wrongly confirmed"
    print(f"| {name} | {len(matches)} | {len(matches) - len(judged)} | {len(by_inliers)} | {len(whole)} | ({word}) |")
    interesting = [m for m in by_inliers if m.is_copy != copies]
    interesting.sort(key=lambda m: -m.inliers)
    for m in interesting[:show]:
        print(f"|   {'missed' if copies else 'passes inliers'}: {m.inliers} inliers, overlap {m.overlap:.2f}, "
              f"agreement {m.agreement:.2f}{', mirrored' if m.mirrored else ''} | | | | | |")
    if by_inliers:
        values = np.array([(m.overlap, m.agreement) for m in by_inliers])
        low = np.percentile(values, 5 if copies else 95, axis=0)
        print(f"|   ({'5th' if copies else '95th'} percentile over inlier-passing pairs: overlap {low[0]:.2f}, "
              f"agreement {low[1]:.2f}) | | | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-image", type=int, default=30, help="same-class partners per ants/bees photo")
    parser.add_argument("--originals", type=int, default=60, help="ants/bees photos given each edit")
    parser.add_argument("--raccoon-pairs", type=int, help="a random sample of the raccoon set's other pairs (all: 19,8xx)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = require_shared_data()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    print(f"machine: {machine()}; MIN_INLIERS {verify.MIN_INLIERS}, MIN_OVERLAP {verify.MIN_OVERLAP}, "
          f"MIN_DETAIL_AGREEMENT {verify.MIN_DETAIL_AGREEMENT}\n")
    print("| pairs | count | not judged (too small or plain) | pass the inlier rule | pass the whole rule | |")
    print("| --- | --- | --- | --- | --- | --- |")
    photos = {kind: sorted((data / "hymenoptera").glob(f"*/{kind}/*.jpg")) for kind in ("ants", "bees")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size_name, resize in (("full size", lambda image: image), ("about 300 x 200", reduced)):
            for edit_name, edit in EDITS.items():
                pairs = []
                for number, path in enumerate(rng.sample(photos["ants"] + photos["bees"], args.originals)):
                    original = tmp / f"{size_name[:4]}-{edit_name[:6]}-{number}-original.png"
                    picture = resize(open_image(path))
                    picture.save(original)
                    stem = tmp / f"{size_name[:4]}-{edit_name[:6]}-{number}-copy".replace(" ", "")
                    edit(picture, stem)
                    pairs.append((original, next(tmp.glob(stem.name + ".*"))))
                summarise(f"copy, {edit_name}, {size_name}", measure(pairs), copies=True)
        raccoon = data / "raccoon" / "images"
        summarise("copy, raccoon's own", measure([(raccoon / f"raccoon-{a}.jpg", raccoon / f"raccoon-{b}.jpg")
                                                   for a, b in RACCOON_COPIES]), copies=True)
        for kind, paths in photos.items():
            pairs = [(a, b) for a in paths for b in rng.sample(paths, min(args.per_image, len(paths))) if a < b]
            summarise(f"not a copy: two {kind}", measure(pairs), copies=False)
        copies = {frozenset(p) for p in RACCOON_COPIES} | {frozenset((52, 74))}
        numbers = sorted(int(p.stem.split("-")[1]) for p in raccoon.glob("raccoon-*.jpg"))
        digests = {n: hashlib.sha256((raccoon / f"raccoon-{n}.jpg").read_bytes()).hexdigest() for n in numbers}
        pairs = [(raccoon / f"raccoon-{a}.jpg", raccoon / f"raccoon-{b}.jpg") for i, a in enumerate(numbers)
                 for b in numbers[i + 1:] if frozenset((a, b)) not in copies and digests[a] != digests[b]
                 and not ({a, b} & {50, 52, 74} and {a, b} <= {50, 52, 74})]
        if args.raccoon_pairs is not None:
            pairs = rng.sample(pairs, min(args.raccoon_pairs, len(pairs)))
        summarise("not a copy: two raccoon photos", measure(pairs), copies=False)
        shots: dict[str, list[tuple[Path, Path]]] = {}
        everyone = photos["ants"] + photos["bees"]
        for number, path in enumerate(rng.sample(everyone, args.originals)):
            others = tuple(open_image(other) for other in rng.sample([p for p in everyone if p != path], 2))
            for name, first, second in two_shots(open_image(path), others):
                a, b = tmp / f"shot-{number}-{name[:4]}-a.png", tmp / f"shot-{number}-{name[:4]}-b.png"
                first.save(a)
                second.save(b)
                shots.setdefault(name, []).append((a, b))
        for name, pairs in shots.items():
            summarise(f"not a copy: two shots of one scene, {name}", measure(pairs), copies=False)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
