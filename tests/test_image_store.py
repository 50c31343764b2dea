"""The decoded-image store: the same pixels as decoding the file, never a stale image, and a
plan that says when it does not fit."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder
from simsiam_embed.image_files import discover_images, open_image
from simsiam_embed.training.augment import AugmentationRecipe, CroppedViews, draw_uncropped_views
from simsiam_embed.training.data import TwoViewDataset, simsiam_augmentation
from simsiam_embed.training.image_store import DecodedImageStore, plan_store


def _photos(folder: Path) -> list[Path]:
    """JPEGs large enough for draft decoding, and PNGs, with real structure."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for number in range(6):
        pixels = (rng.random((300 + 40 * number, 420, 3)) * 255).astype(np.uint8)
        pixels[::7] = 0
        Image.fromarray(pixels).save(folder / f"photo-{number}.jpg", quality=85)
    make_image_folder(folder / "small", per_class=2, size=40)
    return discover_images(folder)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("layout", ["uint8 crops", "uncropped", "per-image"])
def test_a_sample_from_the_store_is_the_sample_from_the_file_bit_for_bit(tmp_path, layout):
    paths = _photos(tmp_path / "images")
    recipe = AugmentationRecipe(64, 0.2, 0.4, True)
    draft = 150
    if layout == "uint8 crops":
        make = dict(pair=CroppedViews(recipe))
    elif layout == "uncropped":
        make = dict(pair=partial(draw_uncropped_views, recipe=recipe))
    else:
        make = dict(augment=simsiam_augmentation(64, blur=True))
    plain = TwoViewDataset(paths, draft_side=draft, **make)
    store = DecodedImageStore(tmp_path / "decoded", draft, capacity_bytes=1 << 30)
    stored = TwoViewDataset(paths, draft_side=draft, store=store, **make)
    keys = [(1000 + i, i) for i in range(len(paths))]
    for epoch in range(2):   # the first fills the store, the second reads it back
        for key in keys:
            assert _same(plain[key][0], stored[key][0]), (epoch, key)
    assert len(list((tmp_path / "decoded").rglob("*.pixels"))) == len(paths)
    # Read back, not decoded again: the entries are what a second epoch used.
    assert store.written_bytes == sum(np.asarray(open_image(p, draft)).nbytes for p in paths)


def test_a_changed_file_is_decoded_again_even_with_its_old_size_and_time(tmp_path):
    path = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    store = DecodedImageStore(tmp_path / "decoded", None, capacity_bytes=1 << 20)
    assert np.asarray(store.load(path))[0, 0].tolist() == [200, 10, 10]
    before = os.stat(path)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(path)   # same size in bytes, other pixels
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size
    assert np.asarray(store.load(path))[0, 0].tolist() == [10, 200, 10]
    assert np.asarray(store.load(path))[0, 0].tolist() == [10, 200, 10]   # now from the store


def _plant(entry: Path, array: np.ndarray, digest_of=None, allow_pickle: bool = False) -> None:
    """An entry as the store writes it (its digest first), or with ``digest_of`` another array's."""
    import hashlib
    import io

    def npy(values):
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=allow_pickle)
        return buffer.getvalue()

    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_bytes(hashlib.sha256(npy(array if digest_of is None else digest_of)).digest() + npy(array))


def test_an_entry_that_is_not_decoded_pixels_is_never_used(tmp_path):
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    store = DecodedImageStore(tmp_path / "decoded", None, capacity_bytes=1 << 20)
    entry = store.entry_path(store.key(path))
    _plant(entry, np.zeros((8, 8), dtype=np.float64))           # a damaged or planted entry
    assert np.asarray(store.load(path))[0, 0].tolist() == [1, 2, 3]
    _plant(entry, np.array([{"a": 1}], dtype=object), allow_pickle=True)   # a pickle: never loaded
    assert np.asarray(store.load(path))[0, 0].tolist() == [1, 2, 3]


def test_an_entry_overwritten_with_other_pixels_is_decoded_again(tmp_path):
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    store = DecodedImageStore(tmp_path / "decoded", None, capacity_bytes=1 << 20)
    store.load(path)
    entry = store.entry_path(store.key(path))
    content = bytearray(entry.read_bytes())
    content[-1] ^= 0xFF   # one pixel changed, digest left as written
    entry.write_bytes(bytes(content))
    assert np.asarray(store.load(path))[7, 7].tolist() == [1, 2, 3]


def test_links_in_the_store_are_never_followed(tmp_path):
    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = DecodedImageStore(tmp_path / "decoded", None, capacity_bytes=1 << 20)
    entry = store.entry_path(store.key(path))
    # An entry that is a link to a valid entry of other pixels: not read.
    _plant(elsewhere / "planted.pixels", np.full((8, 8, 3), 9, dtype=np.uint8))
    entry.parent.mkdir(parents=True)
    entry.symlink_to(elsewhere / "planted.pixels")
    assert np.asarray(store.load(path))[0, 0].tolist() == [1, 2, 3]
    # A sub-folder that is a link: nothing read from it or written into it.
    entry.unlink()
    entry.parent.rmdir()
    entry.parent.symlink_to(elsewhere, target_is_directory=True)
    assert np.asarray(store.load(path))[0, 0].tolist() == [1, 2, 3]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["planted.pixels"]
    # The whole store a link: the plan turns it off, and says why.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "decoded").symlink_to(elsewhere, target_is_directory=True)
    plan = plan_store(100, 300, None, tmp_path / "run" / "decoded", 1 << 34, free_disk_bytes=1 << 40)
    assert plan.capacity_bytes == 0 and "symbolic link" in plan.summary


def test_entries_of_changed_or_removed_images_are_removed_at_a_runs_start(tmp_path):
    paths = []
    for number in range(3):
        paths.append(tmp_path / f"image-{number}.png")
        Image.new("RGB", (8, 8), (number, 2, 3)).save(paths[-1])
    store = DecodedImageStore(tmp_path / "decoded", None, capacity_bytes=1 << 20)
    for path in paths:
        store.load(path)
    Image.new("RGB", (8, 8), (200, 2, 3)).save(paths[0])   # changed: a new key
    paths[1].unlink()                                       # gone
    assert store.remove_stale(paths) == 2
    assert [p.name for p in (tmp_path / "decoded").rglob("*.pixels")] == [store.entry_path(store.key(paths[2])).name]


def test_the_store_stops_at_its_capacity_and_images_are_still_decoded(tmp_path):
    paths = _photos(tmp_path / "images")
    store = DecodedImageStore(tmp_path / "decoded", None, capacity_bytes=1)
    for path in paths:
        assert np.array_equal(np.asarray(store.load(path)), np.asarray(open_image(path)))
    assert len(list((tmp_path / "decoded").rglob("*.pixels"))) == 1   # the first entry, then full


def test_the_plan_says_when_the_store_does_not_fit_or_would_not_pay(tmp_path):
    fits = plan_store(10_000, 96, None, tmp_path / "decoded", memory_bytes=8 << 30, free_disk_bytes=100 << 30)
    assert fits.capacity_bytes >= fits.estimated_bytes and fits.in_memory and "all of 10,000 images" in fits.summary
    # Small pictures decode faster than their stored pixels read back: no store, and the plan says why.
    small = plan_store(10_000, 32, None, tmp_path / "decoded", memory_bytes=8 << 30, free_disk_bytes=100 << 30)
    assert small.capacity_bytes == 0 and "costs less than reading its pixels back" in small.summary
    full = plan_store(1_000_000, 500, 501, tmp_path / "decoded", memory_bytes=8 << 30, free_disk_bytes=(2 << 30) + 1000)
    assert full.capacity_bytes == 0 and "store off" in full.summary
    part = plan_store(1_000_000, 500, 501, tmp_path / "decoded", memory_bytes=8 << 30, free_disk_bytes=200 << 30)
    assert 0 < part.capacity_bytes < part.estimated_bytes and not part.in_memory and "about" in part.summary
