"""Encoder (ONNX Runtime, or PyTorch) -> L2-normalised float32 vectors, batched.

    >>> encoder = OnnxEncoder(Path("runs/images/encoder.onnx"))
    >>> result = embed_paths(paths, encoder)          # result.vectors: (n, dim), unit length

Images are decoded in parallel by DataLoader workers through the one evaluation transform
(:class:`~simsiam_embed.data.Preprocessing`), so both backends see identical inputs. Under
torchrun each rank embeds its own shard of the files and rank 0 merges them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import load_trained_backbone
from .data import (
    EvalImageDataset, Preprocessing, collate_skipping_unreadable, discover_images, label_of, start_workers,
)
from .distributed import DistributedContext, distributed_session
from .errors import UserError
from .files import atomic_path, ensure_writable_folder, read_jsonl, write_jsonl_atomic

#: ONNX Runtime providers, fastest first; the first one that loads is used.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class Encoder(Protocol):
    preprocessing: Preprocessing
    dim: int
    description: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """A batch of preprocessed images (n, 3, s, s) float32 -> features (n, dim) float32."""


#: The TensorRT runtime ONNX Runtime's TensorRT provider needs; onnxruntime-gpu lists the
#: provider whether or not it is installed.
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll", "nvinfer.dll")
#: The TensorRT engine's profile covers batches 1..this: every batch size the commands use
#: (embed's --batch-size default 64, the export check's 32, a search's few queries) and room above.
TENSORRT_MAX_BATCH = 512


def tensorrt_installed() -> bool:
    import ctypes

    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever is printed to stdout, by Python or by native code, to stderr for the block.

    ONNX Runtime prints its provider fallback banner ("EP Error ... Falling back") with Python's
    print, and native libraries write to file descriptor 1: either would break ``--json``.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:   # no real stdout (an embedding host): Python's redirect still applies
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _provider_options(name: str, path: Path, max_batch: int, input_size: int | None) -> dict[str, str]:
    """Under torchrun each process uses its own GPU; TensorRT keeps its engines between commands.

    Without an engine cache TensorRT rebuilds its engine (minutes for a ResNet-50) in every
    command and for every new batch size; one optimisation profile from batch 1 to ``max_batch``
    serves the last partial batch, the parity check and a single search query alike.
    """
    device = os.environ.get("LOCAL_RANK", "0")
    if name == "CUDAExecutionProvider":
        return {"device_id": device}
    if name == "TensorrtExecutionProvider":
        cache = Path(path).resolve().parent / ".tensorrt-cache"
        options = {"device_id": device, "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache), "trt_fp16_enable": "False"}
        if input_size:
            shape = lambda batch: f"images:{batch}x3x{input_size}x{input_size}"  # noqa: E731
            # Tuned for embed's default batch of 64; valid for every batch from 1 to max_batch.
            options.update(trt_profile_min_shapes=shape(1), trt_profile_opt_shapes=shape(min(64, max_batch)),
                           trt_profile_max_shapes=shape(max_batch))
        return options
    return {}


def onnx_session(path: Path | str, provider: str | None = None, max_batch: int = TENSORRT_MAX_BATCH,
                 input_size: int | None = None):
    """An ONNX Runtime session on the best available provider (or ``provider``) and its name.

    onnxruntime-gpu lists the CUDA and TensorRT providers even on machines without a GPU, so
    CUDA is only asked for when PyTorch sees a GPU, and TensorRT only when its runtime library
    loads too. ONNX Runtime itself falls back to the next provider when one fails to start
    (printing a banner, kept off stdout), and the one it actually used is returned.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider is not None:
        wanted = PROVIDER_ALIASES.get(provider.lower(), provider)
        if wanted not in available:
            raise UserError(f"ONNX Runtime provider {provider!r} is not available here (have: {', '.join(available)})")
        providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    else:
        gpu = torch.cuda.is_available()
        usable = {"CPUExecutionProvider": True, "CUDAExecutionProvider": gpu,
                  "TensorrtExecutionProvider": gpu and tensorrt_installed()}
        providers = [p for p in PROVIDER_PREFERENCE if p in available and usable[p]]
    options = ort.SessionOptions()
    options.log_severity_level = 3   # provider fallbacks are reported by us, once, not as stack traces
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with_options = [(name, _provider_options(name, Path(path), max_batch, input_size)) for name in providers]
    try:
        with stdout_to_stderr():
            session = ort.InferenceSession(str(path), sess_options=options, providers=with_options)
    except Exception as error:  # ONNX Runtime raises its own Fail / InvalidGraph / NoSuchFile types
        raise UserError(f"ONNX Runtime cannot load {path} ({str(error).splitlines()[0]})") from None
    used = session.get_providers()[0]
    if provider is not None and used != providers[0]:
        raise UserError(f"ONNX Runtime could not start provider {providers[0]} (fell back to {used})")
    return session, used


class OnnxEncoder:
    """An exported encoder run by ONNX Runtime; its preprocessing comes from the file itself."""

    def __init__(self, path: Path, provider: str | None = None):
        from .export import preprocessing_from_metadata, read_encoder_metadata

        self.path = path
        self.metadata = read_encoder_metadata(path)
        self.preprocessing = preprocessing_from_metadata(self.metadata, path)
        self.dim = int(self.metadata["embedding_dim"])
        self.session, self.provider = onnx_session(path, provider, input_size=self.preprocessing.input_size)
        self.description = f"ONNX Runtime ({self.provider}) {path}"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]


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
    batch_size: int = 64,
    workers: int = 2,
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
    batch_size: int = 64,
    workers: int = 2,
    show_progress: bool = True,
) -> EmbedFolderResult:
    """Embed every image under ``image_dir`` into ``output/``: ``embeddings.npy`` (n x dim,
    unit-length float32), ``paths.jsonl`` (line i: row i's ``path`` and ``label``, its folder)
    and ``skipped.jsonl`` (``path`` and ``reason``). JSON lines, because a file name may hold
    a newline or a tab. Under torchrun each rank embeds its shard and rank 0 merges the shards.
    """
    paths = discover_images(image_dir)
    if not paths:
        raise UserError(f"no images in {image_dir}")
    ensure_writable_folder(output)   # before the embedding, which may take hours
    # The shards meet through files and one barrier: gloo serves that on GPU machines too.
    with distributed_session("cpu") as context:
        return _embed_shards(paths, encoder, output, batch_size, workers, show_progress, context)


def _embed_shards(paths: list[Path], encoder: Encoder, output: Path, batch_size: int, workers: int,
                  show_progress: bool, context: DistributedContext) -> EmbedFolderResult:
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
    with atomic_path(output / "embeddings.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, vectors)
    write_jsonl_atomic(output / "paths.jsonl", [{"path": str(path), "label": label_of(path)} for path in kept])
    write_jsonl_atomic(output / "skipped.jsonl", [{"path": path, "reason": reason} for path, reason in failures])
    return EmbedFolderResult(output, len(kept), failures, result.images_per_second, result.decode_share)
