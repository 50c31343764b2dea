"""Index build time, queries/s and recall@10 against exact search, for Flat, HNSW and IVF-PQ.

    python bench/bench_index.py [--sizes 100000 1000000] [--dims 512 2048]

Speed on random unit vectors (their recall is a pessimistic floor: random high-dimensional
points have no neighbourhood structure); recall also on real embeddings: Fashion-MNIST's first 20,000
training images as the bank and 1,000 test images as queries, embedded by a ResNet-18 encoder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from common import machine, write_fashion_mnist_folder
from simsiam_embed.index.store import build_faiss_index, choose_index_type

QUERIES = 1000
K = 10


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def measure(bank: np.ndarray, queries: np.ndarray, factory: str, truth: np.ndarray) -> tuple[float, float, float]:
    ids = np.arange(len(bank), dtype=np.int64)
    started = time.monotonic()
    index = build_faiss_index(bank, ids, factory)
    build = time.monotonic() - started
    started = time.monotonic()
    _, found = index.search(queries, K)
    qps = len(queries) / (time.monotonic() - started)
    recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)])
    return build, qps, float(recall)


def run_case(label: str, bank: np.ndarray, queries: np.ndarray, skip_approximate: bool) -> list[tuple]:
    dim = bank.shape[1]
    exact = faiss.IndexFlatIP(dim)
    exact.add(bank)
    _, truth = exact.search(queries, K)
    factories = ["Flat", "HNSW32", choose_index_type(len(bank), dim, "ivfpq").factory]
    rows = []
    for factory in factories:
        if skip_approximate and factory != "Flat":
            rows.append((label, factory, None, None, None))
            continue
        build, qps, recall = measure(bank, queries, factory, truth)
        rows.append((label, factory, build, qps, recall))
        print(f"{label} {factory}: build {build:.1f} s, {qps:.0f} queries/s, recall@10 {recall:.3f}", flush=True)
    return rows


def real_embeddings() -> tuple[np.ndarray, np.ndarray]:
    import torch

    from bench_embed import make_checkpoint
    from simsiam_embed.image_files import discover_images
    from simsiam_embed.inference.onnx_encoder import OnnxEncoder
    from simsiam_embed.inference.embed import embed_paths
    from simsiam_embed.inference.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bank_dir = write_fashion_mnist_folder(tmp / "train", "train", 20000)
        query_dir = write_fashion_mnist_folder(tmp / "test", "test", QUERIES)
        checkpoint = make_checkpoint(tmp, "cifar", "resnet18", 28, bank_dir)
        encoder = OnnxEncoder(export_onnx(checkpoint, tmp / "encoder.onnx").path, "cpu")
        del torch
        bank = embed_paths(discover_images(bank_dir), encoder, 256, 2, show_progress=False).vectors
        queries = embed_paths(discover_images(query_dir), encoder, 256, 2, show_progress=False).vectors
    return bank, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--approximate-max", type=int, default=200_000,
                        help="build HNSW and IVF-PQ only up to this many vectors x (dim / 512): their builds "
                             "above it take far longer than a benchmark run on 2 cores")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--real-only", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}; FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
          f"{QUERIES} queries, k={K}")
    rows = []
    if not args.no_real:
        bank, queries = real_embeddings()
        rows += run_case(f"real: Fashion-MNIST {len(bank)} x {bank.shape[1]}", bank, queries, skip_approximate=False)
    for dim in [] if args.real_only else args.dims:
        for size in args.sizes:
            if size * dim * 4 > 6 * 2 ** 30:
                rows.append((f"random {size:,} x {dim}", "all", None, None, None))
                print(f"random {size:,} x {dim}: skipped ({size * dim * 4 / 2 ** 30:.0f} GiB of vectors)")
                continue
            bank = unit_vectors(size, dim, seed=0)
            queries = unit_vectors(QUERIES, dim, seed=1)
            rows += run_case(f"random {size:,} x {dim}", bank, queries,
                             skip_approximate=size * dim / 512 > args.approximate_max)
            del bank
    print("\n| vectors | index | build (s) | queries/s | recall@10 vs exact |")
    print("| --- | --- | --- | --- | --- |")
    for label, factory, build, qps, recall in rows:
        if build is None:
            print(f"| {label} | {factory} | not run (see below) | | |")
        else:
            print(f"| {label} | {factory} | {build:.1f} | {qps:.0f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
