"""Queries against an index: embed each query image with the index's own encoder, rank by cosine
(centred on the index's mean, as every score the explore layer shows).

    >>> results = search_images(Path("index"), [Path("query.jpg")], k=10)
    >>> results[0].hits[0].path, results[0].hits[0].score
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from simsiam_embed.artefacts import file_digest
from simsiam_embed.image_files import discover_images, open_image
from simsiam_embed.inference.embed import Encoder, TorchEncoder, embed_paths, l2_normalize
from simsiam_embed.inference.onnx_encoder import OnnxEncoder
from simsiam_embed.errors import Report, UserError
from simsiam_embed.index.catalog import CatalogEntry
from simsiam_embed.index.store import LoadedIndex, centred_cosines, load_index
from simsiam_embed.index.thumbnails import thumbnail_of_file


DEFAULT_K = 10


@dataclass
class SearchHit:
    rank: int
    score: float   # cosine of the query and this image, both centred on the index's mean
    path: str
    label: str
    id: int


@dataclass
class QueryResult:
    query: str
    hits: list[SearchHit]

    def to_dict(self) -> dict:
        return {"query": self.query, "hits": [asdict(hit) for hit in self.hits]}


def encoder_of_index(loaded: LoadedIndex, provider: str | None = None, engine_cache: Path | None = None) -> Encoder:
    """The very encoder that made the index's vectors: the copy inside the index folder (the
    manifest can name no other), refused if its bytes are not the ones the index recorded.

    Queries come a few at a time, so the session is set up for latency; TensorRT engines are
    kept in ``engine_cache`` (the workspace's), never in the index folder, which may have come
    from someone else: an engine is compiled GPU code, and files received are data.
    """
    path = loaded.encoder_path
    if not path.is_file():
        raise UserError(f"the index's encoder {path} is gone: rebuild with `simsiam-embed index --rebuild`")
    if file_digest(path) != loaded.manifest.encoder_digest:
        raise UserError(f"{path} changed since the index was built: rebuild with `simsiam-embed index --rebuild`")
    if loaded.manifest.encoder_kind == "torch":
        return TorchEncoder(path)
    return OnnxEncoder(path, provider, engine_cache, latency_first=True)


def check_model_matches(loaded: LoadedIndex, model: Path) -> None:
    """A query model the user named must be the one the index was built with."""
    if file_digest(model) != loaded.manifest.encoder_digest:
        raise UserError(
            f"the index in {loaded.folder} was built with another encoder ({loaded.manifest.encoder_source}), "
            f"not {model}: search without --model, or re-index with it"
        )


def expand_queries(queries: list[Path]) -> list[Path]:
    """Files stay; a folder becomes the images in it. A missing query is an error."""
    expanded: list[Path] = []
    for query in queries:
        if query.is_dir():
            found = discover_images(query)
            if not found:
                raise UserError(f"the query folder {query} holds no images")
            expanded += found
        elif query.is_file():
            expanded.append(query)
        else:
            raise UserError(f"query {query} does not exist")
    return expanded


#: Queries go through the encoder in batches of this many, as ``embed`` does: a folder of
#: thousands of queries in one batch would run a GPU out of memory.
QUERY_BATCH = 64


def embed_queries(paths: list[Path], encoder: Encoder) -> np.ndarray:
    """Unit vectors of the query images, in order; an unreadable query is an error."""
    workers = 2 if len(paths) > QUERY_BATCH else 0   # a few queries are faster without worker start-up
    result = embed_paths(paths, encoder, QUERY_BATCH, workers, show_progress=len(paths) > 10 * QUERY_BATCH)
    if result.failures:
        position, reason = result.failures[0]
        raise UserError(f"cannot read the query {paths[position]}: {reason}")
    return result.vectors


def search_images(
    index_dir: Path,
    queries: list[Path],
    k: int | None = None,
    exclude_self: bool = False,
    model: Path | None = None,
    provider: str | None = None,
    report: Report | None = None,
    engine_cache: Path | None = None,
) -> list[QueryResult]:
    """The ``k`` nearest indexed images of each query (default: 10, or all if the index is smaller);
    ``engine_cache``: where TensorRT keeps its engines (the workspace's; None: none kept)."""
    loaded = load_index(index_dir, report=report)
    if model is not None:
        check_model_matches(loaded, model)
    paths = expand_queries(queries)
    if k is None:
        k = min(DEFAULT_K, loaded.count)
    elif k > loaded.count:
        raise UserError(f"-k {k} is more than the {loaded.count} images in the index: use -k {loaded.count} or less")
    vectors = embed_queries(paths, encoder_of_index(loaded, provider, engine_cache))
    leave_out = [_is_query(path, loaded) for path in paths] if exclude_self else None
    return [QueryResult(str(path), hits) for path, hits in zip(paths, nearest_hits(loaded, vectors, k, leave_out))]


def _is_query(query: Path, loaded: LoadedIndex) -> Callable[[CatalogEntry], bool]:
    """Which indexed images are the query itself: its own file, where the index holds it; else
    (a query from outside, such as a download of an indexed photo) the images with its bytes.
    A byte-identical copy at another path is not the query: finding it may be why one searched."""
    query_path = str(query.resolve())
    if loaded.entries.has_path(query_path):
        return lambda entry: entry.path == query_path
    query_digest = file_digest(query)
    return lambda entry: entry.digest == query_digest


#: Candidates FAISS returns beyond k, re-ranked by centred cosine: k + max(3k, RERANK_EXTRA). On
#: 30,000 Fashion-MNIST vectors (bench/bench_search_centred.py) the raw top 10 held 84% of the
#: exact centred top 10; re-ranking 26 candidates 97%, 74 candidates 99%, at about 1.5 ms a query.
RERANK_EXTRA = 64
RERANK_FACTOR = 3


def nearest_hits(loaded: LoadedIndex, vectors: np.ndarray, k: int,
                 leave_out: Sequence[Callable[[CatalogEntry], bool]] | None = None) -> list[list[SearchHit]]:
    """The ``k`` nearest entries of each query vector, as hits scored by centred cosine, the score
    dedup, clusters and outliers use (raw cosines of pooled CNN features all sit near 0.96-1.0 and
    tell a user little): FAISS's k + max(3k, RERANK_EXTRA) nearest by raw cosine, re-ranked by
    the centred one. ``leave_out[i]`` names entries query i must not return (itself, when it is
    in the index); then more candidates are asked for (twice as many while any query is short,
    up to the whole index), so that ``k`` remain wherever the index holds that many others."""
    hits: list[list[SearchHit]] = [[] for _ in range(len(vectors))]
    short = list(range(len(vectors)))
    asked = min(k + max(RERANK_FACTOR * k, RERANK_EXTRA) + (leave_out is not None), loaded.count)
    while short:
        scores, ids = loaded.search(vectors[short], asked)
        for row, row_ids in zip(short, ids):
            hits[row] = _ranked_hits(loaded, vectors[row], row_ids, k, leave_out[row] if leave_out else None)
        if asked >= loaded.count or leave_out is None:
            break
        short = [row for row in short if len(hits[row]) < k]
        asked = min(2 * asked, loaded.count)
    return hits


def _ranked_hits(loaded: LoadedIndex, query: np.ndarray, ids: np.ndarray, k: int,
                 leave_out: Callable[[CatalogEntry], bool] | None) -> list[SearchHit]:
    """One query's FAISS candidates as hits, best centred cosine first: padding (-1) and entries
    ``leave_out`` names are skipped, and at most ``k`` kept."""
    found = ids[ids >= 0]
    scores = centred_cosines(query, loaded.vectors_of(found), loaded.mean_vector())
    order = np.argsort(-scores, kind="stable")   # ties keep FAISS's order
    hits: list[SearchHit] = []
    for start in range(0, len(order), k):   # the catalogue rows of what is shown only, k at a time
        batch = order[start:start + k]
        for position, entry in zip(batch, loaded.entries.many([int(found[i]) for i in batch])):
            if leave_out is not None and leave_out(entry):
                continue
            hits.append(SearchHit(len(hits) + 1, round(float(scores[position]), 6), entry.path, entry.label,
                                  int(found[position])))
            if len(hits) == k:
                return hits
    return hits


def embed_image(source: Path | str | BinaryIO, encoder: Encoder) -> np.ndarray:
    """One image (a path or an open binary file) as a unit vector, through the safe decoder:
    raises :class:`UnreadableImage` for anything it refuses (decompression bombs included)."""
    preprocessing = encoder.preprocessing
    image = open_image(source, preprocessing.draft_side)
    pixels = preprocessing.transform()(image).numpy()[None]
    return l2_normalize(encoder(pixels))


def write_results_html(results: list[QueryResult], output: Path, thumbnail: int = 128) -> None:
    """A self-contained page: each query beside its results, thumbnails embedded as data URIs."""
    from simsiam_embed.files import atomic_write
    from simsiam_embed.html_pages import render, tile

    if not output.parent.is_dir():
        raise UserError(f"cannot write {output}: the folder {output.parent} does not exist")

    def preview(path: str, caption: str, css: str = "") -> dict:
        return tile(thumbnail_of_file(path, thumbnail), caption, path, css)

    sections = [{"heading": "", "note": "",
                 "tiles": [preview(result.query, "query: " + Path(result.query).name, "query")]
                 + [preview(hit.path, f"{hit.rank}. {hit.score:.3f} {Path(hit.path).name}") for hit in result.hits]}
                for result in results]
    page = render("sections.html", title="simsiam-embed search", sections=sections, tile=thumbnail, pixelated=True)
    with atomic_write(output) as handle:
        handle.write(page)


