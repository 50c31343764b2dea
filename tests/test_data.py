import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from simsiam_embed.images import Preprocessing, collate_skipping_unreadable
from simsiam_embed.image_files import UnreadableImage, discover_images, label_of, open_image, scan_images
from simsiam_embed.training.data import TwoViewDataset, simsiam_augmentation, training_draft_side

from conftest import draw_shape_image, make_awkward_files


def test_discovery_is_recursive_sorted_and_skips_hidden(tmp_path):
    for relative in ["b/2.png", "a/1.JPG", "a/deeper/3.webp", ".hidden/4.png", "a/.5.png", "a/readme.txt"]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in discover_images(tmp_path)]
    assert found == ["a/1.JPG", "a/deeper/3.webp", "b/2.png"]


def test_discovery_survives_a_symlink_loop(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert [p.name for p in discover_images(tmp_path)] == ["1.png"]


def test_labels_come_from_the_parent_folder():
    assert label_of(Path("/x/train/cat/1.png")) == "cat"


def test_awkward_files_load_as_rgb_or_are_refused(tmp_path):
    kinds = make_awkward_files(tmp_path)
    for name, kind in kinds.items():
        if kind == "ok":
            image = open_image(tmp_path / name)
            assert image.mode == "RGB" and image.size == (40, 40), name
        else:
            with pytest.raises(UnreadableImage):
                open_image(tmp_path / name)


def test_scan_rejects_what_it_can_see_from_the_header(tmp_path):
    kinds = make_awkward_files(tmp_path)
    scan = scan_images(discover_images(tmp_path))
    skipped = {path.name for path, _ in scan.skipped}
    # A truncated file has a valid header: only decoding finds it, and the datasets skip it then.
    assert skipped == {name for name, kind in kinds.items() if kind == "bad"} - {"truncated.jpg"}
    assert "bomb.png" in skipped
    assert all(size == (40, 40) for size in scan.sizes[:1])


def test_sixteen_bit_keeps_its_grey_levels(tmp_path):
    ramp = (np.linspace(0, 65535, 64).reshape(8, 8)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = np.asarray(open_image(tmp_path / "ramp.png"))
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255 and len(np.unique(pixels[..., 0])) > 50


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(open_image(tmp_path / "clear.png"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (20, 60)
    assert scan_images([tmp_path / "rotated.jpg"]).sizes == [(20, 60)]
    # Box annotations are drawn on the stored grid, so detection reads it unrotated.
    assert open_image(tmp_path / "rotated.jpg", upright=False).size == (60, 20)


def test_colour_jitter_strength_is_configurable():
    def jitter_of(augment):
        apply = next(t for t in augment.transforms if isinstance(t, T.RandomApply))
        return apply.transforms[0]

    paper = jitter_of(simsiam_augmentation(24, blur=False))
    assert (paper.brightness, paper.contrast, paper.saturation, paper.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    milder = jitter_of(simsiam_augmentation(24, blur=False, color_jitter=0.2))
    assert milder.brightness == pytest.approx((0.8, 1.2)) and milder.hue == pytest.approx((-0.05, 0.05))


def test_draft_decodes_large_jpegs_smaller_but_never_below_the_request(tmp_path):
    draw_shape_image(np.random.default_rng(0), 64, "disc").resize((2000, 1500)).save(tmp_path / "big.jpg")
    full = open_image(tmp_path / "big.jpg")
    drafted = open_image(tmp_path / "big.jpg", draft_side=300)
    assert full.size == (2000, 1500)
    assert drafted.size[0] < 2000 and min(drafted.size) >= 300


def test_training_draft_keeps_the_smallest_crop_at_full_resolution():
    assert training_draft_side(224, 0.2) == 501
    assert training_draft_side(32, 1.0) == 32


def test_two_views_are_reproducible_from_the_sample_seed(tmp_path):
    draw_shape_image(np.random.default_rng(0), 32, "disc").save(tmp_path / "a.png")
    dataset = TwoViewDataset([tmp_path / "a.png"], simsiam_augmentation(16, blur=True))
    (v1, v2), failure = dataset[(123, 0)]
    (w1, w2), _ = dataset[(123, 0)]
    (u1, _), _ = dataset[(124, 0)]
    assert failure == [] and v1.shape == (3, 16, 16)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.equal(v1, v2) and not torch.equal(v1, u1)


def test_unreadable_samples_are_replaced_so_the_batch_keeps_its_size(tmp_path):
    draw_shape_image(np.random.default_rng(0), 32, "disc").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    dataset = TwoViewDataset([tmp_path / "good.png", tmp_path / "bad.png"], simsiam_augmentation(16, blur=False))
    (views, failures) = collate_skipping_unreadable([dataset[(1, 0)], dataset[(2, 1)], dataset[(3, 0)]])
    assert views[0].shape == (3, 3, 16, 16)   # the bad image's place is taken by the next readable one
    assert failures == [(str(tmp_path / "bad.png"), "not an image")]


def test_a_folder_with_nothing_readable_yields_no_sample(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    dataset = TwoViewDataset([tmp_path / "bad.png"], simsiam_augmentation(16, blur=False))
    batch, failures = collate_skipping_unreadable([dataset[(1, 0)]])
    assert batch is None and failures == [(str(tmp_path / "bad.png"), "not an image")]


def test_evaluation_transform_resizes_then_centre_crops():
    large = Preprocessing.for_input_size(224, whole_image=False)
    assert large.resize_size == 256
    tensor = large.transform()(Image.new("RGB", (640, 480)))
    assert tensor.shape == (3, 224, 224)
    small = Preprocessing.for_input_size(28, whole_image=True)
    assert small.resize_size == 28 and small.transform()(Image.new("RGB", (28, 28))).shape == (3, 28, 28)


def test_loader_workers_do_not_hang_on_a_threaded_librarys_garbage(tmp_path):
    """Forked workers used to free a dead ONNX Runtime session (an export's parity check) in
    their first garbage collection and wait forever on its threads: `index` hung after exporting."""
    import subprocess
    import sys

    worker = Path(__file__).with_name("fork_after_onnx_worker.py")
    result = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
