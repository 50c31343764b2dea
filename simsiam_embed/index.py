"""FAISS index + SQLite catalog of what is in it: build, update incrementally, search.

An index folder holds generations: ``gen-NNNNNN/`` with ``faiss.index`` (ids, not positions),
``catalog.sqlite`` (id, path, size, mtime, label, content digest), ``vectors.npy`` + ``ids.npy``
(the embeddings, so any index type can be rebuilt without re-embedding) and ``manifest.json``.
``CURRENT`` names the live generation. An update writes a whole new generation and then swaps
``CURRENT`` atomically, so a crash or Ctrl-C at any moment leaves the previous index usable.

Similarity is cosine: vectors are l2-normalised and FAISS ranks by inner product.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from . import __version__
from .data import discover_images, label_of
from .embed import Encoder, embed_paths
from .errors import UserError
from .files import atomic_write, write_json_atomic

#: Exact search stays interactive up to here: ~440 queries/s at 100k x 512 on 2 cores (bench/RESULTS.md).
FLAT_MAX_VECTORS = 200_000
#: HNSW keeps full vectors in memory; past this, IVF-PQ's compressed codes are the practical choice.
HNSW_MAX_VECTORS = 5_000_000
HNSW_EF_SEARCH = 128
MANIFEST_FORMAT = "simsiam-embed.index/1"

Report = Callable[[str], None]


@dataclass
class IndexChoice:
    factory: str
    reason: str


def choose_index_type(count: int, dim: int, requested: str | None) -> IndexChoice:
    """Flat while exact search is fast, HNSW beyond, IVF-PQ for the very large; or the user's pick."""
    named = {"flat": "Flat", "hnsw": "HNSW32", "ivfpq": _ivfpq_factory(count, dim)}
    if requested:
        factory = named.get(requested.lower(), requested)
        return IndexChoice(factory, f"--index-type {requested}")
    if count <= FLAT_MAX_VECTORS:
        return IndexChoice("Flat", f"exact search: {count} vectors (<= {FLAT_MAX_VECTORS:,} stays fast)")
    if count <= HNSW_MAX_VECTORS:
        return IndexChoice("HNSW32", f"HNSW graph: {count:,} vectors is past exact search's comfort")
    return IndexChoice(named["ivfpq"], f"IVF-PQ: {count:,} vectors need compressed codes to fit in memory")


def _ivfpq_factory(count: int, dim: int) -> str:
    # ~4 sqrt(n) lists (FAISS's guideline), each list trained on >= 39 points; 64-byte PQ codes
    # find candidates, which are re-ranked with 8-bit scalar codes (1 byte a dimension): PQ
    # alone ranked too coarsely (recall@10 0.25 on real embeddings, bench/RESULTS.md).
    lists = max(1, min(int(4 * math.sqrt(max(count, 1))), count // 39 if count >= 39 else 1))
    subquantizers = next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim)
    return f"IVF{lists},PQ{subquantizers},Refine(SQ8)"


def build_faiss_index(vectors: np.ndarray, ids: np.ndarray, factory: str) -> faiss.Index:
    """A FAISS index over ``vectors`` (inner product) that answers with ``ids``."""
    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise UserError(f"FAISS cannot build index type {factory!r} ({str(error).splitlines()[0][:200]})") from None
    if not index.is_trained:
        if len(vectors) == 0:
            raise UserError(f"index type {factory} needs vectors to train on, and there are none")
        index.train(vectors)
    if len(vectors):
        index.add_with_ids(vectors, ids)
    _set_search_parameters(index)
    return index


REFINE_K_FACTOR = 4
IVF_NPROBE = 16


def _set_search_parameters(index: faiss.Index) -> None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexRefine):
        inner.k_factor = REFINE_K_FACTOR   # re-rank 4k candidates to return k
        inner = faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = max(1, min(inner.nlist, IVF_NPROBE))


def to_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Move an index to the GPU when this FAISS build has GPU support and a GPU is present."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError:   # index types without a GPU implementation (HNSW) stay on the CPU
        return index


# --------------------------------------------------------------------------------------------
# The catalog


@dataclass(frozen=True)
class CatalogEntry:
    id: int
    path: str
    size: int
    mtime_ns: int
    label: str
    digest: str


def _write_catalog(path: Path, entries: list[CatalogEntry]) -> None:
    connection = sqlite3.connect(path)
    try:
        connection.execute(
            "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER NOT NULL, "
            "mtime_ns INTEGER NOT NULL, label TEXT NOT NULL, digest TEXT NOT NULL)"
        )
        connection.executemany(
            "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
            [(e.id, e.path, e.size, e.mtime_ns, e.label, e.digest) for e in entries],
        )
        connection.commit()
    finally:
        connection.close()


def _read_catalog(path: Path) -> list[CatalogEntry]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT id, path, size, mtime_ns, label, digest FROM images ORDER BY id").fetchall()
    finally:
        connection.close()
    return [CatalogEntry(*row) for row in rows]


def content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# A loaded index


@dataclass
class LoadedIndex:
    folder: Path
    manifest: dict
    index: faiss.Index
    entries: dict[int, CatalogEntry]
    vectors: np.ndarray
    ids: np.ndarray

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and ids of the ``k`` nearest entries for each query (rows of -1 pad)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def current_generation(index_dir: Path) -> Path | None:
    marker = index_dir / "CURRENT"
    if not marker.is_file():
        return None
    generation = index_dir / marker.read_text().strip()
    return generation if generation.is_dir() else None


def load_index(index_dir: Path) -> LoadedIndex:
    """Open the live generation of ``index_dir``, checking that its parts agree with each other."""
    generation = current_generation(index_dir)
    if generation is None:
        raise UserError(f"no index in {index_dir}: build one with `simsiam-embed index`")
    rebuild = "rebuild it with `simsiam-embed index --rebuild`"
    try:
        manifest = json.loads((generation / "manifest.json").read_text())
        index = faiss.read_index(str(generation / "faiss.index"))
        entries = {entry.id: entry for entry in _read_catalog(generation / "catalog.sqlite")}
        # Memory-mapped: searching needs only the FAISS index; updates read the rows they keep.
        vectors = np.load(generation / "vectors.npy", mmap_mode="r")
        ids = np.load(generation / "ids.npy")
    except (OSError, ValueError, RuntimeError, sqlite3.Error) as error:
        raise UserError(f"the index in {index_dir} is damaged ({str(error).splitlines()[0][:160]}): {rebuild}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{index_dir} is not a simsiam-embed index: {rebuild}")
    if not (index.ntotal == len(entries) == len(ids) == len(vectors) == manifest["count"]):
        raise UserError(f"the index in {index_dir} is inconsistent (index {index.ntotal}, catalog {len(entries)}, "
                        f"manifest {manifest['count']}): {rebuild}")
    _set_search_parameters(index)
    return LoadedIndex(index_dir, manifest, to_gpu_if_available(index), entries, vectors, ids)


# --------------------------------------------------------------------------------------------
# Building and updating


@dataclass
class IndexUpdate:
    folder: Path
    count: int
    added: int
    changed: int
    removed: int
    unchanged: int
    factory: str
    reason: str
    rebuilt_because: str | None
    failures: list[tuple[str, str]] = field(default_factory=list)
    images_per_second: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class EncoderIdentity:
    """Which model made the vectors: an index only ever holds vectors of one encoder."""

    kind: str      # "onnx" or "torch"
    path: str
    digest: str
    dim: int


def update_index(
    image_dir: Path,
    encoder: Encoder,
    identity: EncoderIdentity,
    index_dir: Path,
    index_type: str | None = None,
    rebuild: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    report: Report = print,
    show_progress: bool = True,
) -> IndexUpdate:
    """Bring the index in ``index_dir`` up to date with the images under ``image_dir``.

    Only new or changed files (by size and mtime) are embedded; deleted ones are dropped from
    index and catalog alike. Another encoder, another folder, or ``rebuild`` means starting over.
    """
    started = time.monotonic()
    image_dir = image_dir.resolve()
    paths = discover_images(image_dir)
    if not paths:
        raise UserError(f"no images in {image_dir} to index")
    index_dir.mkdir(parents=True, exist_ok=True)

    previous, rebuilt_because = _previous_state(index_dir, identity, image_dir, rebuild)
    old_by_path = {entry.path: entry for entry in previous.entries.values()} if previous else {}
    stats = {str(path): path.stat() for path in paths}
    unchanged = [old_by_path[p] for p, st in stats.items()
                 if p in old_by_path and (old_by_path[p].size, old_by_path[p].mtime_ns) == (st.st_size, st.st_mtime_ns)]
    keep_ids = {entry.id for entry in unchanged}
    to_embed = [Path(p) for p in stats if p not in old_by_path or old_by_path[p].id not in keep_ids]
    changed = sum(1 for path in to_embed if str(path) in old_by_path)
    removed = len(old_by_path) - len(unchanged) - changed

    report(f"{len(paths)} images in {image_dir}: {len(unchanged)} unchanged, {len(to_embed) - changed} new, "
           f"{changed} changed, {removed} deleted")
    result = embed_paths(to_embed, encoder, batch_size, workers, show_progress)
    failures = [(str(to_embed[i]), reason) for i, reason in result.failures]

    next_id = int(previous.ids.max()) + 1 if previous is not None and len(previous.ids) else 0
    new_entries = []
    for offset, position in enumerate(result.indices):
        path = to_embed[int(position)]
        st = stats[str(path)]
        new_entries.append(CatalogEntry(next_id + offset, str(path), st.st_size, st.st_mtime_ns,
                                        label_of(path), content_digest(path)))
    vectors, ids = _merged_vectors(previous, keep_ids, result.vectors, [e.id for e in new_entries], identity.dim)
    entries = sorted(unchanged + new_entries, key=lambda entry: entry.id)
    requested = index_type or (previous.manifest["requested_type"] if previous else None)
    choice = choose_index_type(len(ids), identity.dim, requested)
    index = build_faiss_index(vectors, ids, choice.factory)

    _write_generation(index_dir, index, entries, vectors, ids, {
        "format": MANIFEST_FORMAT,
        "package_version": __version__,
        "image_dir": str(image_dir),
        "encoder": {"kind": identity.kind, "path": identity.path, "digest": identity.digest},
        "dim": identity.dim,
        "metric": "cosine (inner product of l2-normalised vectors)",
        "index_type": choice.factory,
        "requested_type": requested,
        "count": len(ids),
        "skipped": len(failures),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    added = sum(1 for entry in new_entries if entry.path not in old_by_path)
    return IndexUpdate(index_dir, len(ids), added, len(new_entries) - added, removed, len(unchanged),
                       choice.factory, choice.reason, rebuilt_because, failures,
                       result.images_per_second, time.monotonic() - started)


def _previous_state(index_dir: Path, identity: EncoderIdentity, image_dir: Path,
                    rebuild: bool) -> tuple[LoadedIndex | None, str | None]:
    if current_generation(index_dir) is None:
        return None, None
    if rebuild:
        return None, "--rebuild"
    previous = load_index(index_dir)
    if previous.manifest["encoder"]["digest"] != identity.digest:
        return None, "the encoder changed, so every vector must be recomputed"
    if previous.manifest["image_dir"] != str(image_dir):
        return None, f"the index was of another folder ({previous.manifest['image_dir']})"
    return previous, None


def _merged_vectors(previous: LoadedIndex | None, keep_ids: set[int], new_vectors: np.ndarray,
                    new_ids: list[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
    if previous is not None and len(previous.ids):
        keep = np.isin(previous.ids, np.fromiter(keep_ids, dtype=np.int64, count=len(keep_ids)))
        vectors = np.concatenate([previous.vectors[keep], new_vectors])
        ids = np.concatenate([previous.ids[keep], np.asarray(new_ids, dtype=np.int64)])
    else:
        vectors, ids = new_vectors, np.asarray(new_ids, dtype=np.int64)
    return np.ascontiguousarray(vectors.reshape(-1, dim), dtype=np.float32), ids


def _write_generation(index_dir: Path, index: faiss.Index, entries: list[CatalogEntry],
                      vectors: np.ndarray, ids: np.ndarray, manifest: dict) -> None:
    """Write a complete new generation beside the live one, then make it live in one rename."""
    live = current_generation(index_dir)
    number = int(live.name.split("-")[1]) + 1 if live else 1
    name = f"gen-{number:06d}"
    staging = index_dir / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    faiss.write_index(index, str(staging / "faiss.index"))
    _write_catalog(staging / "catalog.sqlite", entries)
    np.save(staging / "vectors.npy", vectors)
    np.save(staging / "ids.npy", ids)
    write_json_atomic(staging / "manifest.json", manifest)
    for part in staging.iterdir():
        with open(part, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(staging, index_dir / name)
    with atomic_write(index_dir / "CURRENT") as handle:
        handle.write(name + "\n")
    _remove_stale_generations(index_dir, keep=name)


def _remove_stale_generations(index_dir: Path, keep: str) -> None:
    # Only after CURRENT names the new generation: until then the old one must stay readable.
    for child in index_dir.iterdir():
        if child.is_dir() and child.name != keep and (child.name.startswith("gen-") or child.name.endswith(".partial")):
            shutil.rmtree(child, ignore_errors=True)
