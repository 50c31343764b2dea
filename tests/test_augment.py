"""The batched device augmentations against torchvision's own per-image operations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from simsiam_embed.training.augment import (
    BLUR, BLUR_TAPS, BRIGHTNESS, GRAYSCALE, HUE, JITTER, ORDER, SIGMA, AugmentationRecipe, BatchAugment, draw_view,
)
from simsiam_embed.images import IMAGENET_MEAN, IMAGENET_STD

#: Largest difference allowed from torchvision, after normalisation (float32 rounding, /std ~4.5x).
MAX_DIFFERENCE = 2e-5


def torchvision_reference(view: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
    """One view through torchvision.transforms.functional, in the order its parameters say."""
    image = view.float() / 255.0
    if parameters[JITTER] > 0.5:
        for operation_id in parameters[ORDER:ORDER + 4].long().tolist():
            factor = float(parameters[BRIGHTNESS + operation_id])
            image = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[operation_id](
                image, factor)
    if parameters[GRAYSCALE] > 0.5:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if parameters[BLUR] > 0.5:
        sigma = float(parameters[SIGMA])
        image = TF.gaussian_blur(image, [BLUR_TAPS, BLUR_TAPS], [sigma, sigma])
    return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("crop_size", [16, 40])
def test_the_batched_operations_match_torchvision_per_image(crop_size):
    generator = torch.Generator().manual_seed(0)
    count = 64
    views = torch.randint(0, 256, (count, 3, crop_size, crop_size), dtype=torch.uint8, generator=generator)
    views[0] = 128   # a flat grey view: hue and saturation are undefined there
    recipe = AugmentationRecipe(crop_size, color_jitter=0.4, blur=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    torch.manual_seed(1)
    parameters = torch.stack([draw_view(image, recipe)[1] for _ in range(count)])
    parameters[:, JITTER] = torch.arange(count) % 4 != 0   # most jittered, some not
    batched = BatchAugment(recipe, "cpu")(views, parameters)
    reference = torch.stack([torchvision_reference(views[i], parameters[i]) for i in range(count)])
    assert batched.shape == reference.shape == (count, 3, crop_size, crop_size)
    assert (batched - reference).abs().max().item() <= MAX_DIFFERENCE


def test_views_are_drawn_as_the_paper_draws_them():
    recipe = AugmentationRecipe(24, min_crop_scale=0.2, color_jitter=0.4, blur=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    torch.manual_seed(0)
    draws = [draw_view(image, recipe) for _ in range(2000)]
    views = torch.stack([view for view, _ in draws])
    parameters = torch.stack([p for _, p in draws])
    assert views.dtype == torch.uint8 and views.shape[1:] == (3, 24, 24)
    assert abs(parameters[:, JITTER].mean().item() - 0.8) < 0.03
    assert abs(parameters[:, GRAYSCALE].mean().item() - 0.2) < 0.03
    assert abs(parameters[:, BLUR].mean().item() - 0.5) < 0.03
    assert parameters[:, BRIGHTNESS:HUE].min() >= 0.6 and parameters[:, BRIGHTNESS:HUE].max() <= 1.4
    assert parameters[:, HUE].abs().max() <= 0.1 and parameters[:, SIGMA].min() >= 0.1
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in parameters[:, ORDER:ORDER + 4].long())
    no_blur = AugmentationRecipe(24, blur=False)
    assert all(draw_view(image, no_blur)[1][BLUR] == 0 for _ in range(50))


def test_the_crop_boxes_are_torchvisions():
    """The same distribution of boxes as RandomResizedCrop.get_params (area share and aspect
    ratio in range, the position uniform), and its centre crop where ten attempts miss."""
    from torchvision import transforms as T

    from simsiam_embed.training.augment import _plan_view

    recipe = AugmentationRecipe(24, min_crop_scale=0.2)
    image = Image.new("RGB", (64, 48))
    generator = torch.Generator().manual_seed(0)
    ours = torch.tensor([_plan_view(image, recipe, generator)[0] for _ in range(4000)], dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)],
                          dtype=torch.float64)
    for boxes in (ours, theirs):
        top, left, height, width = boxes.unbind(1)
        assert ((height * width / (64 * 48) >= 0.19) & (top + height <= 48) & (left + width <= 64)).all()
    # Mean top, left, height and width agree within sampling error (~1% of the side).
    assert (ours.mean(0) - theirs.mean(0)).abs().max() < 0.7
    assert (ours.std(0) - theirs.std(0)).abs().max() < 0.7
    long_image = Image.new("RGB", (1000, 10))   # no crop of >= 20% fits at 3/4..4/3: the centre fallback
    assert _plan_view(long_image, recipe, generator)[0] == T.RandomResizedCrop.get_params(long_image, (0.2, 1.0),
                                                                                            (3 / 4, 4 / 3))


def test_a_sample_is_drawn_from_its_own_generator_never_the_global_one(tmp_path):
    """The dataset seeds a generator of the sample's own: its views depend on the sample's seed
    only, and training's other random draws (the global generator) are left as they were."""
    from simsiam_embed.training.augment import CroppedViews
    from simsiam_embed.training.data import TwoViewDataset

    recipe = AugmentationRecipe(24)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    dataset = TwoViewDataset([tmp_path / "a.png"], pair=CroppedViews(recipe))
    torch.manual_seed(1)
    first, _ = dataset[(42, 0)]
    after_first = torch.rand(1)
    torch.manual_seed(2)
    again, _ = dataset[(42, 0)]
    other, _ = dataset[(43, 0)]
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first)   # the global generator did not move
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])


def test_a_view_is_reproducible_from_its_seed():
    recipe = AugmentationRecipe(24)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    torch.manual_seed(5)
    first = draw_view(image, recipe)
    torch.manual_seed(5)
    again = draw_view(image, recipe)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_crops_made_on_the_device_are_torchvisions_resized_crops():
    """The crop-on-device path: the worker decodes and plans, the device crops, resizes, flips."""
    from simsiam_embed.training.augment import crop_on_device, draw_uncropped_views, stack_uncropped

    recipe = AugmentationRecipe(24)
    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40 + seed, 64, 3), dtype=np.uint8))
              for seed in range(3)]
    torch.manual_seed(0)
    samples = [draw_uncropped_views(image, recipe) for image in images]
    groups, boxes, flips, parameters = stack_uncropped(samples)
    views = crop_on_device(groups, boxes, flips, 24, "cpu")
    assert views.shape == (6, 3, 24, 24) and parameters.shape == (3, 2, 12)
    tensors = [sample[0] for sample in samples]
    for number in range(2):
        for sample, tensor in enumerate(tensors):
            top, left, height, width = boxes[sample, number].tolist()
            expected = TF.resized_crop(tensor.float(), top, left, height, width, [24, 24], antialias=True)
            expected = expected.flip(-1) if flips[sample, number] else expected
            assert torch.allclose(views[number * 3 + sample], expected, atol=1e-3)
    # The same draws as the worker-side crops: the same boxes, flips and colour parameters.
    torch.manual_seed(0)
    first_view = draw_view(images[0], recipe)
    assert torch.equal(first_view[1], parameters[0, 0])


def _torchvision_views(images, boxes, flips, size):
    expected = []
    for number in range(2):
        for image, sample_boxes, sample_flips in zip(images, boxes, flips):
            top, left, height, width = sample_boxes[number].tolist()
            view = TF.resized_crop(image.float(), top, left, height, width, [size, size], antialias=True)
            expected.append(view.flip(-1) if sample_flips[number] else view)
    return torch.stack(expected)


@pytest.mark.parametrize("group_bytes", [1, 40_000, 1 << 30])   # a group per image, a few, one
def test_batched_crops_equal_torchvisions_for_any_box_size_and_grouping(group_bytes, monkeypatch):
    """Shrinking (antialiased) and enlarging crops, whole images, one-pixel strips at the edges,
    flips, images of many sizes padded together: within 1e-3 of 255 of torchvision's crop."""
    import simsiam_embed.training.augment as augment
    from simsiam_embed.training.augment import crop_on_device, stack_uncropped

    monkeypatch.setattr(augment, "CROP_GROUP_BYTES", group_bytes)
    rng = np.random.default_rng(3)
    shapes = [(40, 64), (64, 40), (13, 9), (40, 64), (100, 75), (24, 24), (7, 31)]
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in shapes]
    boxes, flips = [], []
    for number, (h, w) in enumerate(shapes):
        whole, strip = (0, 0, h, w), (h - 1, 0, 1, w) if number % 2 else (0, w - 1, h, 1)
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        inner = (top, left, int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1)))
        boxes.append(torch.tensor([whole if number < 3 else inner, strip if number < 5 else inner]))
        flips.append(torch.tensor([number % 2 == 0, number % 3 == 0]))
    samples = [(image, box, flip, torch.zeros(2, 12)) for image, box, flip in zip(images, boxes, flips)]
    groups, stacked_boxes, stacked_flips, _ = stack_uncropped(samples)
    assert (len(groups) == 7) if group_bytes == 1 else (len(groups) == 1) if group_bytes == 1 << 30 else 1 < len(groups) < 7
    views = crop_on_device(groups, stacked_boxes, stacked_flips, 24, "cpu")
    expected = _torchvision_views(images, boxes, flips, 24)
    assert (views - expected).abs().max() < 1e-3


def test_a_batch_is_cropped_in_the_same_few_operations_whatever_its_size():
    """A resize and a flip per view (about 1,024 launches a step at batch 512, each a device
    round trip from Python) became two batched products a group: counted as ATen operations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from simsiam_embed.training.augment import crop_on_device, stack_uncropped

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.operations = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operations += 1
            return func(*args, **(kwargs or {}))

    def operations(batch: int) -> int:
        samples = [(torch.zeros(3, 40, 30, dtype=torch.uint8), torch.tensor([[0, 0, 40, 30], [5, 5, 20, 20]]),
                    torch.tensor([True, False]), torch.zeros(2, 12)) for _ in range(batch)]
        groups, boxes, flips, _ = stack_uncropped(samples)
        with Count() as count:
            crop_on_device(groups, boxes, flips, 16, "cpu")
        return count.operations

    assert operations(64) == operations(4) < 150


def test_batched_crops_copy_to_the_device_once_a_step_and_once_a_group_of_pixels(monkeypatch):
    """Each group's boxes, flips and indices went to the GPU in blocking copies of their own: 3
    host-device round trips a group. Counted as the Tensor.to calls a step makes."""
    from torch.overrides import TorchFunctionMode

    import simsiam_embed.training.augment as augment
    from simsiam_embed.training.augment import crop_on_device, stack_uncropped

    class CountCopies(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.copies = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            to_a_device = any(isinstance(arg, (str, torch.device)) for arg in args[1:]) or "device" in kwargs
            self.copies += func is torch.Tensor.to and to_a_device   # not the dtype conversions
            return func(*args, **kwargs)

    monkeypatch.setattr(augment, "CROP_GROUP_BYTES", 3 * 40 * 30 * 4 * 4)   # groups of 4 images
    samples = [(torch.zeros(3, 40, 30, dtype=torch.uint8), torch.tensor([[0, 0, 40, 30], [5, 5, 20, 20]]),
                torch.tensor([True, False]), torch.zeros(2, 12)) for _ in range(16)]
    groups, boxes, flips, _ = stack_uncropped(samples)
    assert len(groups) == 4
    with CountCopies() as count:
        crop_on_device(groups, boxes, flips, 16, "cpu")
    assert count.copies == 3 + len(groups)   # boxes, flips, all the groups' indices: once each; then each group's pixels


def test_small_views_leave_the_full_views_as_they_were_and_crop_smaller_shares():
    """A sample's two full views are the same with or without multi-crop (the small ones are
    drawn after them), and the small views are smaller crops of a smaller share of the image."""
    from simsiam_embed.training.augment import MultiCropViews, small_view_recipe

    recipe = AugmentationRecipe(24, min_crop_scale=0.2)
    small = small_view_recipe(recipe, 10)
    assert (small.crop_size, small.min_crop_scale, small.max_crop_scale) == (10, 0.05, 0.2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    torch.manual_seed(7)
    plain = draw_view(image, recipe), draw_view(image, recipe)
    torch.manual_seed(7)
    view1, view2, (small_crops, small_parameters) = MultiCropViews(recipe, small, 4)(image)
    assert torch.equal(view1[0], plain[0][0]) and torch.equal(view2[1], plain[1][1])
    assert small_crops.shape == (4, 3, 10, 10) and small_parameters.shape == (4, 12)
    assert small_crops.dtype == torch.uint8 and not torch.equal(small_crops[0], small_crops[1])

    # The boxes: SwAV's small share of the area, never more than the full views' smallest.
    from torchvision import transforms as T
    torch.manual_seed(0)
    areas = [h * w / (48 * 64) for _, _, h, w in
             (T.RandomResizedCrop.get_params(image, (small.min_crop_scale, small.max_crop_scale), (3 / 4, 4 / 3))
              for _ in range(500))]
    assert 0.04 <= min(areas) and max(areas) <= 0.21
