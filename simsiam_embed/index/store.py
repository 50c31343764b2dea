"""FAISS index + SQLite catalog of what is in it: build, update incrementally, search.

An index folder holds generations: ``gen-NNNNNN/`` with ``faiss.index`` (ids, not positions),
``catalog.sqlite`` (id, path, size, mtime, label, content digest), ``vectors.npy`` + ``ids.npy``
(the embeddings, so any index type can be rebuilt without re-embedding), the encoder that made
them (``encoder.onnx``, or ``encoder.pt`` for a PyTorch checkpoint) and ``manifest.json``.
``CURRENT`` names the live generation. An update writes a whole new generation and then swaps
``CURRENT`` atomically, so a crash or Ctrl-C at any moment leaves the previous index usable.

Writers hold the folder's lock (``.lock``), so two updates never interleave; readers take none.
The generation before the live one is kept until the next update, so a search that read
``CURRENT`` just before a swap still finds its files; one that lost a longer race re-reads it.

An index folder is self-contained and may be handed to someone else: the encoder it names lies
inside it, and every field of its manifest is checked when read.

Similarity is cosine: vectors are l2-normalised and FAISS ranks by inner product.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import faiss
import numpy as np

from simsiam_embed import __version__
from simsiam_embed.artefacts import EMBEDDING_SHARDS_DIR, ENCODER_FILE, file_digest
from simsiam_embed.image_files import discover_images, label_of
from simsiam_embed.inference.embed import Encoder, embed_paths
from simsiam_embed.inference.shards import embed_in_shards
from simsiam_embed.index.catalog import Catalog, CatalogEntry, write_catalog
from simsiam_embed.index.changes import FolderChanges, folder_changes
from simsiam_embed.index.exact import RerankedIndex
from simsiam_embed.index.tuning import DEFAULT_RECALL, Tuning, set_search_parameters, tune_for_recall, valid_parameters
from simsiam_embed.index.vector_file import VectorFile, VectorWriter
from simsiam_embed.errors import Report, UserError
from simsiam_embed.native_output import stdout_redirected
from simsiam_embed.settings import EMBED_BATCH_SIZE, EMBED_WORKERS
from simsiam_embed.files import atomic_write, ensure_writable_folder, folder_lock, write_json_atomic

#: Exact search stays interactive up to here: ~440 queries/s at 100k x 512 on 2 cores (bench/RESULTS.md).
FLAT_MAX_VECTORS = 200_000
#: HNSW keeps full vectors in memory; past this, IVF-PQ's compressed codes are the practical choice.
HNSW_MAX_VECTORS = 5_000_000
HNSW_EF_SEARCH = 128
MANIFEST_FORMAT = "simsiam-embed.index/2"
GENERATION_NAME = re.compile(r"gen-(\d{6})")
#: The encoder file inside a generation, by kind: the only names a manifest may give.
ENCODER_FILES = {"onnx": ENCODER_FILE, "torch": "encoder.pt"}
#: Below this many vectors a planned index type is test-trained on random vectors before any
#: embedding, so a type that cannot train on so few fails in seconds, not after hours.
TRIAL_TRAINING_MAX = 20_000
#: More coarse lists than this cost more to train and assign on 2 cores than they save in search
#: (k-means over 4 sqrt(n) lists grows with n); lists just grow longer past ~1M vectors.
IVF_MAX_LISTS = 4096
#: An index trains on a sample of at most this many bytes of vectors (FAISS's k-means would
#: subsample to 256 a list anyway): what the build holds beyond the index itself, twice for
#: IVF-PQ (which encodes the sample's residuals). 64 vectors a list at 4,096 lists of 512-d.
TRAINING_BYTES = 512 << 20
#: Vectors are read and added this many rows at a time.
ADD_ROWS = 65_536
#: An IVF index whose lists (codes and ids) would take more memory than this keeps them in a
#: file of the generation (LISTS_FILE, memory-mapped by FAISS: OnDiskInvertedLists), so neither
#: the build nor a search holds them; 64-byte codes pass it at ~30M vectors.
IN_MEMORY_LISTS_BYTES = 2 << 30
LISTS_FILE = "faiss.ivfdata"
#: Where an update compares the folder with the previous catalog (index/changes.py); removed after.
CHANGES_FILE = ".changes.sqlite"
#: A factory string ending in this re-ranks the FAISS index's candidates exactly from the
#: generation's vectors.npy (index/exact.py's RerankedIndex): our suffix, not FAISS's.
RERANK = ",Rerank"
REBUILD = "rebuild it with `simsiam-embed index --rebuild`"


@dataclass
class IndexChoice:
    factory: str
    reason: str


def choose_index_type(count: int, dim: int, requested: str | None) -> IndexChoice:
    """Flat while exact search is fast, HNSW beyond, IVF-PQ for the very large; or the user's pick.

    A type that cannot be trained on ``count`` vectors is refused here, before any embedding;
    the named ``ivfpq`` falls back to exact search instead (it is a size optimisation).
    """
    named = {"flat": "Flat", "hnsw": "HNSW32", "ivfpq": _ivfpq_factory(count, dim)}
    if requested:
        factory = named.get(requested.lower(), requested)
        problem = _training_problem(factory, count, dim)
        if problem is None:
            return IndexChoice(factory, f"--index-type {requested}")
        if requested.lower() == "ivfpq":
            return IndexChoice("Flat", f"exact search: --index-type ivfpq cannot train on {count} vectors ({problem})")
        raise UserError(f"--index-type {requested} cannot be built from {count} images ({problem}): "
                        "use --index-type flat, or index more images")
    if count <= FLAT_MAX_VECTORS:
        return IndexChoice("Flat", f"exact search: {count} vectors (<= {FLAT_MAX_VECTORS:,} stays fast)")
    if count <= HNSW_MAX_VECTORS:
        return IndexChoice("HNSW32", f"HNSW graph: {count:,} vectors is past exact search's comfort")
    return IndexChoice(named["ivfpq"], f"IVF-PQ: {count:,} vectors need compressed codes to fit in memory")


def _ivfpq_factory(count: int, dim: int) -> str:
    # ~4 sqrt(n) lists (FAISS's guideline) up to IVF_MAX_LISTS, each list trained on >= 39
    # points; 64-byte PQ codes find candidates, which are re-ranked exactly from the float32
    # vectors on disk: PQ alone ranked too coarsely (recall@10 0.25 on real embeddings,
    # bench/RESULTS.md), and FAISS's own Refine stage would hold a second copy in memory.
    lists = max(1, min(int(4 * math.sqrt(max(count, 1))), count // 39 if count >= 39 else 1, IVF_MAX_LISTS))
    subquantizers = next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim)
    return f"IVF{lists},PQ{subquantizers}{RERANK}"


def _faiss_factory(factory: str) -> tuple[str, bool]:
    """(the FAISS factory string, whether the index re-ranks from the vectors)."""
    return (factory[:-len(RERANK)], True) if factory.endswith(RERANK) else (factory, False)


def _empty_index(factory: str, dim: int) -> faiss.Index:
    """An empty FAISS index of ``factory`` that takes ids: an IVF index stores them in its lists;
    the others are wrapped in an IDMap2 (whose id table costs ~60 bytes a vector, which at 10M
    vectors an IVF index does not pay)."""
    faiss_factory, _ = _faiss_factory(factory)
    try:
        index = faiss.index_factory(dim, faiss_factory, faiss.METRIC_INNER_PRODUCT)
        if faiss.try_extract_index_ivf(index) is not None:
            return index
        return faiss.index_factory(dim, f"IDMap2,{faiss_factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise UserError(f"FAISS cannot build index type {factory!r} ({_first_line(error)}): use --index-type flat, "
                        "hnsw, ivfpq, or a FAISS factory string such as IVF256,Flat") from None


def _first_line(error: BaseException) -> str:
    """FAISS's message without its C++ frame ("Error in <signature> at <file>:<line>: ")."""
    message = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", message)[:200]


def _training_problem(factory: str, count: int, dim: int) -> str | None:
    """Why ``factory`` cannot be trained on ``count`` vectors (None if it can), found by trying
    on random unit vectors: the only test exact for every factory string FAISS accepts."""
    index = _empty_index(factory, dim)
    if index.is_trained or count > TRIAL_TRAINING_MAX:
        return None
    if count == 0:
        return "it needs vectors to train on"
    trial = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    trial /= np.linalg.norm(trial, axis=1, keepdims=True)
    try:
        index.train(trial)
    except RuntimeError as error:
        return _first_line(error)
    return None


def build_faiss_index(vectors: np.ndarray | VectorFile, ids: np.ndarray, factory: str,
                      lists_file: Path | None = None) -> faiss.Index | RerankedIndex:
    """An index over ``vectors`` (inner product) that answers with ``ids``.

    Trained on a sample of at most TRAINING_BYTES, then filled ADD_ROWS vectors at a time: beyond
    the index itself the build holds one sample and one block, whatever the count (``vectors``
    may be a :class:`VectorFile` of any size). A ``Rerank`` index keeps reading ``vectors``. An
    IVF index's lists go to ``lists_file`` when they would pass IN_MEMORY_LISTS_BYTES.
    """
    dim = vectors.shape[1]
    index = _empty_index(factory, dim)
    if not index.is_trained:
        if len(vectors) == 0:
            raise UserError(f"index type {factory} needs vectors to train on, and there are none")
        sample = np.ascontiguousarray(vectors[_training_rows(index, len(vectors), dim)], dtype=np.float32)
        try:
            index.train(sample)
        except RuntimeError as error:
            raise UserError(f"index type {factory} cannot train on {len(sample)} vectors ({_first_line(error)}): "
                            "use --index-type flat") from None
        del sample
    ivf = faiss.try_extract_index_ivf(index)
    on_disk = (lists_file is not None and ivf is not None
               and len(vectors) * (ivf.code_size + 8) > IN_MEMORY_LISTS_BYTES)
    # FAISS's on-disk lists print a line each time they grow: nowhere near a command's output.
    with stdout_redirected(discard=True) if on_disk else contextlib.nullcontext():
        if on_disk:
            lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_file))
            ivf.replace_invlists(lists, True)
            lists.this.disown()   # the index owns it now
        for start in range(0, len(vectors), ADD_ROWS):
            block = np.ascontiguousarray(vectors[start:start + ADD_ROWS], dtype=np.float32)
            index.add_with_ids(block, np.ascontiguousarray(ids[start:start + len(block)], dtype=np.int64))
    if _faiss_factory(factory)[1]:
        index = RerankedIndex(index, vectors, ids)
    set_search_parameters(index, UNTUNED_SEARCH)
    return index


def _training_rows(index: faiss.Index, count: int, dim: int) -> np.ndarray:
    """Positions of the training sample: every vector while they fit in TRAINING_BYTES (and
    FAISS's k-means would use them all), else a fixed random sample, in file order."""
    most = TRAINING_BYTES // (4 * dim)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        most = min(most, 256 * ivf.nlist)
    if count <= most:
        return np.arange(count)
    return np.sort(np.random.default_rng(0).choice(count, size=most, replace=False))


#: Search settings of an index not tuned for a recall target (one written before tuning
#: existed): re-rank 4k candidates to return k; FAISS's usual efSearch and nprobe.
UNTUNED_SEARCH = {"k_factor": 4, "efSearch": HNSW_EF_SEARCH, "nprobe": 16}


#: FAISS's GPU k-selection handles at most this many neighbours; more are searched on the CPU.
GPU_MAX_K = 2048


def to_gpu_if_available(index: faiss.Index, report: Report | None = None) -> faiss.Index:
    """A GPU copy of ``index`` when this FAISS build has GPU support and a GPU is present.

    Index types without a GPU implementation (HNSW, and IVF-PQ with its re-ranking stage)
    stay on the CPU, and ``report`` is told so once.
    """
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return index
    if isinstance(index, RerankedIndex):   # re-ranking reads the vectors file: it stays with the CPU
        if report is not None:
            report("note: an index that re-ranks from its vectors is searched on the CPU")
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except RuntimeError:
        if report is not None:
            report("note: this index type has no FAISS GPU implementation; searching it on the CPU")
        return index


# --------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class IndexManifest:
    """``manifest.json``: what a generation holds and which encoder made it; validated when read."""

    image_dir: str
    encoder_kind: str          # "onnx" or "torch"
    encoder_file: str          # inside the generation: one of ENCODER_FILES' names
    encoder_digest: str        # SHA-256 of that file
    encoder_source: str        # where it was copied from (information only, never opened)
    dim: int
    index_type: str
    requested_type: str | None
    count: int
    skipped: int
    updated: str
    package_version: str = __version__
    format: str = MANIFEST_FORMAT
    metric: str = "cosine (inner product of l2-normalised vectors)"
    # The search knob set for the recall target (index/tuning.py), and the recall@10 measured
    # at it; absent from manifests written before tuning (UNTUNED_SEARCH applies).
    search_parameters: dict[str, int] = field(default_factory=dict)
    recall_target: float | None = None
    recall_at_10: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, path: Path) -> "IndexManifest":
        if not isinstance(raw, dict):
            raise UserError(f"{path} is damaged (not a JSON object): {REBUILD}")
        if raw.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{path} is not a manifest this version reads (format {raw.get('format')!r}): {REBUILD}")
        types = {"image_dir": str, "encoder_kind": str, "encoder_file": str, "encoder_digest": str,
                 "encoder_source": str, "dim": int, "index_type": str, "requested_type": (str, type(None)),
                 "count": int, "skipped": int, "updated": str, "package_version": str, "metric": str}
        for name, kind in types.items():
            value = raw.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UserError(f"{path} is damaged: its field {name!r} is {value!r}: {REBUILD}")
        if ENCODER_FILES.get(raw["encoder_kind"]) != raw["encoder_file"]:
            # The one guarantee that lets a received index be searched: its encoder is a file
            # inside the generation, never a path that could point anywhere else.
            raise UserError(f"{path} is damaged: its encoder {raw['encoder_file']!r} ({raw['encoder_kind']!r}) is not "
                            f"one of {', '.join(ENCODER_FILES.values())} inside the index: {REBUILD}")
        if not re.fullmatch(r"[0-9a-f]{64}", raw["encoder_digest"]):
            raise UserError(f"{path} is damaged: its field 'encoder_digest' is not a SHA-256: {REBUILD}")
        if raw["dim"] < 1 or raw["count"] < 0 or raw["skipped"] < 0:
            raise UserError(f"{path} is damaged: 'dim', 'count' or 'skipped' is out of range: {REBUILD}")
        parameters = raw.get("search_parameters", {})
        if not valid_parameters(parameters):
            raise UserError(f"{path} is damaged: its field 'search_parameters' is {parameters!r}: {REBUILD}")
        recall = {name: raw.get(name) for name in ("recall_target", "recall_at_10")}
        for name, value in recall.items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not 0.0 <= value <= 1.0):
                raise UserError(f"{path} is damaged: its field {name!r} is {value!r}: {REBUILD}")
        return cls(**{name: raw[name] for name in types}, format=MANIFEST_FORMAT, search_parameters=parameters,
                   **{name: None if value is None else float(value) for name, value in recall.items()})


# --------------------------------------------------------------------------------------------
# A loaded index


@dataclass
class LoadedIndex:
    folder: Path
    generation: Path
    manifest: IndexManifest
    index: faiss.Index | RerankedIndex   # the CPU index as read
    entries: Catalog                     # id -> CatalogEntry, read on demand
    vectors: VectorFile                  # row i is the vector of ids[i]
    ids: np.ndarray
    searcher: faiss.Index | None = None   # a GPU copy, when one was made for searching
    _mean: np.ndarray | None = field(default=None, init=False, repr=False)
    _id_order: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def mean_vector(self) -> np.ndarray:
        """The mean of the index's vectors: every similarity shown to a user is a cosine of
        vectors centred on it (explore/neighbours.py says why). Computed once per loaded index."""
        if self._mean is None:
            self._mean = vectors_mean(self.vectors)
        return self._mean

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of these ids (each must be in the index), in their order."""
        if self._id_order is None:
            self._id_order = np.argsort(self.ids, kind="stable")
        positions = self._id_order[np.searchsorted(self.ids, np.asarray(ids, dtype=np.int64), sorter=self._id_order)]
        return np.asarray(self.vectors[positions], dtype=np.float32)

    @property
    def encoder_path(self) -> Path:
        return self.generation / self.manifest.encoder_file

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and ids of the ``k`` nearest entries for each query (rows of -1 pad)."""
        on_gpu = self.searcher is not None and k <= GPU_MAX_K
        return (self.searcher if on_gpu else self.index).search(np.ascontiguousarray(queries, dtype=np.float32), k)


#: Rows summed at once for the mean: bounds the memory beyond the memory-mapped vectors.
MEAN_CHUNK = 16_384


def vectors_mean(vectors: np.ndarray | VectorFile) -> np.ndarray:
    """The mean row (float32), summed in float64 chunk by chunk."""
    total = np.zeros(vectors.shape[1], dtype=np.float64)
    for start in range(0, len(vectors), MEAN_CHUNK):
        total += np.asarray(vectors[start:start + MEAN_CHUNK], dtype=np.float64).sum(axis=0)
    return (total / max(1, len(vectors))).astype(np.float32)


def centred(rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``rows`` minus ``mean``, each brought back to unit length (a row equal to it stays zero)."""
    rows = np.atleast_2d(rows).astype(np.float32) - mean
    return np.ascontiguousarray(rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12))


def centred_cosines(query: np.ndarray, rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Cosines of ``rows`` to ``query``, all centred on ``mean`` (a row equal to it scores 0)."""
    return np.clip(centred(rows, mean) @ centred(query, mean)[0], -1.0, 1.0)


def current_generation(index_dir: Path) -> Path | None:
    """The live generation's folder; None when there is no index; an error when CURRENT is damaged."""
    marker = index_dir / "CURRENT"
    if marker.is_symlink():
        # Read through, it would print whatever file it points at: never followed, never quoted.
        raise UserError(f"{marker} is a symbolic link, not a generation marker: {REBUILD}")
    if not marker.is_file():
        return None
    try:
        name = marker.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{marker} is unreadable ({error.__class__.__name__}): {REBUILD}") from None
    if not GENERATION_NAME.fullmatch(name):
        raise UserError(f"{marker} is damaged (it does not name a generation gen-NNNNNN): {REBUILD}")
    generation = index_dir / name
    if generation.is_symlink():
        raise UserError(f"{generation} is a symbolic link: a generation lies inside its index folder; {REBUILD}")
    return generation


def live_encoder_digest(index_dir: Path) -> str | None:
    """The digest of the encoder the live generation was embedded with; None without a readable index."""
    try:
        generation = current_generation(index_dir)
        if generation is None:
            return None
        path = generation / "manifest.json"
        return IndexManifest.from_dict(json.loads(path.read_text()), path).encoder_digest
    except (UserError, OSError, ValueError):
        return None


class _GenerationUnreadable(Exception):
    pass


def load_index(index_dir: Path, for_search: bool = True, report: Report | None = None) -> LoadedIndex:
    """Open the live generation of ``index_dir``, checking that its parts agree with each other.

    ``for_search``: also make a GPU copy to search with, where FAISS and a GPU allow (an update,
    which only reads the vectors, does not need one).

    A generation can vanish between reading ``CURRENT`` and opening its files when updates
    race this reader; then ``CURRENT`` has moved on, and the new generation is opened instead.
    """
    for _attempt in range(5):
        generation = current_generation(index_dir)
        if generation is None:
            raise UserError(f"no index in {index_dir}: build one with `simsiam-embed index`")
        try:
            loaded = _open_generation(index_dir, generation)
        except _GenerationUnreadable as error:
            if current_generation(index_dir) == generation:
                raise UserError(f"the index in {index_dir} is damaged ({error}): {REBUILD}") from None
            continue
        if for_search:
            gpu = to_gpu_if_available(loaded.index, report)
            loaded.searcher = gpu if gpu is not loaded.index else None
        return loaded
    raise UserError(f"the index in {index_dir} changed five times while it was being opened: try again")


def _open_generation(index_dir: Path, generation: Path) -> LoadedIndex:
    _refuse_links_in(generation)
    try:
        manifest_path = generation / "manifest.json"
        manifest = IndexManifest.from_dict(json.loads(manifest_path.read_text()), manifest_path)
        index = _read_faiss_index(generation)
        entries = Catalog(generation / "catalog.sqlite")
        # Read on demand: searching needs only the FAISS index (and a re-ranking index the rows
        # of its candidates); updates read the rows they keep.
        vectors = VectorFile(generation / "vectors.npy")
        ids = np.load(generation / "ids.npy")
    except (OSError, ValueError, RuntimeError, sqlite3.Error) as error:
        raise _GenerationUnreadable(_first_line(error)[:160]) from None
    if not (index.ntotal == len(ids) == len(vectors) == manifest.count):
        raise UserError(f"the index in {index_dir} is inconsistent (index {index.ntotal}, ids {len(ids)}, "
                        f"vectors {len(vectors)}, manifest {manifest.count}): {REBUILD}")
    if ids.dtype != np.int64 or ids.ndim != 1:
        raise UserError(f"the index in {index_dir} is inconsistent (ids.npy holds {ids.dtype} values, not int64 "
                        f"ids): {REBUILD}")
    if index.d != manifest.dim or vectors.ndim != 2 or vectors.shape[1] != manifest.dim:
        raise UserError(f"the index in {index_dir} is inconsistent (its vectors are not {manifest.dim}-d): {REBUILD}")
    if manifest.count == 0:
        raise UserError(f"the index in {index_dir} is empty: {REBUILD}")
    # Every id once, and the catalog's range: searches and analyses name files by these ids. (An
    # id missing from the middle of the catalog is refused when it is looked up, as damage too:
    # checking every id here would read the whole catalog for each search.)
    if len(np.unique(ids)) != len(ids) or (int(ids.min()), int(ids.max())) != entries.id_range():
        raise UserError(f"the index in {index_dir} is inconsistent (its ids do not match its catalog): {REBUILD}")
    if not _ids_agree_with_faiss(index, ids, vectors):
        raise UserError(f"the index in {index_dir} is inconsistent (ids.npy does not match the FAISS index's ids): "
                        f"{REBUILD}")
    if _faiss_factory(manifest.index_type)[1]:
        index = RerankedIndex(index, vectors, ids)
    set_search_parameters(index, {**UNTUNED_SEARCH, **manifest.search_parameters})
    return LoadedIndex(index_dir, generation, manifest, index, entries, vectors, ids)


def _refuse_links_in(generation: Path) -> None:
    """Every file of a generation lies inside it: a link (to a FAISS file, vectors or a catalog
    elsewhere) is never followed, as CURRENT and the generation folder are not."""
    try:
        links = sorted(entry.name for entry in os.scandir(generation) if entry.is_symlink())
    except OSError:
        return   # gone or unreadable: opening its files says which
    if links:
        raise UserError(f"{generation / links[0]} is a symbolic link: every file of an index generation lies "
                        f"inside it; {REBUILD}")


def _read_faiss_index(generation: Path) -> faiss.Index:
    """The generation's FAISS index, with its lists file (if any) the one in this folder (FAISS
    would otherwise open the path written at build time: another folder's, or any file a
    received index names). FAISS announces that change, and some failures, on stdout, which is
    no place for them; its error messages quote the file's bytes, which are not repeated."""
    try:
        with stdout_redirected(discard=True):
            return faiss.read_index(str(generation / "faiss.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError:
        raise _GenerationUnreadable("faiss.index is not an index FAISS can read") from None


#: Rows of an IVF index checked against its lists when it is opened.
IVF_ID_SAMPLES = 64


def _ids_agree_with_faiss(index: faiss.Index, ids: np.ndarray, vectors: VectorFile) -> bool:
    """Whether row i of vectors.npy has the id FAISS holds for it: ids.npy names the results of
    re-ranking and of every analysis, so ids in another order (each still in the catalog) would
    pair files with other files' vectors. An IDMap keeps its ids in the order they were added:
    compared whole. An IVF index keeps each id in the list of its vector's nearest centroid:
    sampled rows must be found there (a wrong id turns up in that list by chance only).
    """
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return np.array_equal(faiss.vector_to_array(index.id_map), ids)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return True   # no id of its own to compare (not a layout this package writes)
    rows = np.unique(np.linspace(0, len(ids) - 1, min(IVF_ID_SAMPLES, len(ids))).astype(np.int64))
    # The two nearest lists: a vector almost equidistant from two centroids may have gone to
    # either when it was added (a wrong id still has to be in one of two lists by chance, for
    # every sampled row).
    _, nearest = ivf.quantizer.search(np.ascontiguousarray(vectors[rows]), min(2, ivf.nlist))
    inverted = ivf.invlists

    def held_in(list_number: int) -> np.ndarray:
        size = inverted.list_size(list_number) if list_number >= 0 else 0
        return faiss.rev_swig_ptr(inverted.get_ids(list_number), size) if size else np.empty(0, np.int64)

    return all(any(ids[row] in held_in(int(number)) for number in lists) for row, lists in zip(rows, nearest))


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
    tuning: Tuning | None = None   # None when nothing changed (the live generation stands)


@dataclass(frozen=True)
class EncoderIdentity:
    """Which model made the vectors: an index only ever holds vectors of one encoder."""

    kind: str      # "onnx" or "torch"
    path: str      # the file it is copied from into each generation
    digest: str
    dim: int


def update_index(
    image_dir: Path,
    encoder: Encoder,
    identity: EncoderIdentity,
    index_dir: Path,
    index_type: str | None = None,
    rebuild: bool = False,
    batch_size: int = EMBED_BATCH_SIZE,
    workers: int = EMBED_WORKERS,
    report: Report = print,
    show_progress: bool = True,
    recall: float | None = None,
) -> IndexUpdate:
    """Bring the index in ``index_dir`` up to date with the images under ``image_dir``.

    Only new or changed files (by size and mtime) are embedded; deleted ones are dropped from
    index and catalog alike. Another encoder, another folder, or ``rebuild`` means starting over.
    An approximate index is tuned for recall@10 ``recall`` (the previous update's target, else
    DEFAULT_RECALL) on its own vectors (index/tuning.py). Holds the folder's writer lock
    throughout: a second update waits for this one.
    """
    started = time.monotonic()
    image_dir = image_dir.resolve()
    paths = discover_images(image_dir)
    if not paths:
        raise UserError(f"no images in {image_dir} to index")
    ensure_writable_folder(index_dir)
    with folder_lock(index_dir, "an `index` run", report):
        _remove_abandoned_generations(index_dir)
        previous, rebuilt_because = _previous_state(index_dir, identity, image_dir, rebuild)
        with folder_changes(paths, previous.entries.path if previous else None, index_dir / CHANGES_FILE) as changes:
            return _update(image_dir, paths, encoder, identity, index_dir, index_type, batch_size, workers, report,
                           show_progress, recall, started, previous, rebuilt_because, changes)


def _update(image_dir: Path, paths: list[Path], encoder: Encoder, identity: EncoderIdentity, index_dir: Path,
            index_type: str | None, batch_size: int, workers: int, report: Report, show_progress: bool,
            recall: float | None, started: float, previous: LoadedIndex | None, rebuilt_because: str | None,
            changes: FolderChanges) -> IndexUpdate:
    """update_index's work once the folder is compared with the previous index (``changes``)."""
    to_embed, changed, removed, failures = changes.to_embed, changes.changed, changes.removed, changes.failures
    report(f"{len(paths)} images in {image_dir}: {changes.unchanged} unchanged, {len(to_embed) - changed} new, "
           f"{changed} changed, {removed} deleted")
    requested = index_type or (previous.manifest.requested_type if previous else None)
    target = recall or (previous.manifest.recall_target if previous else None) or DEFAULT_RECALL
    if (previous is not None and not to_embed and not removed and requested == previous.manifest.requested_type
            and recall in (None, previous.manifest.recall_target)):
        # Nothing to add, change or drop: the live generation already is this index.
        return IndexUpdate(index_dir, previous.count, 0, 0, 0, changes.unchanged, previous.manifest.index_type,
                           "up to date: nothing changed since the last update", None, failures,
                           0.0, time.monotonic() - started)
    # Everything that can be refused is refused before the embedding, which may take hours.
    expected = changes.unchanged + len(to_embed)
    planned = choose_index_type(expected, identity.dim, requested)
    _check_free_space(index_dir, expected, identity)
    # Embedded into shards that outlive this process: an update killed after hours resumes
    # from its last finished shard when run again on the same files (inference/shards.py).
    shards = embed_in_shards(
        to_embed, lambda slice_paths, bar: embed_paths(slice_paths, encoder, batch_size, workers, bar=bar),
        index_dir / EMBEDDING_SHARDS_DIR, identity.dim, {"encoder": identity.digest},
        show_progress=show_progress, report=report)
    kept_previous = (np.isin(previous.ids, changes.unchanged_ids, assume_unique=True)
                     if previous is not None else np.zeros(0, dtype=bool))
    total = int(kept_previous.sum()) + shards.kept()
    if total == 0:
        failures += [(str(to_embed[row]), reason) for shard in shards for row, reason in shard.failures]
        first = f": the first, {failures[0][0]}: {failures[0][1]}" if failures else ""
        raise UserError(f"none of the {len(paths)} image files in {image_dir} could be read{first}; "
                        "the index was not changed")
    # Unreadable files leave fewer vectors than planned for: then the choice is made again.
    choice = planned if total == expected else choose_index_type(total, identity.dim, requested)
    with _new_generation(index_dir) as staging:
        # The vectors go straight from the previous generation and the shards into the new
        # file, a block at a time, and the index is built from that file: no step holds them all.
        embedded_rows = []
        with VectorWriter(staging / "vectors.npy", total, identity.dim) as writer:
            for start in range(0, len(kept_previous), ADD_ROWS):
                writer.write(previous.vectors[start:start + ADD_ROWS][kept_previous[start:start + ADD_ROWS]])
            for shard in shards:
                writer.write(shard.vectors)
                embedded_rows.append(shard.rows)
                failures += [(str(to_embed[row]), reason) for row, reason in shard.failures]
        embedded = np.concatenate(embedded_rows) if embedded_rows else np.zeros(0, np.int64)
        next_id = int(previous.ids.max()) + 1 if previous is not None and len(previous.ids) else 0
        new_ids = np.arange(next_id, next_id + len(embedded), dtype=np.int64)
        kept_ids = previous.ids[kept_previous] if previous is not None else np.zeros(0, np.int64)
        ids = np.concatenate([kept_ids, new_ids])
        vectors = VectorFile(staging / "vectors.npy")
        index = build_faiss_index(vectors, ids, choice.factory, lists_file=staging / LISTS_FILE)
        tuning = tune_for_recall(index, vectors, ids, target)
        if tuning.parameters:   # an approximate index: what its tuning found (exact search needs none)
            report(f"search: {tuning.describe()}")
        if not tuning.met:
            report(f"warning: {choice.factory} reaches recall@10 {tuning.recall:.3f}, short of {target:g}, at "
                   "its slowest setting: --index-type flat searches exactly, or pass a lower --recall")
        manifest = IndexManifest(
            image_dir=str(image_dir), encoder_kind=identity.kind, encoder_file=ENCODER_FILES[identity.kind],
            encoder_digest=identity.digest, encoder_source=identity.path, dim=identity.dim,
            index_type=choice.factory, requested_type=requested, count=len(ids), skipped=len(failures),
            updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), search_parameters=tuning.parameters,
            recall_target=target, recall_at_10=round(tuning.recall, 4),
        )
        # The new files' entries are made as the catalog is written (each reads its file for
        # the digest), after the previous catalog's unchanged rows, copied inside SQLite.
        new_entries = (CatalogEntry(int(image_id), str(to_embed[position]), int(changes.sizes[position]),
                                    int(changes.mtimes_ns[position]), label_of(to_embed[position]),
                                    file_digest(to_embed[position]))
                       for image_id, position in zip(new_ids, embedded.tolist()))
        _write_generation_files(staging, index, new_entries, changes, ids, manifest, Path(identity.path))
    shards.remove()   # their vectors are in the live generation now
    added = int((~changes.was_indexed[embedded]).sum())
    return IndexUpdate(index_dir, len(ids), added, len(embedded) - added, removed, changes.unchanged,
                       choice.factory, choice.reason, rebuilt_because, failures,
                       shards.images_per_second, time.monotonic() - started, tuning)


def _check_free_space(index_dir: Path, count: int, identity: EncoderIdentity) -> None:
    """Refuse before the embedding when the new generation clearly cannot fit on the disk."""
    vectors_bytes = count * identity.dim * 4
    encoder_bytes = Path(identity.path).stat().st_size if Path(identity.path).is_file() else 0
    # vectors.npy and the FAISS index each hold the vectors once, and the embedding's shards a
    # third time until the generation is written; ~300 bytes a catalog row.
    needed = 3 * vectors_bytes + 300 * count + encoder_bytes
    free = shutil.disk_usage(index_dir).free
    if free < needed:
        raise UserError(f"{index_dir} has {free / 1e6:.0f} MB free and the new index needs about "
                        f"{needed / 1e6:.0f} MB: free some space or choose another --index-dir")


def _previous_state(index_dir: Path, identity: EncoderIdentity, image_dir: Path,
                    rebuild: bool) -> tuple[LoadedIndex | None, str | None]:
    if rebuild:
        return None, "--rebuild" if (index_dir / "CURRENT").exists() else None
    try:
        if current_generation(index_dir) is None:
            return None, None
        previous = load_index(index_dir, for_search=False)
    except UserError as error:   # a writer starts afresh where a reader would have to give up
        return None, f"the previous index cannot be used ({str(error).split(': rebuild')[0]})"
    try:
        # Opening checked only the ids' range (index/catalog.py); an update keeps rows and
        # vectors by id, so here every id is checked (a second or two at 10M).
        in_step = np.array_equal(previous.entries.ids(), np.sort(previous.ids))
    except (ValueError, sqlite3.Error):
        in_step = False
    if not in_step:
        return None, "the previous index cannot be used (its ids do not match its catalog)"
    if previous.manifest.encoder_digest != identity.digest:
        return None, "the encoder changed, so every vector must be recomputed"
    if previous.manifest.image_dir != str(image_dir):
        return None, f"the index was of another folder ({previous.manifest.image_dir})"
    return previous, None


def _generation_number(name: str) -> int | None:
    match = GENERATION_NAME.fullmatch(name.removeprefix(".").removesuffix(".partial"))
    return int(match.group(1)) if match else None


def _live_name(index_dir: Path) -> str | None:
    try:
        live = current_generation(index_dir)
    except UserError:   # a damaged CURRENT names nothing live
        return None
    return live.name if live is not None else None


def _remove_abandoned_generations(index_dir: Path) -> None:
    """A crashed writer's leftovers: partial folders, and generations newer than the live one
    (renamed into place before the crash could write CURRENT). Called under the writer's lock."""
    live = _live_name(index_dir)
    live_number = _generation_number(live) if live else -1
    for child in index_dir.iterdir():
        number = _generation_number(child.name)
        if number is not None and (child.name.endswith(".partial") or number > live_number):
            shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def _new_generation(index_dir: Path) -> Iterator[Path]:
    """A staging folder for the next generation, beside the live one; when the block ends, its
    files are synced and it goes live in one rename (then CURRENT names it); on any error it
    is removed and the live generation stands."""
    previous_live = _live_name(index_dir)
    numbers = [n for n in (_generation_number(child.name) for child in index_dir.iterdir()) if n is not None]
    name = f"gen-{max(numbers, default=0) + 1:06d}"
    staging = index_dir / f".{name}.partial"
    try:
        staging.mkdir()
        yield staging
        for part in staging.iterdir():
            with open(part, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, index_dir / name)
    except (OSError, RuntimeError, sqlite3.Error) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write the new index in {index_dir} ({_first_line(error)[:120]}): free some space or "
                        "choose a writable --index-dir; the previous index is unchanged") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with atomic_write(index_dir / "CURRENT") as handle:
        handle.write(name + "\n")
    _remove_stale_generations(index_dir, keep={name, previous_live})


def _write_generation_files(staging: Path, index: faiss.Index | RerankedIndex, new_entries: Iterable[CatalogEntry],
                            changes: FolderChanges, ids: np.ndarray, manifest: IndexManifest,
                            encoder_source: Path) -> None:
    """Everything of a generation but its vectors.npy (written first, to build the index from)."""
    _place_encoder(encoder_source, staging / manifest.encoder_file)
    faiss.write_index(index.base if isinstance(index, RerankedIndex) else index, str(staging / "faiss.index"))
    write_catalog(staging / "catalog.sqlite", new_entries, kept=changes)
    np.save(staging / "ids.npy", ids)
    write_json_atomic(staging / "manifest.json", manifest.to_dict())


def _place_encoder(source: Path, target: Path) -> None:
    """The encoder travels with the index: a hard link where the filesystem allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _remove_stale_generations(index_dir: Path, keep: set[str | None]) -> None:
    # Only after CURRENT names the new generation. The one it replaced stays until the next
    # update, for searches that read CURRENT just before the swap.
    for child in index_dir.iterdir():
        if child.is_dir() and child.name not in keep and _generation_number(child.name) is not None:
            shutil.rmtree(child, ignore_errors=True)
