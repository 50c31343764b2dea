"""Encoder (ONNX Runtime, or PyTorch) -> L2-normalised float32 vectors, batched.

    >>> encoder = OnnxEncoder(Path("runs/images/encoder.onnx"))
    >>> result = embed_paths(paths, encoder)          # result.vectors: (n, dim), unit length

Images are decoded in parallel by DataLoader workers through the one evaluation transform
(:class:`~simsiam_embed.data.Preprocessing`), so both backends see identical inputs. Under
torchrun each rank embeds its own shards of the files (shards.py) and rank 0 writes them out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from simsiam_embed.trained_model import load_trained_backbone
from simsiam_embed.images import EvalImageDataset, Preprocessing, collate_skipping_unreadable, start_workers
from simsiam_embed.image_files import discover_images, label_of
from simsiam_embed.distributed import distributed_session
from simsiam_embed.errors import Report, UserError
from simsiam_embed.settings import EMBED_BATCH_SIZE, EMBED_FORMATS, EMBED_WORKERS
from simsiam_embed.artefacts import EMBEDDING_SHARDS_DIR, EMBEDDINGS_FILE, EMBEDDINGS_PARQUET_FILE, PATHS_FILE, SKIPPED_FILE
from simsiam_embed.files import atomic_path, atomic_write, ensure_writable_folder, write_jsonl_atomic
from simsiam_embed.inference.shards import ShardedEmbedding, embed_in_shards
from simsiam_embed.optional import require

class Encoder(Protocol):
    preprocessing: Preprocessing
    dim: int
    description: str
    on_gpu: bool   # sets how many processes decode for it (settings.embed_workers)

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
        self.on_gpu = self.device.startswith("cuda")
        self.description = f"PyTorch ({self.device}) {checkpoint}{' at random init' if random_init else ''}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.backbone(torch.from_numpy(images).to(self.device)).float().cpu().numpy()


#: The raw-pixel floor's side: small, as the kNN literature's pixel baselines are.
RAW_PIXEL_SIDE = 32


class RawPixelEncoder:
    """The floor every learned encoder is measured against: an image's own pixels, small.

    Each image at ``side`` px (the shorter side resized, then centre-cropped), normalised, minus
    its own mean per channel: cosine on these is the pixels' correlation, which a change of
    brightness does not move. On centred, aligned images (Fashion-MNIST) it is a hard floor.
    """

    def __init__(self, side: int = RAW_PIXEL_SIDE):
        self.preprocessing = Preprocessing(input_size=side, resize_size=side)
        self.dim = 3 * side * side
        self.on_gpu = False
        self.description = f"raw pixels at {side} px"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        centred = images - images.mean(axis=(2, 3), keepdims=True)
        return centred.reshape(len(images), -1).astype(np.float32)


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
    bar: tqdm | None = None,
) -> EmbedResult:
    """Embed ``paths`` (skipping unreadable files) into unit-length float32 vectors; progress on
    ``bar`` when given (a caller's bar over more files), else on a bar of its own."""
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
    own_bar = bar is None
    bar = bar if bar is not None else tqdm(total=len(paths), unit="img", disable=not show_progress, file=sys.stderr,
                                           mininterval=0.5 if sys.stderr.isatty() else 30)
    try:
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
    finally:
        if own_bar:
            bar.close()
    elapsed = max(time.monotonic() - started, 1e-9)
    order = np.array(sorted(kept), dtype=np.int64)
    return EmbedResult(l2_normalize(vectors[order]), order, sorted(failures),
                       images_per_second=len(order) / elapsed, decode_share=waiting / elapsed)


def shard_for_rank(count: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``count`` items that ``rank`` embeds (the kNN monitor's share)."""
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
    encoder_digest: str = "",
    report: Report = lambda _message: None,
) -> EmbedFolderResult:
    """Embed every image under ``image_dir`` into ``output/``: ``embeddings.npy`` (n x dim,
    unit-length float32), ``paths.jsonl`` (line i: row i's ``path`` and ``label``, its folder)
    and ``skipped.jsonl`` (``path`` and ``reason``). JSON lines, because a file name may hold
    a newline or a tab. ``file_format="parquet"``: ``embeddings.parquet`` (path, label and
    embedding columns) instead of the first two.

    The vectors go to shards in ``output/.embedding/`` as they are made (shards.py): memory
    stays at one shard's whatever the folder's size, a killed run continues where it stopped
    when run again (``encoder_digest`` says which encoder the finished shards are of), and under
    torchrun every rank embeds its own shards. Rank 0 then writes the files shard by shard.
    """
    if file_format not in EMBED_FORMATS:
        raise UserError(f"unknown format {file_format!r}: choose one of {', '.join(EMBED_FORMATS)}")
    if file_format == "parquet":
        require("pyarrow.parquet", "--format parquet", "interop")   # before hours of embedding, not after
    paths = discover_images(image_dir)
    if not paths:
        raise UserError(f"no images in {image_dir}")
    ensure_writable_folder(output)   # before the embedding, which may take hours
    # The shards meet through files and barriers: gloo serves that on GPU machines too.
    with distributed_session("cpu") as context:
        shards = embed_in_shards(
            paths, lambda slice_paths, bar: embed_paths(slice_paths, encoder, batch_size, workers, bar=bar),
            output / EMBEDDING_SHARDS_DIR, encoder.dim, {"encoder": encoder_digest or encoder.description},
            context, show_progress, report)
        if not context.is_main:
            return EmbedFolderResult(output, 0, [], shards.images_per_second, shards.decode_share)
        count, failures = _write_embedding_files(shards, paths, output, file_format)
    shards.remove()   # only once the files they made are in place
    return EmbedFolderResult(output, count, failures, shards.images_per_second, shards.decode_share)


def _write_embedding_files(shards: ShardedEmbedding, paths: list[Path], output: Path,
                           file_format: str) -> tuple[int, list[tuple[str, str]]]:
    """The output files from the shards, one shard in memory at a time: (rows, failures)."""
    count, failures = shards.kept(), []
    if file_format == "parquet":
        with atomic_path(output / EMBEDDINGS_PARQUET_FILE) as tmp, ParquetRowWriter(tmp, shards.dim) as writer:
            for shard in shards:
                kept = [paths[row] for row in shard.rows]
                writer.write([str(path) for path in kept], [label_of(path) for path in kept], shard.vectors)
                failures += [(str(paths[row]), reason) for row, reason in shard.failures]
    else:
        with atomic_path(output / EMBEDDINGS_FILE) as vectors_tmp, atomic_write(output / PATHS_FILE) as rows_file:
            vectors = np.lib.format.open_memmap(vectors_tmp, mode="w+", dtype=np.float32, shape=(count, shards.dim))
            written = 0
            for shard in shards:
                vectors[written:written + len(shard.rows)] = shard.vectors
                written += len(shard.rows)
                rows_file.write("".join(json.dumps({"path": str(paths[row]), "label": label_of(paths[row])},
                                                   ensure_ascii=False) + "\n" for row in shard.rows))
                failures += [(str(paths[row]), reason) for row, reason in shard.failures]
            vectors.flush()
            del vectors
    write_jsonl_atomic(output / SKIPPED_FILE, [{"path": path, "reason": reason} for path, reason in failures])
    return count, failures


#: Rows a parquet row group: readers (DuckDB, Spark, clip-retrieval) stream it group by group.
PARQUET_ROW_GROUP = 65_536


class ParquetRowWriter:
    """``path``, ``label`` and ``embedding`` (a fixed-size list of float32) columns, written a
    batch at a time in row groups, as clip-retrieval and FiftyOne read embeddings."""

    def __init__(self, path: Path, dim: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self.dim = dim
        self.schema = pa.schema([("path", pa.string()), ("label", pa.string()),
                                 ("embedding", pa.list_(pa.float32(), dim))])
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, paths: list[str], labels: list[str], vectors: np.ndarray) -> None:
        pa = self._pa
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)
        table = pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string()),
                          "embedding": embedding}, schema=self.schema)
        self.writer.write_table(table, row_group_size=PARQUET_ROW_GROUP)

    def __enter__(self) -> "ParquetRowWriter":
        return self

    def __exit__(self, *_exc) -> None:
        self.writer.close()

