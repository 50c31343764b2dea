"""Shared fixtures: small image folders the tests draw themselves, and the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "fashion-mnist"
CONSOLE_SCRIPT = Path(sys.executable).parent / "simsiam-embed"

# Tiny, fast settings for every training run in the tests (the real defaults are exercised by
# the config tests): a 16 px crop, a batch of 8, no loader processes.
FAST_TRAINING = ["--crop-size", "16", "--batch-size", "8", "--workers", "0", "--projector-hidden-dim", "64",
                 "--dim", "64", "--predictor-hidden-dim", "16", "--log-every", "1"]


def draw_shape_image(rng: np.random.Generator, size: int, shape: str) -> Image.Image:
    """A coloured square, disc or triangle on a random background: images with real structure."""
    background = tuple(int(v) for v in rng.integers(0, 255, 3))
    colour = tuple(int(v) for v in rng.integers(0, 255, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    low, high = sorted(rng.integers(size // 8, size - size // 8, 2))
    high = max(high, low + size // 4)
    if shape == "square":
        draw.rectangle([low, low, high, high], fill=colour)
    elif shape == "disc":
        draw.ellipse([low, low, high, high], fill=colour)
    else:
        draw.polygon([(low, high), (high, high), ((low + high) // 2, low)], fill=colour)
    return image


def make_image_folder(root: Path, per_class: int = 12, size: int = 20, seed: int = 0,
                      classes=("square", "disc", "triangle")) -> Path:
    rng = np.random.default_rng(seed)
    for shape in classes:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            draw_shape_image(rng, size, shape).save(root / shape / f"{shape}-{number:02d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """36 small PNGs in three class folders."""
    return make_image_folder(tmp_path / "images")


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would, in ``cwd``."""
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit, no traceback, and an ``Error:`` line that mentions each fragment."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def make_awkward_files(folder: Path) -> dict[str, str]:
    """Files a real collection contains. Returns name -> "ok" (must load) or "bad" (must be skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    photo = draw_shape_image(rng, 40, "disc")
    kinds: dict[str, str] = {}

    (folder / "zero-bytes.jpg").write_bytes(b"")
    kinds["zero-bytes.jpg"] = "bad"
    (folder / "notes.png").write_text("this is a text file, not an image\n")
    kinds["notes.png"] = "bad"
    (folder / "noise.jpg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    kinds["noise.jpg"] = "bad"
    photo.resize((200, 200)).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    kinds["truncated.jpg"] = "bad"
    # 100 megapixels of 1-bit PNG: a few kB on disk, over PIL's decompression-bomb limit.
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")
    kinds["bomb.png"] = "bad"

    photo.convert("CMYK").save(folder / "cmyk.jpg")
    kinds["cmyk.jpg"] = "ok"
    Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)).save(folder / "sixteen-bit.png")
    kinds["sixteen-bit.png"] = "ok"
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    kinds["alpha.png"] = "ok"
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    kinds["palette.gif"] = "ok"
    photo.convert("L").save(folder / "grey.bmp")
    kinds["grey.bmp"] = "ok"
    photo.save(folder / "upper.JPEG")
    kinds["upper.JPEG"] = "ok"
    photo.save(folder / "tiff.tif")
    kinds["tiff.tif"] = "ok"
    photo.save(folder / "webp.webp")
    kinds["webp.webp"] = "ok"
    return kinds


class PixelEncoder:
    """A stand-in encoder for index tests: each image's mean colour in a 2x2 grid, 12 numbers.

    No network and no model file: index, lock and search mechanics run in milliseconds.
    ``delay_s`` makes each batch slow, so concurrent writers really overlap.
    """

    def __init__(self, delay_s: float = 0.0):
        from simsiam_embed.images import Preprocessing

        self.preprocessing = Preprocessing(input_size=8, resize_size=8)
        self.dim = 12
        self.description = "pixel means (test stand-in)"
        self.on_gpu = False
        self.delay_s = delay_s

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import time

        time.sleep(self.delay_s)
        return images.reshape(len(images), 3, 2, 4, 2, 4).mean(axis=(3, 5)).reshape(len(images), 12) + 3.0


def pixel_identity(model_file: Path, kind: str = "onnx"):
    """An EncoderIdentity for PixelEncoder; ``model_file`` is any file standing for its weights."""
    from simsiam_embed.artefacts import file_digest
    from simsiam_embed.index.store import EncoderIdentity

    return EncoderIdentity(kind, str(model_file), file_digest(model_file), 12)


class CodeRunsIfUnpickled:
    """A pickle payload that creates ``marker`` when unpickled: the attack a received file can carry."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def invoke(*args: str, cwd: Path | None = None):
    """Run the command line in this process (fast, and monkeypatches apply); stdout and stderr apart."""
    from click.testing import CliRunner

    from simsiam_embed.cli.main import cli

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, list(args), catch_exceptions=True)
    finally:
        os.chdir(old)


def assert_one_line_error_in_process(result, *fragments: str) -> None:
    """As assert_one_line_error, for a result of :func:`invoke`."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def write_pixel_onnx(path: Path) -> Path:
    """A real encoder.onnx that computes what PixelEncoder does (each image's mean colour in a
    2x2 grid, 12 numbers), built node by node: milliseconds, where exporting a network takes
    seconds. It carries the metadata `export` writes, so every consumer reads it as an export."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from simsiam_embed.artefacts import ENCODER_METADATA_FORMAT

    shape = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["images", "grid"], ["cells"]),
         helper.make_node("ReduceMean", ["cells"], ["means"], axes=[3, 5], keepdims=0),
         helper.make_node("Reshape", ["means", "flat"], ["flat_means"]),
         helper.make_node("Add", ["flat_means", "offset"], ["embeddings"])],
        "pixel-means",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 12])],
        [shape("grid", [-1, 3, 2, 4, 2, 4]), shape("flat", [-1, 12]),
         helper.make_tensor("offset", TensorProto.FLOAT, [1], [3.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    metadata = {"format": ENCODER_METADATA_FORMAT, "input_size": 8, "resize_size": 8, "interpolation": "bilinear",
                "mean": json.dumps([0.485, 0.456, 0.406]), "std": json.dumps([0.229, 0.224, 0.225]),
                "embedding_dim": 12, "head": "backbone", "precision": "fp32"}
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))
    return path


def build_pixel_index(image_dir: Path, index_dir: Path, encoder_file: Path | None = None):
    """An index of ``image_dir`` made with the pixel-means ONNX encoder (written beside the
    index unless given): a real index folder, searchable by upload, in well under a second."""
    from simsiam_embed.inference.onnx_encoder import OnnxEncoder
    from simsiam_embed.index.store import update_index

    encoder_file = encoder_file or write_pixel_onnx(index_dir.parent / "pixel-encoder.onnx")
    return update_index(image_dir, OnnxEncoder(encoder_file), pixel_identity(encoder_file), index_dir,
                        workers=0, report=lambda _message: None, show_progress=False)


def distinct_images(folder: Path, count: int, seed: int = 5, size: int = 32) -> list[Path]:
    """Images of four random colour quadrants: far apart for the tests' pixel-means encoder (with
    seed 5 the closest two of the first 40 are at centred cosine 0.79, below the dedup threshold)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    half = size // 2
    for number in range(count):
        image = Image.new("RGB", (size, size))
        for x, y in ((0, 0), (half, 0), (0, half), (half, half)):
            image.paste(tuple(int(v) for v in rng.integers(0, 256, 3)), (x, y, x + half, y + half))
        path = folder / f"image-{number:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def indexed_folder_with_a_copy(root: Path, count: int) -> list[Path]:
    """``count`` distinct images under ``root/images`` plus a byte copy of the first
    (``copy-of-first.png``), indexed into ``root/index``; returns the distinct images."""
    import shutil

    paths = distinct_images(root / "images", count)
    shutil.copyfile(paths[0], root / "images" / "copy-of-first.png")
    build_pixel_index(root / "images", root / "index")
    return paths
