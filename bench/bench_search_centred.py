"""Search ranks by centred cosine, re-ranking FAISS's raw-cosine candidates (index/search.py):
how often is that the exact centred top k? One index, every query from it, side by side.

    python bench/bench_search_centred.py --images FOLDER --model runs/x/encoder.onnx [--queries 1000]

Each query is an indexed image; its exact centred top k comes from all vectors; `nearest_hits`
gives k from FAISS's k + max(3k, 64) candidates (--extra varies the 64). Recall@k is the share of the exact top k that
search returns; the raw top k is shown too (how far apart the two rankings are).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from simsiam_embed.artefacts import file_digest  # noqa: E402
from simsiam_embed.explore.analyses import CentredVectors  # noqa: E402
from simsiam_embed.index import search  # noqa: E402
from simsiam_embed.index.store import EncoderIdentity, load_index, update_index  # noqa: E402
from simsiam_embed.inference.onnx_encoder import OnnxEncoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, nargs="*", default=[1, 10, 50])
    parser.add_argument("--extra", type=int, nargs="*", default=[search.RERANK_EXTRA],
                        help="RERANK_EXTRA values to compare (candidates: k + max(3k, EXTRA))")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    encoder = OnnxEncoder(args.model)
    identity = EncoderIdentity("onnx", str(args.model), file_digest(args.model), encoder.dim)
    with tempfile.TemporaryDirectory() as scratch:
        update_index(args.images, encoder, identity, Path(scratch) / "index", report=lambda _m: None,
                     show_progress=False)
        loaded = load_index(Path(scratch) / "index")
        rows = np.random.default_rng(0).choice(loaded.count, min(args.queries, loaded.count), replace=False)
        queries = np.asarray(loaded.vectors[np.sort(rows)], dtype=np.float32)
        centred = CentredVectors(loaded.vectors, loaded.mean_vector())
        every = centred.rows(0, loaded.count)
        exact_scores = centred.take(np.sort(rows)) @ every.T
        raw_scores = queries @ np.asarray(loaded.vectors[0:loaded.count]).T
        print(f"\n{loaded.count:,} images from {args.images}, {len(rows)} queries, {loaded.manifest.index_type}\n")
        print("| k | candidates | recall@k of search (re-ranked) vs exact centred | recall@k of the raw top k vs exact centred | ms a query |")
        print("|---|---|---|---|---|")
        for k, extra in [(k, extra) for k in args.k for extra in args.extra]:
            search.RERANK_EXTRA = extra
            started = time.monotonic()
            found = search.nearest_hits(loaded, queries, k)
            seconds = time.monotonic() - started
            exact = np.argsort(-exact_scores, axis=1, kind="stable")[:, :k]
            raw = np.argsort(-raw_scores, axis=1, kind="stable")[:, :k]
            exact_ids = [set(loaded.ids[row].tolist()) for row in exact]
            ours = np.mean([len({h.id for h in hits} & want) / k for hits, want in zip(found, exact_ids)])
            raw_recall = np.mean([len(set(loaded.ids[r].tolist()) & want) / k for r, want in zip(raw, exact_ids)])
            print(f"| {k} | {k + max(search.RERANK_FACTOR * k, extra)} | {ours:.4f} | {raw_recall:.4f} | {1000 * seconds / len(rows):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
