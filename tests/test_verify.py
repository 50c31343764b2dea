"""Geometric verification of duplicate candidates: copies under flips, crops, rotation,
rescaling and re-encoding share one transform's keypoints; a different picture does not."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

pytest.importorskip("cv2", reason="OpenCV (the [dedup] extra, in [dev]) is not installed")

from simsiam_embed.explore.verify import MIN_INLIERS, PictureFeatures, extract_features, match  # noqa: E402
from simsiam_embed.index.catalog import CatalogEntry  # noqa: E402


def scene(seed: int, size: tuple[int, int] = (360, 270)) -> Image.Image:
    """A photo-like picture: many overlapping shapes and strokes, corners everywhere."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(120):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = (int(v) for v in rng.integers(6, 60, 2))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        [draw.rectangle, draw.ellipse][int(rng.integers(0, 2))]([x, y, x + w, y + h], fill=colour)
        draw.line([x, y, x + int(rng.integers(-80, 80)), y + int(rng.integers(-80, 80))], fill=colour, width=2)
    return image


def entry(path: Path, number: int) -> CatalogEntry:
    data = path.read_bytes()
    return CatalogEntry(number, str(path), len(data), 0, "", hashlib.sha256(data).hexdigest())


def edited(tmp_path: Path) -> dict[str, Path]:
    original = scene(1)
    made = {
        "original": original,
        "mirrored + jpeg q60": original.transpose(Image.FLIP_LEFT_RIGHT),
        "centre crop 85%": original.crop((27, 20, 333, 250)),
        "rotate 5 deg": original.rotate(5, resample=Image.BICUBIC),
        "resize 60%": original.resize((216, 162), Image.BICUBIC),
        "another picture": scene(2),
    }
    paths = {}
    for name, image in made.items():
        path = tmp_path / f"{name.replace(' ', '-').replace('%', '').replace('+', '')}.jpg"
        image.save(path, quality=60 if "jpeg" in name else 92)
        paths[name] = path
    return paths


def test_copies_match_under_one_transform_and_another_picture_does_not(tmp_path):
    paths = edited(tmp_path)
    features = dict(zip(paths, extract_features([entry(p, i) for i, p in enumerate(paths.values())], workers=1)))
    original = features["original"]
    for name in ("mirrored + jpeg q60", "centre crop 85%", "rotate 5 deg", "resize 60%"):
        found = match(original, features[name])
        assert found is not None and found.is_copy, (name, found)
        assert found.mirrored == (name.startswith("mirrored")), name
    other = match(original, features["another picture"])
    assert other is None or not other.is_copy, other


def shots_of_one_scene(tmp_path: Path) -> dict[str, PictureFeatures]:
    background = scene(1, (480, 360))

    def in_front(subject: Image.Image, at: tuple[int, int]) -> Image.Image:
        picture = background.copy()
        picture.paste(subject, at)
        return picture

    made = {
        # Panned: the left and right 60%, a third of each in common.
        "left": background.crop((0, 0, 288, 360)), "right": background.crop((192, 0, 480, 360)),
        # Another subject in front of the same background, over half of it.
        "one subject": in_front(scene(2, (340, 255)), (70, 52)),
        "another subject": in_front(scene(3, (340, 255)), (70, 52)),
        # Two frames of a burst: the same subject, moved.
        "frame 1": in_front(scene(4, (200, 150)), (100, 80)), "frame 2": in_front(scene(4, (200, 150)), (150, 110)),
    }
    paths = []
    for number, picture in enumerate(made.values()):
        paths.append(tmp_path / f"shot-{number}.jpg")
        picture.save(paths[-1], quality=90)
    return dict(zip(made, extract_features([entry(p, n) for n, p in enumerate(paths)], workers=1)))


def test_two_shots_of_one_scene_share_keypoints_but_are_not_copies(tmp_path):
    """A count of inliers confirmed different motorbikes on white and different cars in one
    street (28-49 inliers). A copy also lays each picture over most of the other, and there
    the two agree in their detail."""
    shots = shots_of_one_scene(tmp_path)
    panned = match(shots["left"], shots["right"])
    assert panned.inliers >= MIN_INLIERS and panned.overlap < 0.4 and not panned.is_copy, panned
    subjects = match(shots["one subject"], shots["another subject"])
    assert subjects.inliers >= MIN_INLIERS and subjects.overlap > 0.95 and not subjects.is_copy, subjects
    assert "overlap" in subjects.describe() and "agrees" in subjects.describe()


def test_two_frames_of_a_burst_are_a_copy_though_the_subject_moved(tmp_path):
    """The raccoon set's frames 186 and 199 are one: the background agrees under one transform,
    the subject under another."""
    shots = shots_of_one_scene(tmp_path)
    assert match(shots["frame 1"], shots["frame 2"]).is_copy


def test_a_small_soft_copy_gets_keypoints_enough_to_be_confirmed(tmp_path):
    """Copies of small photos went unjudged: ORB found 27 keypoints on a 120 x 80 copy of a soft
    picture (a 60% resize of a 300 x 200 photo left one in 30 so). Enlarged first, it has enough."""
    original = scene(5, (300, 200)).filter(ImageFilter.GaussianBlur(2))
    original.save(tmp_path / "original.jpg", quality=90)
    original.resize((120, 80), Image.BICUBIC).save(tmp_path / "copy.jpg", quality=90)
    first, second = extract_features([entry(tmp_path / "original.jpg", 0), entry(tmp_path / "copy.jpg", 1)], workers=1)
    assert second.verifiable, len(second.plain.points) if second.plain else None
    assert match(first, second).is_copy


def test_the_mirror_is_tried_only_when_the_plain_match_is_no_copy(tmp_path, monkeypatch):
    """A match costs as much as a picture's features: an unmirrored copy (most copies) is
    confirmed by the plain match alone; a mirrored copy and another picture take both."""
    from simsiam_embed.explore import verify

    paths = edited(tmp_path)
    features = dict(zip(paths, extract_features([entry(p, i) for i, p in enumerate(paths.values())], workers=1)))
    calls = []
    counted = verify._inliers
    monkeypatch.setattr(verify, "_inliers", lambda first, second: calls.append(1) or counted(first, second))
    for name, expected in (("centre crop 85%", 1), ("mirrored + jpeg q60", 2), ("another picture", 2)):
        calls.clear()
        match(features["original"], features[name])
        assert len(calls) == expected, name


def test_a_file_changed_since_indexing_and_a_small_picture_are_not_verified(tmp_path):
    paths = edited(tmp_path)
    changed = entry(paths["original"], 0)
    paths["original"].write_bytes(paths["original"].read_bytes() + b"\0")
    small = tmp_path / "small.png"
    scene(3, (48, 40)).save(small)
    gone, tiny = extract_features([changed, entry(small, 1)], workers=1)
    assert gone is None and tiny.small


def test_dedup_groups_a_mirrored_copy_and_says_how_it_was_confirmed(tmp_path):
    """dedup found 3 of 10 mirrored copies: the pixel check rejected what the encoder paired."""
    from conftest import write_pixel_onnx

    from simsiam_embed.explore.analyses import find_duplicates
    from simsiam_embed.index.store import load_index, update_index

    images = tmp_path / "images"
    images.mkdir()
    for seed in range(6):
        scene(10 + seed).save(images / f"photo-{seed}.jpg", quality=92)
    scene(10).transpose(Image.FLIP_LEFT_RIGHT).save(images / "z-mirrored.jpg", quality=60)
    shutil.copyfile(images / "photo-3.jpg", images / "z-exact.jpg")

    class FlipInvariant:
        """The pixel-means encoder made blind to mirroring, as SimSiam's training makes a network."""

        def __init__(self, onnx: Path):
            from simsiam_embed.inference.onnx_encoder import OnnxEncoder

            self.inner = OnnxEncoder(onnx)
            self.preprocessing, self.dim, self.description = self.inner.preprocessing, self.inner.dim, "flip-blind"
            self.on_gpu = False

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            return self.inner(batch) + self.inner(np.ascontiguousarray(batch[..., ::-1]))

    from conftest import pixel_identity

    onnx = write_pixel_onnx(tmp_path / "pixels.onnx")
    update_index(images, FlipInvariant(onnx), pixel_identity(onnx), tmp_path / "index", workers=0,
                 report=lambda _m: None, show_progress=False)
    loaded = load_index(tmp_path / "index", for_search=False)
    before = find_duplicates(loaded, geometry=False)
    after = find_duplicates(loaded, geometry=True)
    mirrored = {str(images / "photo-0.jpg"), str(images / "z-mirrored.jpg")}
    assert mirrored not in [{m.path for m in g.members} for g in before.groups]   # the pixel check's miss
    groups = {frozenset(m.path for m in g.members): g for g in after.groups}
    assert frozenset(mirrored) in groups
    assert any(e.startswith("geometry:") and e.endswith("mirrored") for e in groups[frozenset(mirrored)].evidence)
    exact = groups[frozenset({str(images / "photo-3.jpg"), str(images / "z-exact.jpg")})]
    assert exact.evidence == ["bytes"]
    assert len(after.groups) == 2   # the other photos stay apart


def test_features_come_from_worker_processes_in_a_process_that_has_threads(tmp_path):
    """Forked workers of a process with FAISS's and ONNX Runtime's threads slept for ever."""
    import faiss
    import torch

    torch.ones(64, 64) @ torch.ones(64, 64)   # the parent's thread pools exist, as in `dedup`
    faiss.IndexFlatIP(8).search(np.zeros((4, 8), dtype=np.float32), 1)
    paths = edited(tmp_path)
    entries = [entry(p, i) for i, p in enumerate(paths.values())] * 2
    found = extract_features(entries, workers=2)
    assert len(found) == len(entries) and all(f is not None and f.verifiable for f in found)


def test_a_verifier_worker_reads_pictures_without_torch_or_faiss(tmp_path):
    """The workers are spawned fresh: what they import is what each one pays, before any
    picture, in start-up time and memory. torch and FAISS took ~4 s and ~650 MB a worker."""
    import subprocess
    import sys

    scene(3).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    script = (
        "import sys\n"
        "from types import SimpleNamespace\n"
        "from simsiam_embed.explore.verify import _features_of\n"
        f"found = _features_of(SimpleNamespace(path={str(tmp_path / 'a.jpg')!r}, "
        f"digest={hashlib.sha256(data).hexdigest()!r}))\n"
        "assert found is not None and found.verifiable, found\n"
        "print(sorted(name for name in ('torch', 'faiss', 'torchvision', 'onnxruntime') if name in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
