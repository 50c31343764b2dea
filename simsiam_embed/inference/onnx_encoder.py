"""The ``encoder.onnx`` format: write one, read its metadata back (validated), open a session.

    >>> write_encoder(network, input_size=224, metadata=EncoderMetadata(...), path=tmp)
    >>> metadata = read_encoder_metadata(Path("runs/images/encoder.onnx"))   # preprocessing, dim, provenance
    >>> encoder = OnnxEncoder(Path("runs/images/encoder.onnx"))              # images -> features

The file's ``metadata_props`` hold everything a consumer needs (as timm's models carry their
data config): see :class:`~simsiam_embed.artefacts.EncoderMetadata`. Export writes through
this module and embedding reads through it; neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from simsiam_embed.artefacts import EncoderMetadata, file_digest
from simsiam_embed.errors import UserError
from simsiam_embed.files import folder_lock
from simsiam_embed.native_output import stdout_redirected



# --------------------------------------------------------------------------------------------
# Writing and reading the format


def write_encoder(network: nn.Module, input_size: int, metadata: EncoderMetadata, path: Path) -> None:
    """Export ``network`` (images -> features) to ``path`` with ``metadata`` in its metadata_props."""
    # torch 2.14's default exporter (torch.export, "dynamo=True") is used: the TorchScript-based
    # one is deprecated. It captures the batch axis as a symbolic dimension ("batch" in the
    # graph), so one file serves any batch size; it writes opset 20, which ONNX Runtime runs.
    example = torch.zeros(2, 3, input_size, input_size, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        network, (example,), str(path), input_names=["images"], output_names=["embeddings"],
        dynamic_shapes={"images": {0: batch}}, dynamo=True, external_data=False, verbose=False,
    )
    write_encoder_metadata(path, metadata)


def write_encoder_metadata(path: Path, metadata: EncoderMetadata) -> None:
    """Replace the ONNX file's metadata_props with ``metadata`` (an export's, or a quantised copy's)."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def read_encoder_metadata(path: Path | str) -> EncoderMetadata:
    """An exported encoder's metadata, or a clear error if the file is not one.

    An encoder is a file that travels: every field a consumer uses is checked, against its type
    and range and against the graph's own output width, with an error naming it.
    """
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError, OSError, ... for broken files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable ONNX file ({reason[:200]}): export one with `simsiam-embed export`") from None
    metadata = EncoderMetadata.from_props({entry.key: entry.value for entry in proto.metadata_props}, path)
    outputs = proto.graph.output
    declared = outputs[0].type.tensor_type.shape.dim[-1].dim_value if outputs and outputs[0].type.tensor_type.shape.dim else 0
    if declared and declared != metadata.embedding_dim:
        raise UserError(f"{path}: its metadata field 'embedding_dim' says {metadata.embedding_dim}, "
                        f"but the network outputs {declared}")
    return metadata


# --------------------------------------------------------------------------------------------
# Running it: ONNX Runtime sessions


#: ONNX Runtime providers, fastest first; the first one that loads is used.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}



#: The TensorRT runtime ONNX Runtime's TensorRT provider needs; onnxruntime-gpu lists the
#: provider whether or not it is installed.
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll", "nvinfer.dll")
#: The TensorRT engine's profile covers batches 1..this: every batch size the commands use
#: (embed's --batch-size default 64, the export check's 32, a search's few queries) and room above.
TENSORRT_MAX_BATCH = 512


def torch_sees_a_gpu() -> bool:
    """Whether there is a CUDA GPU to run on: onnxruntime-gpu lists its CUDA provider either way."""
    return torch.cuda.is_available()


def tensorrt_library() -> str | None:
    """The name of the TensorRT runtime library that loads here, or None."""
    import ctypes

    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return name
        except OSError:
            continue
    return None


def tensorrt_installed() -> bool:
    return tensorrt_library() is not None


def tensorrt_engine_folder(encoder: Path, cache_root: Path) -> Path:
    """Where TensorRT keeps ``encoder``'s engine: a folder of ``cache_root`` named by the file's
    content, ONNX Runtime's version and TensorRT's library.

    ONNX Runtime names a cached engine by the graph's structure, not its weights
    (microsoft/onnxruntime#6455): two encoders of one architecture (a run's encoder.onnx exported
    again after more training) would share one engine, and the second would silently compute the
    first's features. Named by content, the copies of one encoder (the run's, every index
    generation's) share one engine, built once, and a new encoder never meets an old engine. An
    engine built by another ONNX Runtime or TensorRT does not load, hence the versions.
    """
    import onnxruntime as ort

    runtime = (tensorrt_library() or "no-tensorrt").replace(".", "_")
    return cache_root / f"{file_digest(encoder)[:16]}-ort{ort.__version__}-{runtime}"


def _provider_options(name: str, max_batch: int, input_size: int | None, engine_folder: Path | None,
                      latency_first: bool, half: bool = False) -> dict[str, str]:
    """Under torchrun each process uses its own GPU; TensorRT keeps its engines between commands.

    Without an engine cache TensorRT rebuilds its engine (minutes for a ResNet-50) in every
    command and for every new batch size; one optimisation profile from batch 1 to ``max_batch``
    serves the last partial batch, the parity check and a single search query alike. The timing
    cache (per layer and GPU, whatever the weights) lives beside the engine folders, so the engine
    of a re-exported encoder builds from measured timings.

    cuDNN's exhaustive algorithm search times every convolution algorithm for each new input
    shape: worth it for embedding, where one batch shape serves thousands of batches, and
    seconds lost per query for ``search`` and ``serve`` (``latency_first``), whose batches are a
    few queries of changing count: there its heuristic choice is used.

    TensorRT computes in fp16 only with its fp16 flag, whatever the ONNX file's types: it is set
    for an encoder exported in fp16 (``half``), whose parity with PyTorch export checked, and
    never for an fp32 one, whose features the user asked to keep at full precision.
    """
    device = os.environ.get("LOCAL_RANK", "0")
    if name == "CUDAExecutionProvider":
        return {"device_id": device, "cudnn_conv_algo_search": "HEURISTIC" if latency_first else "EXHAUSTIVE"}
    if name == "TensorrtExecutionProvider":
        options = {"device_id": device, "trt_fp16_enable": str(half), "trt_engine_cache_enable": "False"}
        if engine_folder is not None:
            options.update(trt_engine_cache_enable="True", trt_engine_cache_path=str(engine_folder),
                           trt_timing_cache_enable="True", trt_timing_cache_path=str(engine_folder.parent))
        if input_size:
            shape = lambda batch: f"images:{batch}x3x{input_size}x{input_size}"  # noqa: E731
            # Tuned for embed's default batch of 64; valid for every batch from 1 to max_batch.
            options.update(trt_profile_min_shapes=shape(1), trt_profile_opt_shapes=shape(min(64, max_batch)),
                           trt_profile_max_shapes=shape(max_batch))
        return options
    return {}


def _usable_engine_folder(path: Path, engine_cache: Path | None) -> Path | None:
    """The engine folder of ``path`` under ``engine_cache``, made; None (and said) where it cannot be."""
    if engine_cache is None:
        return None
    folder = tensorrt_engine_folder(path, engine_cache)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
        reason = "not writable"
    except OSError as error:
        reason = error.strerror or type(error).__name__
    print(f"TensorRT: cannot keep engines in {folder} ({reason}): the engine is built again in every command",
          file=sys.stderr)
    return None


@contextlib.contextmanager
def _engine_builder(engine_folder: Path | None) -> Iterator[None]:
    """Held while a session starts with a TensorRT engine cache: under torchrun every rank opens
    the same encoder at once, and each would build the engine (minutes) and write the same files
    together; with the cache's lock one builds, the others wait and load its engine. The lock is
    the cache root's, so the shared timing cache has one writer too."""
    if engine_folder is None:
        yield
        return
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    with folder_lock(engine_folder.parent, "a TensorRT engine build", say):
        yield


def onnx_session(path: Path | str, provider: str | None = None, max_batch: int = TENSORRT_MAX_BATCH,
                 input_size: int | None = None, *, engine_cache: Path | None = None, tensorrt: bool = True,
                 latency_first: bool = False, half: bool = False, cpu_fallback_ok: bool = False):
    """An ONNX Runtime session on the best available provider (or ``provider``) and its name.

    A GPU machine whose GPU providers all fail to start is an error unless ``cpu_fallback_ok``
    (a one-off check, which runs as well on the CPU).

    onnxruntime-gpu lists the CUDA and TensorRT providers even on machines without a GPU, so
    CUDA is only asked for when PyTorch sees a GPU, and TensorRT only when its runtime library
    loads too (and ``tensorrt``: a one-off check need not build an engine). ONNX Runtime itself
    falls back to the next provider when one fails to start (printing a banner, kept off
    stdout), and the one it actually used is returned. TensorRT engines are kept under
    ``engine_cache`` (see :func:`tensorrt_engine_folder`); without one, none is kept.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider is not None:
        wanted = PROVIDER_ALIASES.get(provider.lower(), provider)
        if wanted not in available:
            raise UserError(f"ONNX Runtime provider {provider!r} is not available here (have: {', '.join(available)})")
        providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
    else:
        gpu = torch_sees_a_gpu()
        usable = {"CPUExecutionProvider": True, "CUDAExecutionProvider": gpu,
                  "TensorrtExecutionProvider": gpu and tensorrt and tensorrt_installed()}
        providers = [p for p in PROVIDER_PREFERENCE if p in available and usable[p]]
    engine_folder = _usable_engine_folder(Path(path), engine_cache) if "TensorrtExecutionProvider" in providers else None
    options = ort.SessionOptions()
    options.log_severity_level = 3   # provider fallbacks are reported by us, once, not as stack traces
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with_options = [(name, _provider_options(name, max_batch, input_size, engine_folder, latency_first, half))
                    for name in providers]
    session = _start_session(ort, path, options, with_options, engine_folder)
    used = session.get_providers()[0]
    # A provider that fails to start is replaced by ONNX Runtime itself: with CUDA and the CPU,
    # but *without* the options asked for (under torchrun every rank then runs on GPU 0), or
    # with the CPU and only a warning. Each next provider is started here, with its options.
    while used != with_options[0][0] and len(with_options) > 1:
        print(f"ONNX Runtime could not start {with_options[0][0]}; trying {with_options[1][0]}", file=sys.stderr)
        with_options = with_options[1:]
        session = _start_session(ort, path, options, with_options, None)
        used = session.get_providers()[0]
    if provider is not None and used != providers[0]:
        raise UserError(f"ONNX Runtime could not start provider {providers[0]} (fell back to {used})")
    if used == "CPUExecutionProvider" and providers[0] != used and not cpu_fallback_ok:
        raise UserError(f"ONNX Runtime could not start {providers[0]} on this GPU machine (its CUDA or cuDNN libraries "
                        "did not load: see the warning above), and the CPU would be far slower: fix the install "
                        "(onnxruntime-gpu's CUDA and cuDNN versions), or pass --provider cpu to run on the CPU")
    return session, used


def _start_session(ort, path: Path | str, options, with_options: list, engine_folder: Path | None):
    try:
        with _engine_builder(engine_folder), stdout_redirected():   # ONNX Runtime's fallback banner: never on stdout
            return ort.InferenceSession(str(path), sess_options=options, providers=with_options)
    except UserError:
        raise
    except Exception as error:  # ONNX Runtime raises its own Fail / InvalidGraph / NoSuchFile types
        raise UserError(f"ONNX Runtime cannot load {path} ({str(error).splitlines()[0]})") from None


class OnnxEncoder:
    """An exported encoder run by ONNX Runtime; its preprocessing comes from the file itself."""

    def __init__(self, path: Path, provider: str | None = None, engine_cache: Path | None = None,
                 latency_first: bool = False):
        self.path = path
        self.metadata = read_encoder_metadata(path)
        self.preprocessing = self.metadata.preprocessing
        self.dim = self.metadata.embedding_dim
        self.session, self.provider = onnx_session(path, provider, input_size=self.preprocessing.input_size,
                                                   engine_cache=engine_cache, latency_first=latency_first,
                                                   half=self.metadata.precision == "fp16")
        self.description = f"ONNX Runtime ({self.provider}) {path}"
        self.on_gpu = self.provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})[0]
