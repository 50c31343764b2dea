"""dedup's recall where the encoder barely knows the photos: candidates from the encoder's
neighbours alone, against those and the colour layouts' (simsiam_embed/explore/layout.py), one
index, one run.

    python bench/bench_dedup_candidates.py --images SMALL_PHOTOS --model runs/x/encoder.onnx
    python bench/bench_dedup_candidates.py --images SMALL_PHOTOS --random-init runs/x/checkpoint.pt

From the folder, --per-edit images get one copy for each of five edits (JPEG q30, resize 60%,
mirror + JPEG q60, centre crop 85%, brightness +15%), so 5 x --per-edit planted copies. Scored
as bench_dedup_threshold.py scores (pair precision over every pair the groups imply, recall by
edit), with each candidate source's share: pairs proposed, and confirmed by the geometric check.
The same folder with nothing planted shows the false groups. Each --real folder is indexed as it
is (its own copies, if any, are what should be found) and its groups listed, both ways.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dedup_threshold import EDITS, f_score, paths_of, plant, score  # noqa: E402
from common import machine  # noqa: E402

from simsiam_embed.artefacts import file_digest  # noqa: E402
from simsiam_embed.explore.analyses import find_duplicates  # noqa: E402
from simsiam_embed.image_files import discover_images  # noqa: E402
from simsiam_embed.index.store import EncoderIdentity, load_index, update_index  # noqa: E402

FIVE_EDITS = ("jpeg q30", "resize 60%", "mirror + jpeg q60", "centre crop 85%", "brightness +15%")


def encoder_for(args):
    if args.model is not None:
        from simsiam_embed.inference.onnx_encoder import OnnxEncoder

        encoder = OnnxEncoder(args.model)
        return encoder, EncoderIdentity("onnx", str(args.model), file_digest(args.model), encoder.dim)
    from simsiam_embed.inference.embed import TorchEncoder

    encoder = TorchEncoder(args.random_init, device="cpu", random_init=True)
    digest = hashlib.sha256(b"random init of " + file_digest(args.random_init).encode()).hexdigest()
    return encoder, EncoderIdentity("torch", str(args.random_init), digest, encoder.dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="encoder.onnx")
    source.add_argument("--random-init", type=Path, metavar="CHECKPOINT",
                        help="the checkpoint's architecture at its random init")
    parser.add_argument("--per-edit", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, action="append", default=[], help="a folder to dedup as it is")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    encoder, identity = encoder_for(args)
    images = discover_images(args.images)
    edits = {name: EDITS[name] for name in FIVE_EDITS}
    for planted in (0, len(edits) * args.per_edit):
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            truth = plant(images, planted, scratch / "images", args.seed, edits)
            update_index(scratch / "images", encoder, identity, scratch / "index", report=lambda _m: None,
                         show_progress=False)
            loaded = load_index(scratch / "index", for_search=False)
            print(f"\n{args.images}: {len(images)} distinct images + {len(truth)} planted copies, encoder "
                  f"{encoder.description}")
            if not truth:
                for label, layouts in (("encoder's neighbours (before)", False), ("+ colour layouts", True)):
                    result = find_duplicates(loaded, layouts=layouts)
                    print(f"  nothing planted, {label}: {len(result.groups)} groups "
                          f"({', '.join(str([Path(m.path).name for m in g.members]) for g in result.groups[:8])})")
                continue
            print(f"| candidates | groups | pair precision | recall | F1 | {' | '.join(edits)} | "
                  "candidate pairs (encoder / layout / both) | confirmed (encoder / layout / both) | s / 1,000 images |")
            print("|---" * (8 + len(edits)) + "|")
            for label, layouts in (("encoder's neighbours (before)", False), ("+ colour layouts", True)):
                started = time.monotonic()
                result = find_duplicates(loaded, layouts=layouts)
                seconds = time.monotonic() - started
                precision, recall, by_edit = score(paths_of(result), truth)
                print(f"| {label} | {len(result.groups)} | {precision:.3f} | {recall:.3f} | "
                      f"{f_score(precision, recall):.3f} | "
                      + " | ".join(f"{round(by_edit.get(edit, 0) * args.per_edit)}/{args.per_edit}" for edit in edits)
                      + f" | {' / '.join(str(n) for n in result.candidates.values())}"
                      + f" | {' / '.join(str(n) for n in result.confirmed.values())}"
                      + f" | {1000 * seconds / loaded.count:.1f} |", flush=True)

    for folder in args.real:
        with tempfile.TemporaryDirectory() as scratch:
            update_index(folder, encoder, identity, Path(scratch) / "index", report=lambda _m: None,
                         show_progress=False)
            loaded = load_index(Path(scratch) / "index", for_search=False)
            for label, layouts in (("encoder's neighbours (before)", False), ("+ colour layouts", True)):
                result = find_duplicates(loaded, layouts=layouts)
                print(f"\n{folder} ({loaded.count} images), {label}: {len(result.groups)} groups; candidate pairs "
                      f"{result.candidates}, confirmed {result.confirmed}")
                for group in result.groups:
                    print(f"  {[Path(m.path).name for m in group.members]}  {'; '.join(group.evidence)}")


if __name__ == "__main__":
    main()
