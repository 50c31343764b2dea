"""dedup and clusters at scale: time and peak memory on 100k and 1M synthetic embeddings.

    python bench/bench_explore.py                     # 100k and 1M, 512-d, each run in its own process
    python bench/bench_explore.py --photos ../shared/data/hymenoptera   # and dedup's two rules on real files

The vectors imitate an index: 512-d unit vectors around 2,000 cluster centres, with 1% of them
given a near-copy (the vector plus small noise: cosine ~0.985) as planted duplicates.
They are memory-mapped from a .npy file as an index generation's are, so the peak memory is what
the analysis adds to a mapped index (RSS before: the mapped file untouched, plus the catalog's
entries as Python objects). Side by side at 100k: the exact k-NN graph (all pairs,
chunked) against the IVF one the library uses past 50k vectors: time, and the share of planted
pairs each finds. An n x n matrix, the baseline this avoids, needs n^2 x 4 bytes: 40 GB at 100k. The vectors have no image files, so dedup runs
without its pixel check (which reads only the candidate pairs' files, at a reduced decode).

With ``--photos``, every planted pair also gets two real files: an original (a random crop of
one of those photos, 320 px on its longer side, so no two originals share bytes) and its copy
(mirrored and re-encoded at JPEG q60, or a centre crop of 85%, in turn); the other images'
files do not exist and are never read, since only candidate pairs are checked. dedup then runs
with both of its rules side by side, the pixel check (before issue 18) and the geometric one
(the default with OpenCV), each in its own process: what verifying copies costs at scale. The
peak RSS is the measuring process's; the geometric check's two worker processes come on top.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from simsiam_embed.explore import analyses as explore
from simsiam_embed.explore import neighbours
from simsiam_embed.index.catalog import Catalog, CatalogEntry, write_catalog
from simsiam_embed.index.store import vectors_mean

DIM = 512
CENTRES = 2_000
PLANTED_SHARE = 0.01


@dataclass
class MappedVectors:
    """What the analyses read of a LoadedIndex, without a FAISS index of its own."""

    vectors: np.ndarray
    ids: np.ndarray
    entries: Catalog
    folder: Path   # where dedup caches its colour layouts

    @property
    def count(self) -> int:
        return len(self.ids)

    def mean_vector(self) -> np.ndarray:
        return vectors_mean(self.vectors)


def make_vectors(path: Path, count: int, seed: int = 0) -> None:
    """Writes the vectors to ``path`` in chunks, and the planted pairs (copy, original) beside it."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    planted = int(count * PLANTED_SHARE)
    originals = rng.choice(count - planted, planted, replace=False)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, DIM))
    chunk = 65_536
    for start in range(0, count - planted, chunk):
        stop = min(start + chunk, count - planted)
        rows = centres[rng.integers(0, CENTRES, stop - start)] + 1.2 * rng.standard_normal((stop - start, DIM))
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    copies = out[originals] + 0.008 * rng.standard_normal((planted, DIM)).astype(np.float32)
    out[count - planted:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    out.flush()
    np.save(path.with_name("planted.npy"), np.stack([np.arange(count - planted, count), originals], axis=1))


def write_planted_files(path: Path, photos: Path, seed: int = 0) -> None:
    """Real files for the planted pairs (see the module's docstring), listed in files.json."""
    rng = np.random.default_rng(seed)
    sources = sorted(p for p in photos.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    folder = path.with_name("files")
    folder.mkdir()
    files = {}
    for number, (copy, original) in enumerate(np.load(path.with_name("planted.npy")).tolist()):
        with Image.open(sources[number % len(sources)]) as opened:
            photo = opened.convert("RGB")
        width, height = photo.size
        share = rng.uniform(0.7, 0.9)
        box_w, box_h = int(width * share), int(height * share)
        left, top = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
        picture = photo.crop((left, top, left + box_w, top + box_h))
        picture.thumbnail((320, 320))
        if number % 2:
            edited, quality = ImageOps.mirror(picture), 60
        else:
            w, h = picture.size
            edited, quality = picture.crop((int(w * 0.075), int(h * 0.075), int(w * 0.925), int(h * 0.925))), 90
        for position, image, q in ((original, picture, 90), (copy, edited, quality)):
            file = folder / f"{position:07d}.jpg"
            image.save(file, quality=q)
            data = file.read_bytes()
            files[position] = (str(file), len(data), hashlib.sha256(data).hexdigest())
    path.with_name("files.json").write_text(json.dumps(files))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RULES = {"unchecked": dict(pixel_check=False), "pixels": dict(geometry=False), "geometry": dict(geometry=True)}


def measure(path: Path, op: str, exact: bool, rule: str = "unchecked") -> dict:
    """One analysis of the vectors at ``path``, in a process that only maps them; dedup with
    one of its ``RULES`` (all but "unchecked" read the planted pairs' files)."""
    vectors = np.load(path, mmap_mode="r")
    pairs = np.load(path.with_name("planted.npy"))
    count = len(vectors)
    ids = np.arange(count, dtype=np.int64)
    entries = {i: CatalogEntry(i, f"/images/{i:07d}.jpg", 1000, 0, "", f"{i:064x}") for i in range(count)}
    if rule != "unchecked":
        for position, (file, size, digest) in json.loads(path.with_name("files.json").read_text()).items():
            entries[int(position)] = CatalogEntry(int(position), file, size, 0, "", digest)
    catalog = path.with_name(f"catalog-{rule}.sqlite")
    catalog.unlink(missing_ok=True)
    write_catalog(catalog, entries.values())
    loaded = MappedVectors(vectors, ids, Catalog(catalog), path.parent)
    if exact:
        neighbours.EXACT_NEIGHBOURS_MAX = count
    before = peak_rss_mb()
    started = time.monotonic()
    if op == "dedup":
        result = explore.find_duplicates(loaded, **RULES[rule])
        group_of = {m.id: g.number for g in result.groups for m in g.members}
        found = np.mean([a in group_of and group_of.get(a) == group_of.get(b) for a, b in pairs.tolist()])
        detail = {"method": result.method, "rule": rule, "groups": len(result.groups),
                  "planted_found": round(float(found), 4)}
    else:
        result = explore.find_clusters(loaded)
        detail = {"k": result.k, "largest": result.clusters[0].size}
    seconds = time.monotonic() - started
    return {"count": count, "op": op, "exact": exact, "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak_rss_mb()), "rss_before_mb": round(before), **detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=Path, help="measure one analysis of this vectors.npy")
    parser.add_argument("--op", choices=["dedup", "clusters"])
    parser.add_argument("--exact", action="store_true", help="force the exact k-NN graph")
    parser.add_argument("--rule", choices=list(RULES), default="unchecked")
    parser.add_argument("--counts", default="100000,1000000")
    parser.add_argument("--photos", type=Path, help="also run dedup's two rules on real files made from these photos")
    args = parser.parse_args()
    if args.vectors:
        print(json.dumps(measure(args.vectors, args.op, args.exact, args.rule)))
        return
    print(f"machine: {machine()}; {DIM}-d vectors, memory-mapped; each row its own process")
    print("| vectors | operation | rule | neighbours | seconds | peak RSS (MB) | RSS before (MB) | result |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [("dedup", True, "unchecked"), ("dedup", False, "unchecked"), ("clusters", False, "unchecked")]
    if args.photos:   # dedup's rules side by side (the exact graph and clusters are measured without)
        runs = [("dedup", False, "unchecked"), ("dedup", False, "pixels"), ("dedup", False, "geometry")]
    for count in (int(value) for value in args.counts.split(",")):
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "vectors.npy"
            make_vectors(path, count)
            if args.photos:
                started = time.monotonic()
                write_planted_files(path, args.photos)
                print(f"({count:,}: files for {int(count * PLANTED_SHARE):,} planted pairs written in "
                      f"{time.monotonic() - started:.0f} s)", flush=True)
            for op, exact, rule in runs:
                if exact and count > 200_000:
                    continue   # all pairs at 1M: 100x the 100k time
                command = ([sys.executable, __file__, "--vectors", str(path), "--op", op, "--rule", rule]
                           + (["--exact"] if exact else []))
                run = subprocess.run(command, check=True, capture_output=True, text=True)
                row = json.loads(run.stdout.splitlines()[-1])
                result = (f"{row['groups']} groups, {row['planted_found']:.1%} of planted pairs found" if op == "dedup"
                          else f"k = {row['k']}, largest cluster {row['largest']}")
                shown_rule = {"unchecked": "vectors only", "pixels": "pixel check (before)",
                              "geometry": "geometric check (default)"}[rule] if op == "dedup" else ""
                print(f"| {count:,} | {op} | {shown_rule} | {row.get('method', '')} | {row['seconds']} "
                      f"| {row['peak_rss_mb']} | {row['rss_before_mb']} | {result} |", flush=True)


if __name__ == "__main__":
    main()
