"""Encoder (ONNX Runtime, or PyTorch) -> L2-normalised float32 vectors, batched.

    >>> encoder = OnnxEncoder(Path("runs/images/encoder.onnx"))
    >>> result = embed_paths(paths, encoder)          # result.vectors: (n, dim), unit length

Images are decoded in parallel by DataLoader workers through the one evaluation transform
(:class:`~simsiam_embed.data.Preprocessing`), so both backends see identical inputs. Under
torchrun each rank embeds its own shard of the files and rank 0 merges them.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from simsiam_embed.trained_model import load_trained_backbone
from simsiam_embed.images import EvalImageDataset, Preprocessing, collate_skipping_unreadable, start_workers
from simsiam_embed.image_files import discover_images, label_of
from simsiam_embed.distributed import DistributedContext, distributed_session
from simsiam_embed.errors import UserError
from simsiam_embed.settings import EMBED_BATCH_SIZE, EMBED_FORMATS, EMBED_WORKERS
from simsiam_embed.artefacts import EMBEDDINGS_FILE, EMBEDDINGS_PARQUET_FILE, PATHS_FILE, SKIPPED_FILE
from simsiam_embed.files import atomic_path, ensure_writable_folder, read_jsonl, write_jsonl_atomic

class Encoder(Protocol):
    preprocessing: Preprocessing
    dim: int
    description: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """A batch of preprocessed images (n, 3, s, s) float32 -> features (n, dim) float32."""


class TorchEncoder:
    """The checkpoint's backbone run by PyTorch directly (no ONNX Runtime needed)."""

    def __init__(self, checkpoint: Path, device: str | None = None, random_init: bool = False):
        """``random_init``: the checkpoint's architecture with the weights it started from (the
        run's seed), as the baseline a trained encoder must beat."""
        backbone, self.preprocessing, _ = load_trained_backbone(checkpoint, random_init=random_init)
        # Under torchrun each process embeds its shard on its own GPU, not all of them on GPU 0.
        self.device = device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
        self.backbone = backbone.to(self.device).eval()
        self.dim = backbone.feature_dim
        self.description = f"PyTorch ({self.device}) {checkpoint}{' at random init' if random_init else ''}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.backbone(torch.from_numpy(images).to(self.device)).float().cpu().numpy()


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass
class EmbedResult:
    """Vectors for the readable images; ``indices`` say which input each row belongs to."""

    vectors: np.ndarray
    indices: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)
    images_per_second: float = 0.0
    decode_share: float = 0.0   # fraction of wall time the encoder waited for decoded images


def embed_paths(
    paths: Sequence[Path],
    encoder: Encoder,
    batch_size: int = EMBED_BATCH_SIZE,
    workers: int = EMBED_WORKERS,
    show_progress: bool = True,
) -> EmbedResult:
    """Embed ``paths`` (skipping unreadable files) into unit-length float32 vectors."""
    vectors = np.zeros((len(paths), encoder.dim), dtype=np.float32)
    kept: list[int] = []
    failures: list[tuple[int, str]] = []
    if not paths:
        return EmbedResult(vectors[:0], np.zeros(0, dtype=np.int64))
    loader = DataLoader(
        EvalImageDataset(paths, encoder.preprocessing), batch_size=batch_size, num_workers=workers,
        collate_fn=collate_skipping_unreadable,
    )
    waiting = 0.0
    started = time.monotonic()
    with tqdm(total=len(paths), unit="img", disable=not show_progress, file=sys.stderr,
              mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
        batches = start_workers(loader)
        while True:
            asked = time.monotonic()
            try:
                batch, batch_failures = next(batches)
            except StopIteration:
                break
            waiting += time.monotonic() - asked
            failures += batch_failures
            if batch is not None:
                images, indices = batch
                vectors[indices.numpy()] = encoder(images.numpy())
                kept += indices.tolist()
            bar.update(len(batch_failures) + (0 if batch is None else len(batch[1])))
    elapsed = max(time.monotonic() - started, 1e-9)
    order = np.array(sorted(kept), dtype=np.int64)
    return EmbedResult(l2_normalize(vectors[order]), order, sorted(failures),
                       images_per_second=len(order) / elapsed, decode_share=waiting / elapsed)


def shard_for_rank(count: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``count`` items that ``rank`` embeds."""
    per_rank = -(-count // world_size)
    return range(rank * per_rank, min(count, (rank + 1) * per_rank))


@dataclass
class EmbedFolderResult:
    output: Path
    count: int
    failures: list[tuple[str, str]]
    images_per_second: float
    decode_share: float


def embed_folder(
    image_dir: Path,
    encoder: Encoder,
    output: Path,
    batch_size: int = EMBED_BATCH_SIZE,
    workers: int = EMBED_WORKERS,
    show_progress: bool = True,
    file_format: str = "npy",
) -> EmbedFolderResult:
    """Embed every image under ``image_dir`` into ``output/``: ``embeddings.npy`` (n x dim,
    unit-length float32), ``paths.jsonl`` (line i: row i's ``path`` and ``label``, its folder)
    and ``skipped.jsonl`` (``path`` and ``reason``). JSON lines, because a file name may hold
    a newline or a tab. ``file_format="parquet"``: ``embeddings.parquet`` (path, label and
    embedding columns) instead of the first two. Under torchrun each rank embeds its shard and
    rank 0 merges the shards.
    """
    if file_format not in EMBED_FORMATS:
        raise UserError(f"unknown format {file_format!r}: choose one of {', '.join(EMBED_FORMATS)}")
    if file_format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401  (before hours of embedding, not after)
        except ImportError:
            raise UserError("--format parquet needs pyarrow: pip install 'simsiam-embed[interop]'") from None
    paths = discover_images(image_dir)
    if not paths:
        raise UserError(f"no images in {image_dir}")
    ensure_writable_folder(output)   # before the embedding, which may take hours
    # The shards meet through files and one barrier: gloo serves that on GPU machines too.
    with distributed_session("cpu") as context:
        return _embed_shards(paths, encoder, output, batch_size, workers, show_progress, context, file_format)


def _embed_shards(paths: list[Path], encoder: Encoder, output: Path, batch_size: int, workers: int,
                  show_progress: bool, context: DistributedContext, file_format: str) -> EmbedFolderResult:
    mine = shard_for_rank(len(paths), context.rank, context.world_size)
    result = embed_paths([paths[i] for i in mine], encoder, batch_size, workers, show_progress and context.is_main)
    global_rows = np.asarray(list(mine), dtype=np.int64)[result.indices] if len(result.indices) else np.zeros(0, np.int64)
    failures = [(str(paths[mine[i]]), reason) for i, reason in result.failures]
    if context.enabled:
        # Shards meet through files, which every rank of a torchrun job on one machine or a
        # shared filesystem can see; rank 0 merges after the barrier.
        np.savez(output / f".shard-{context.rank}.npz", vectors=result.vectors, rows=global_rows)
        write_jsonl_atomic(output / f".shard-{context.rank}.failures.jsonl",
                           [{"path": path, "reason": reason} for path, reason in failures])
        dist.barrier()
        if not context.is_main:
            return EmbedFolderResult(output, len(global_rows), failures, result.images_per_second, result.decode_share)
        shards = [np.load(output / f".shard-{rank}.npz") for rank in range(context.world_size)]
        vectors = np.concatenate([shard["vectors"] for shard in shards])
        global_rows = np.concatenate([shard["rows"] for shard in shards])
        failures = [(record["path"], record["reason"]) for rank in range(context.world_size)
                    for record in read_jsonl(output / f".shard-{rank}.failures.jsonl")]
        for rank in range(context.world_size):
            (output / f".shard-{rank}.npz").unlink()
            (output / f".shard-{rank}.failures.jsonl").unlink()
    else:
        vectors = result.vectors
    kept = [paths[i] for i in global_rows]
    if file_format == "parquet":
        write_parquet(output / EMBEDDINGS_PARQUET_FILE, [str(path) for path in kept], [label_of(path) for path in kept],
                      vectors)
    else:
        with atomic_path(output / EMBEDDINGS_FILE) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, vectors)
        write_jsonl_atomic(output / PATHS_FILE, [{"path": str(path), "label": label_of(path)} for path in kept])
    write_jsonl_atomic(output / SKIPPED_FILE, [{"path": path, "reason": reason} for path, reason in failures])
    return EmbedFolderResult(output, len(kept), failures, result.images_per_second, result.decode_share)


#: Rows a parquet row group: readers (DuckDB, Spark, clip-retrieval) stream it group by group.
PARQUET_ROW_GROUP = 65_536


def write_parquet(path: Path, paths: list[str], labels: list[str], vectors: np.ndarray) -> None:
    """``path``, ``label`` and ``embedding`` (a fixed-size list of float32) columns, in row groups,
    as clip-retrieval and FiftyOne read embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    table = pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string()),
                      "embedding": embedding})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=PARQUET_ROW_GROUP)
