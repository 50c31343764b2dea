"""Colour layouts: dedup's candidates that do not depend on how well the encoder has trained."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance

pytest.importorskip("cv2")

from test_verify import entry, scene  # noqa: E402

from simsiam_embed.explore.analyses import PlainVectors, neighbour_graph  # noqa: E402
from simsiam_embed.explore.layout import (  # noqa: E402
    CACHE_NAME, LAYOUT_DIM, MIRRORED, colour_layout, colour_layouts,
)


def copies_of(original: Image.Image) -> dict[str, Image.Image]:
    width, height = original.size
    return {
        "resize 60%": original.resize((round(width * 0.6), round(height * 0.6)), Image.BICUBIC),
        "centre crop 85%": original.crop((round(width * 0.075), round(height * 0.075),
                                          round(width * 0.925), round(height * 0.925))),
        "brightness +15%": ImageEnhance.Brightness(original).enhance(1.15),
        "mirrored": original.transpose(Image.FLIP_LEFT_RIGHT),
    }


def test_a_copy_s_nearest_layout_is_its_original_s_mirrored_or_not():
    originals = [scene(seed) for seed in range(20)]
    layouts = np.stack([colour_layout(picture) for picture in originals])
    for seed in (3, 11):
        for name, copy in copies_of(originals[seed]).items():
            layout = colour_layout(copy)
            scores = np.maximum(layouts @ layout, layouts[:, MIRRORED] @ layout)
            assert scores.argmax() == seed, name
    mirrored = colour_layout(originals[5].transpose(Image.FLIP_LEFT_RIGHT))
    assert np.allclose(mirrored, layouts[5][MIRRORED], atol=1e-5)


def test_the_neighbour_graph_searches_mirrored_rows_too():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, LAYOUT_DIM)).astype(np.float32)
    vectors[7] = vectors[2][MIRRORED]   # image 7 is image 2 mirrored
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    plain = neighbour_graph(PlainVectors(vectors), 3)
    assert plain.positions[2, 0] != 7
    mirrored = neighbour_graph(PlainVectors(vectors), 3, mirrored=MIRRORED)
    assert mirrored.positions[2, 0] == 7 and mirrored.positions[7, 0] == 2
    assert mirrored.scores[2, 0] == pytest.approx(1.0, abs=1e-5)
    assert len(set(mirrored.positions[2].tolist())) == 3   # each neighbour once, at its better score


def test_layouts_are_cached_by_digest_and_a_tampered_cache_is_ignored(tmp_path):
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"p{seed}.jpg")
        scene(seed).save(paths[-1])
    entries = [entry(path, number) for number, path in enumerate(paths)]
    index = tmp_path / "index"
    index.mkdir()
    first = colour_layouts(entries, index, workers=1)
    assert (index / CACHE_NAME).is_file()
    for path in paths:   # the cache answers now: the files are not read again
        path.unlink()
    assert np.array_equal(colour_layouts(entries, index, workers=1), first)
    np.savez(index / CACHE_NAME, digests=np.array([e.digest for e in entries]),
             layouts=np.full((3, LAYOUT_DIM), 7, dtype=np.float32))   # not unit vectors: not ours
    assert not colour_layouts(entries, index, workers=1).any()   # files gone, cache refused: zero layouts


def test_dedup_finds_a_copy_the_encoder_did_not_pair(tmp_path):
    """A 5-minute encoder is nearly random on photos: a third of the planted copies were not among
    its nearest neighbours, so the geometric check never saw them."""
    from conftest import pixel_identity, write_pixel_onnx

    from simsiam_embed.explore.analyses import find_duplicates
    from simsiam_embed.index.store import load_index, update_index

    images = tmp_path / "images"
    images.mkdir()
    for seed in range(8):
        scene(20 + seed).save(images / f"photo-{seed}.jpg", quality=92)
    copies = copies_of(scene(20))
    copies["mirrored"].save(images / "z-mirrored.jpg", quality=60)
    copies["centre crop 85%"].save(images / "z-cropped.jpg", quality=92)

    class Untrained:
        """Vectors that say nothing about the picture, as a barely trained encoder's nearly do."""

        def __init__(self, onnx):
            from simsiam_embed.inference.onnx_encoder import OnnxEncoder

            inner = OnnxEncoder(onnx)
            self.preprocessing, self.dim, self.description, self.on_gpu = inner.preprocessing, 64, "untrained", False
            self.rng = np.random.default_rng(0)

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            return self.rng.normal(size=(len(batch), self.dim)).astype(np.float32)

    onnx = write_pixel_onnx(tmp_path / "pixels.onnx")
    identity = pixel_identity(onnx)
    update_index(images, Untrained(onnx), type(identity)(identity.kind, identity.path, identity.digest, 64),
                 tmp_path / "index", workers=0, report=lambda _m: None, show_progress=False)
    loaded = load_index(tmp_path / "index", for_search=False)
    family = {str(images / name) for name in ("photo-0.jpg", "z-mirrored.jpg", "z-cropped.jpg")}

    encoder_only = find_duplicates(loaded, geometry=True, layouts=False)
    assert not any({m.path for m in g.members} & family for g in encoder_only.groups)

    heard = []
    found = find_duplicates(loaded, geometry=True, report=heard.append)
    assert [{m.path for m in g.members} for g in found.groups] == [family]
    assert found.confirmed["colour layout"] == 2 and found.confirmed["encoder"] == 0
    assert sum(found.candidates.values()) >= 2
    assert any("more by colour layout" in line for line in heard)
    assert (tmp_path / "index" / CACHE_NAME).is_file()
