"""Index build time, queries/s and recall@10 against exact search, for Flat, HNSW and IVF-PQ.

    python bench/bench_index.py [--sizes 100000 1000000] [--dims 512 2048]
    python bench/bench_index.py --tuned [--recall 0.95] [--clustered 1000000]
    python bench/bench_index.py --exact 1000000
    python bench/bench_index.py --build 10000000 [--work-dir /tmp/bench-index]
    python bench/bench_index.py --catalog 1000000 [--work-dir /tmp/bench-index]
    python bench/bench_index.py --update 1000000 [--work-dir /tmp/bench-index]

Speed on random unit vectors (their recall is a pessimistic floor: random high-dimensional
points have no neighbourhood structure); recall also on real embeddings: Fashion-MNIST's first 20,000
training images as the bank and 1,000 test images as queries, embedded by a ResNet-18 encoder.

``--tuned``: each approximate index tuned for a recall target as ``simsiam-embed index`` tunes it
(index/tuning.py, on held-back vectors of the bank), then measured on the separate queries against
exact search: on the real embeddings and on clustered unit vectors ("real-like": neighbourhoods,
unlike random ones) of ``--clustered`` rows.

``--exact N``: 100 exact queries on N x 512 clustered vectors, FAISS's Flat index against
index/exact.py (a bf16 scan proven exact, with its bf16 copy kept, and converting as it goes);
the answers compared.

``--build N``: N x 512 clustered vectors written to a vectors.npy in ``--work-dir`` (2 KB a
vector on disk), then, in a child process whose peak resident memory is read when it ends, the
index ``simsiam-embed index`` would choose for N, built from that file, tuned for ``--recall``
and measured on separate queries as above.

``--catalog N``: a catalog.sqlite of N rows (paths as long as a photo library's), then, each in a
child process whose peak resident memory is read when it ends, what opening an index for a
search costs in catalog reads: every row read into a dict (what opening an index did before the
catalog was read on demand) and then one query's 10 hits, against the 10 hits alone.

``--update N``: N empty image files in ``--work-dir`` and a previous catalog of them (1% changed
since), then, each in a child process as above, what an index update does before embedding:
the folder compared with the previous catalog as store.py did before index/changes.py (a stat
dict, a dict of the previous entries by path, the unchanged entries listed) against
index/changes.py (a scan table and a join in SQLite), and the new catalog written from it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from common import machine, write_fashion_mnist_folder
from simsiam_embed.index.store import build_faiss_index, choose_index_type

QUERIES = 1000
EXACT_QUERIES = 100
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


def clustered_blocks(count: int, dim: int, seed: int, clusters: int = 4096):
    """Unit vectors in noisy clusters (centres from seed 0, members from ``seed``), 100,000 rows
    at a time: ten million rows never sit in memory at once."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, count, 100_000):
        rows = min(count, start + 100_000) - start
        block = centres[rng.integers(0, clusters, rows)] + 0.8 * rng.standard_normal((rows, dim), dtype=np.float32)
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def clustered_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.empty((count, dim), dtype=np.float32)
    for start, block in zip(range(0, count, 100_000), clustered_blocks(count, dim, seed)):
        vectors[start:start + len(block)] = block
    return vectors


def exact_main(args: argparse.Namespace) -> None:
    from simsiam_embed.index.exact import ExactSearch, exact_neighbours

    bank = clustered_vectors(args.exact, 512, seed=1)
    queries = clustered_vectors(EXACT_QUERIES, 512, seed=2)
    print(f"machine: {machine()}; FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
          f"{EXACT_QUERIES} queries, k={K}, on clustered {args.exact:,} x 512")
    flat = faiss.IndexFlatIP(512)
    flat.add(bank)
    rows = []
    started = time.monotonic()
    truth_scores, truth = flat.search(queries, K)
    rows.append(("FAISS Flat (float32)", time.monotonic() - started, 0.0, 1.0, 0.0))
    started = time.monotonic()
    search = ExactSearch(bank)
    prepared = time.monotonic() - started
    for label, run, setup in [(f"ExactSearch, {search.precision} copy kept", lambda: search.search(queries, K), prepared),
                              ("exact_neighbours, converting as it reads", lambda: exact_neighbours(queries, bank, K), 0.0)]:
        started = time.monotonic()
        scores, found = run()
        rows.append((label, time.monotonic() - started, setup, float((found == truth).mean()),
                     float(np.abs(scores - truth_scores).max())))
    print("\n| exact search | 100 queries (s) | one-off set-up (s) | same ids as Flat | largest score difference |")
    print("| --- | --- | --- | --- | --- |")
    for label, seconds, setup, same, difference in rows:
        print(f"| {label} | {seconds:.2f} | {setup:.2f} | {same:.3f} | {difference:.1e} |")


def build_main(args: argparse.Namespace) -> None:
    from simsiam_embed.index.vector_file import VectorFile, VectorWriter

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    started = time.monotonic()
    try:   # the same seed writes the same vectors: a file of the right shape is reused
        reuse = VectorFile(work / "vectors.npy").shape == (args.build, 512)
    except (OSError, ValueError):
        reuse = False
    if not reuse:
        with VectorWriter(work / "vectors.npy", args.build, 512) as writer:
            for block in clustered_blocks(args.build, 512, seed=1):
                writer.write(block)
    print(f"{'reused' if reuse else 'wrote'} {args.build:,} x 512 clustered vectors "
          f"({args.build * 2048 / 2 ** 30:.1f} GiB) in {time.monotonic() - started:.0f} s", flush=True)
    child = subprocess.run([sys.executable, __file__, "--build-child", str(work), "--recall", str(args.recall)],
                           capture_output=True, text=True)
    sys.stderr.write(child.stderr[-4000:])
    if child.returncode != 0:
        raise SystemExit(f"the build failed (exit {child.returncode})")
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("\n| vectors | index | train + add (s) | tune (s) | tuned to | recall@10, queries | queries/s | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| clustered {args.build:,} x 512, from a file | {figures['factory']} | {figures['build_s']:.0f} | "
          f"{figures['tune_s']:.0f} | {figures['tuned']} | {figures['recall']:.3f} | {figures['qps']:.0f} | "
          f"{peak / 2 ** 30:.2f} GiB |")


def build_child(work: Path, target: float) -> None:
    """The build as `simsiam-embed index` runs it, from the vectors file; one JSON line of figures."""
    from simsiam_embed.index.exact import exact_neighbours
    from simsiam_embed.index.tuning import tune_for_recall
    from simsiam_embed.index.vector_file import VectorFile

    vectors = VectorFile(work / "vectors.npy")
    ids = np.arange(len(vectors), dtype=np.int64)
    factory = choose_index_type(len(vectors), 512, None).factory
    started = time.monotonic()
    index = build_faiss_index(vectors, ids, factory)
    build_s = time.monotonic() - started
    print(f"built {factory} in {build_s:.0f} s", file=sys.stderr, flush=True)
    started = time.monotonic()
    tuning = tune_for_recall(index, vectors, ids, target)
    tune_s = time.monotonic() - started
    print(f"tuned in {tune_s:.0f} s: {tuning.describe()}", file=sys.stderr, flush=True)
    faiss.write_index(getattr(index, "base", index), str(work / "faiss.index"))
    queries = clustered_vectors(QUERIES, 512, seed=2)
    truth = exact_neighbours(queries, vectors, K)[1]
    started = time.monotonic()
    _, found = index.search(queries, K)
    qps = len(queries) / (time.monotonic() - started)
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
    knobs = ", ".join(f"{name} {value}" for name, value in tuning.parameters.items())
    print(json.dumps({"factory": factory, "build_s": build_s, "tune_s": tune_s, "tuned": knobs,
                      "recall": recall, "qps": qps}))


def run_tuned_case(label: str, bank: np.ndarray, queries: np.ndarray, factories: list[str], target: float) -> list[tuple]:
    from simsiam_embed.index.tuning import tune_for_recall

    ids = np.arange(len(bank), dtype=np.int64)
    rows = []
    exact = build_faiss_index(bank, ids, "Flat")
    started = time.monotonic()
    _, truth = exact.search(queries, K)
    flat_qps = len(queries) / (time.monotonic() - started)
    rows.append((label, "Flat", "-", 0.0, 1.0, 1.0, flat_qps, 1.0))
    print(f"{label} Flat: {flat_qps:.0f} queries/s", flush=True)
    del exact
    for factory in factories:
        started = time.monotonic()
        index = build_faiss_index(bank, ids, factory)
        build = time.monotonic() - started
        tuning = tune_for_recall(index, bank, ids, target)
        started = time.monotonic()
        _, found = index.search(queries, K)
        qps = len(queries) / (time.monotonic() - started)
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
        knobs = ", ".join(f"{name} {value}" for name, value in tuning.parameters.items())
        rows.append((label, factory, knobs, build, tuning.recall, recall, qps, qps / flat_qps))
        print(f"{label} {factory}: build {build:.0f} s, tuned {knobs} (held-back recall {tuning.recall:.3f}), "
              f"queries: recall@10 {recall:.3f}, {qps:.0f} queries/s = {qps / flat_qps:.1f}x Flat", flush=True)
        del index
    return rows


def tuned_main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}; FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
          f"{QUERIES} queries, k={K}; every approximate index tuned for recall@10 {args.recall}")
    rows = []
    if not args.no_real:
        bank, queries = real_embeddings()
        rows += run_tuned_case(f"real: Fashion-MNIST {len(bank):,} x {bank.shape[1]}", bank, queries,
                               ["HNSW32", choose_index_type(len(bank), bank.shape[1], "ivfpq").factory], args.recall)
    if args.clustered:
        bank = clustered_vectors(args.clustered, 512, seed=1)
        queries = clustered_vectors(QUERIES, 512, seed=2)
        factories = [choose_index_type(len(bank), 512, "ivfpq").factory]
        if args.clustered <= args.approximate_max:
            factories.insert(0, "HNSW32")
        rows += run_tuned_case(f"clustered {args.clustered:,} x 512", bank, queries, factories, args.recall)
    print("\n| vectors | index | tuned to | build (s) | recall@10, held-back | recall@10, queries | queries/s | vs Flat |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, factory, knobs, build, held_back, recall, qps, ratio in rows:
        print(f"| {label} | {factory} | {knobs} | {build:.0f} | {held_back:.3f} | {recall:.3f} | {qps:.0f} | {ratio:.1f}x |")


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


CATALOG_HITS = 10


def _in_child(flag: str, mode: str, work: Path) -> dict:
    """The figures a fresh process of this script prints for ``flag mode`` (its peak RSS its own)."""
    child = subprocess.run([sys.executable, __file__, flag, mode, "--work-dir", str(work)],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def catalog_main(args: argparse.Namespace) -> None:
    from simsiam_embed.index.catalog import Catalog, CatalogEntry, write_catalog

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "catalog.sqlite"
    if not path.exists() or len(Catalog(path)) != args.catalog:
        path.unlink(missing_ok=True)
        started = time.monotonic()
        write_catalog(path, (CatalogEntry(i, f"/data/photos/{i % 997:03d}/holiday-{i:09d}.jpg", 2_000_000 + i,
                                          1_700_000_000_000_000_000 + i, f"album-{i % 997:03d}", f"{i:064x}")
                             for i in range(args.catalog)))
        print(f"wrote {args.catalog:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in {time.monotonic() - started:.0f} s")
    print(f"machine: {machine()}; opening a catalog of {args.catalog:,} rows and reading one query's {CATALOG_HITS} hits")
    print("| catalog read | seconds | peak RSS of the process |\n| --- | --- | --- |")
    for mode in ("whole", "on-demand"):
        figures = _in_child("--catalog-child", mode, work)
        label = "every row into a dict, then the hits (before)" if mode == "whole" else "the hits' rows only (now)"
        print(f"| {label} | {figures['seconds']:.3f} | {figures['peak_rss_mib']:.0f} MiB |")


def catalog_child(mode: str, work: Path) -> None:
    from simsiam_embed.index.catalog import Catalog

    started = time.monotonic()
    catalog = Catalog(work / "catalog.sqlite")
    low, high = catalog.id_range()   # the ids are 0..N-1
    hits = np.random.default_rng(0).choice(high - low + 1, CATALOG_HITS, replace=False).tolist()
    if mode == "whole":
        entries = {entry.id: entry for entry in catalog.values()}
        found = [entries[image_id] for image_id in hits]
    else:
        found = catalog.many(hits)
    assert [entry.id for entry in found] == hits
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def update_main(args: argparse.Namespace) -> None:
    from simsiam_embed.index.catalog import Catalog, CatalogEntry, write_catalog

    work = Path(args.work_dir)
    folder, previous = work / "images", work / "previous.sqlite"
    if not previous.exists() or len(Catalog(previous)) != args.update:
        started = time.monotonic()
        paths = [folder / f"{i % 1000:03d}" / f"photo-{i:09d}.png" for i in range(args.update)]
        for number in range(1000):
            (folder / f"{number:03d}").mkdir(parents=True, exist_ok=True)
        for path in paths:
            path.touch()
        previous.unlink(missing_ok=True)
        # 1% recorded with another size: changed since the previous update.
        write_catalog(previous, (CatalogEntry(i, str(path), 0 if i % 100 else 1, path.stat().st_mtime_ns, path.parent.name,
                                              f"{i:064x}") for i, path in enumerate(paths)))
        print(f"made {args.update:,} files and their catalog in {time.monotonic() - started:.0f} s")
    print(f"machine: {machine()}; an update's comparison of {args.update:,} files with the previous catalog, "
          "and the new catalog written")
    print("| comparison | seconds | peak RSS of the process |\n| --- | --- | --- |")
    for mode in ("dicts", "sqlite"):
        figures = _in_child("--update-child", mode, work)
        label = ("dicts of stats and previous entries (before)" if mode == "dicts"
                 else "a scan table and a join in SQLite (now)")
        print(f"| {label} | {figures['seconds']:.1f} | {figures['peak_rss_mib']:.0f} MiB |")


def update_child(mode: str, work: Path) -> None:
    from simsiam_embed.image_files import discover_images
    from simsiam_embed.index.catalog import Catalog, write_catalog
    from simsiam_embed.index.changes import folder_changes

    started = time.monotonic()
    paths = discover_images(work / "images")
    previous, new = work / "previous.sqlite", work / f"new-{mode}.sqlite"
    new.unlink(missing_ok=True)
    if mode == "dicts":   # store.update_index before index/changes.py, and its catalog write
        old_by_path = {entry.path: entry for entry in Catalog(previous).values()}
        stats = {str(path): path.stat() for path in paths}
        unchanged = [old_by_path[p] for p, st in stats.items()
                     if p in old_by_path and (old_by_path[p].size, old_by_path[p].mtime_ns) == (st.st_size, st.st_mtime_ns)]
        keep_ids = {entry.id for entry in unchanged}
        to_embed = [Path(p) for p in stats if p not in old_by_path or old_by_path[p].id not in keep_ids]
        write_catalog(new, sorted(unchanged, key=lambda entry: entry.id))
        kept, embed = len(unchanged), len(to_embed)
    else:
        with folder_changes(paths, previous, work / ".changes.sqlite") as changes:
            write_catalog(new, [], kept=changes)
            kept, embed = changes.unchanged, len(changes.to_embed)
    assert kept == len(Catalog(new)) and kept + embed == len(paths)
    print(json.dumps({"seconds": time.monotonic() - started,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--approximate-max", type=int, default=200_000,
                        help="build HNSW and IVF-PQ only up to this many vectors x (dim / 512): their builds "
                             "above it take far longer than a benchmark run on 2 cores")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--real-only", action="store_true")
    parser.add_argument("--tuned", action="store_true", help="tune each approximate index for --recall first")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--clustered", type=int, default=0, help="with --tuned: rows of clustered 512-d vectors")
    parser.add_argument("--exact", type=int, default=0, help="rows: time 100 exact queries on them")
    parser.add_argument("--build", type=int, default=0, help="rows: build the chosen index from a file of them")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "bench-index"))
    parser.add_argument("--catalog", type=int, default=0, help="rows: open a catalog of them for one search")
    parser.add_argument("--build-child", help=argparse.SUPPRESS)
    parser.add_argument("--catalog-child", help=argparse.SUPPRESS)
    parser.add_argument("--update", type=int, default=0, help="files: compare them with a previous catalog")
    parser.add_argument("--update-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work_dir)
    modes = ((args.build_child, lambda: build_child(Path(args.build_child), args.recall)),
             (args.catalog_child, lambda: catalog_child(args.catalog_child, work)),
             (args.update_child, lambda: update_child(args.update_child, work)),
             (args.catalog, lambda: catalog_main(args)), (args.update, lambda: update_main(args)),
             (args.exact, lambda: exact_main(args)), (args.build, lambda: build_main(args)),
             (args.tuned, lambda: tuned_main(args)))
    chosen = next((run_mode for wanted, run_mode in modes if wanted), None)
    if chosen is not None:
        chosen()
        return
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
