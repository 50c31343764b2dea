"""Image-quality checks: each flags the images degraded its way and leaves a normal picture alone."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import build_pixel_index, invoke
from PIL import Image, ImageEnhance, ImageFilter

from simsiam_embed.explore.quality import picture_quality, structural_damage


def photo(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Smooth shapes with sharp edges and fine texture: what a sharp, well-exposed photo has."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = 110 + 50 * np.sin(x / 23.0 + seed) * np.cos(y / 17.0)
    base = base + rng.normal(0, 12, base.shape)
    base[(x // 40 + y // 40) % 2 == 0] += 35
    pixels = np.stack([base, base * 0.9 + 10, base * 0.8 + 20], axis=-1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **({"quality": 90} if format == "JPEG" else {}))
    return buffer.getvalue()


def garbled(data: bytes, seed: int = 3) -> bytes:
    """Bytes overwritten inside the compressed data, as a bad disk or a broken transfer leaves them."""
    rng = np.random.default_rng(seed)
    data = bytearray(data)
    start = data.find(b"\xff\xda") + 200
    for position in rng.integers(start, len(data) - 200, 16):
        data[position] = int(rng.integers(0, 256))
    return bytes(data)


def failed(data: bytes) -> list[str]:
    return picture_quality(data).failed()


def test_a_normal_photo_passes_every_check():
    assert failed(encoded(photo())) == []
    assert failed(encoded(photo(), "PNG")) == []


@pytest.mark.parametrize("degrade, check", [
    (lambda image: image.filter(ImageFilter.GaussianBlur(4)), "blurry"),
    (lambda image: ImageEnhance.Brightness(image).enhance(0.1), "too dark"),
    (lambda image: ImageEnhance.Brightness(image).enhance(3.0), "too bright"),
    (lambda image: image.resize((48, 36)), "tiny"),
    (lambda image: Image.new("RGB", image.size, (90, 140, 200)), "near-uniform"),
])
def test_each_check_flags_its_own_degradation(degrade, check):
    found = failed(encoded(degrade(photo())))
    assert check in found, found
    quality = picture_quality(encoded(degrade(photo())))
    assert quality.measure(check)   # said in words, with its number


def test_a_dark_photo_is_not_called_blurry():
    """The Laplacian's variance falls with contrast: a dark sharp photo is judged by its own contrast."""
    assert "blurry" not in failed(encoded(ImageEnhance.Brightness(photo()).enhance(0.1)))


def test_damaged_files_that_still_decode_are_flagged():
    png = bytearray(encoded(photo(), "PNG"))
    png[60] ^= 0xFF   # inside the first chunk after the header: its CRC no longer holds
    assert "CRC" in structural_damage(bytes(png))
    jpeg = encoded(photo())
    bad_marker = jpeg[:len(jpeg) // 2] + b"\xff\x99" + jpeg[len(jpeg) // 2 + 2:]
    assert "corrupt compressed data" in structural_damage(bad_marker)
    assert structural_damage(jpeg) == ""
    pytest.importorskip("cv2")   # libjpeg's own complaints come through OpenCV
    assert "Corrupt JPEG data" in structural_damage(garbled(jpeg))
    assert picture_quality(garbled(jpeg)) is not None   # it decodes: the index took it


def test_quality_lists_each_check_from_the_command_line_and_the_api(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(5):
        photo(seed).save(images / f"good-{seed}.jpg", quality=90)
    photo(7).filter(ImageFilter.GaussianBlur(4)).save(images / "blurred.jpg", quality=90)
    ImageEnhance.Brightness(photo(8)).enhance(0.1).save(images / "dark.jpg", quality=90)
    photo(9).resize((40, 30)).save(images / "tiny.png")
    build_pixel_index(images, tmp_path / "index")

    result = invoke("quality", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    by_name = {image["path"].rsplit("/", 1)[1]: image["checks"] for image in answer["flagged"]}
    assert by_name == {"blurred.jpg": ["blurry"], "dark.jpg": ["too dark"], "tiny.png": ["tiny"]}
    assert answer["counts"]["blurry"] == 1 and answer["images"] == 8
    assert (tmp_path / "explore" / "quality.html").is_file()
    listing = invoke("quality", cwd=tmp_path).stdout
    assert "3 of 8 images fail a check" in listing and "too dark: 1 (mean grey level <= 30" in listing

    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    from fastapi.testclient import TestClient

    from simsiam_embed.explore.serve import LOOPBACK_NAMES, create_app

    with TestClient(create_app(tmp_path / "index", None, 1_000_000, LOOPBACK_NAMES), base_url="http://127.0.0.1") as client:
        served = client.get("/api/quality").json()
    assert served["flagged"] == answer["flagged"] and served["checks"]["tiny"].startswith("shorter side")
