"""The paper's augmentations (Section 4.1, from MoCo v2), split where the work is cheapest.

    >>> recipe = AugmentationRecipe(crop_size=224, min_crop_scale=0.2, color_jitter=0.4, blur=True)
    >>> view, parameters = draw_view(image, recipe, generator) # in a loader worker: uint8 + 12 numbers
    >>> batch = BatchAugment(recipe, "cuda")(views, parameters) # on the training device, batched

A loader worker decodes, crops and flips (uint8: a quarter of float32's bytes in flight) and
draws each view's random parameters as torchvision draws them: the same distributions, and the
same order of operations (a random order of brightness, contrast, saturation and hue with
p=0.8, grayscale with p=0.2, blur with p=0.5 and sigma in [0.1, 2]). Colour jitter, grayscale,
blur and normalisation then run on the whole batch on the training device, where they cost a
fraction of the per-image PIL work they replace (bench/RESULTS.md).

The parameters come from a generator of the sample's own, seeded with the sample's seed, so a
view is reproducible wherever and whenever it is made. Each view takes all its random numbers in
one draw (:data:`DRAWS` uniforms) and maps them to the crop, the flip and the colour parameters:
seeding torch's global generator and drawing ~15 scalars one call at a time cost ~0.5 ms a
sample on a CPU, more than decoding a small image (bench/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from simsiam_embed.images import IMAGENET_MEAN, IMAGENET_STD

# The layout of a view's parameter vector.
JITTER, ORDER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAYSCALE, BLUR, SIGMA = 0, 1, 5, 6, 7, 8, 9, 10, 11
PARAMETER_COUNT = 12
#: Probabilities of the paper's recipe (MoCo v2's augmentation).
P_JITTER, P_GRAYSCALE, P_BLUR = 0.8, 0.2, 0.5
SIGMA_RANGE = (0.1, 2.0)
#: Multi-crop: the smallest area share of a small view (SwAV's).
SMALL_VIEW_MIN_SCALE = 0.05
#: Taps of the blur kernel: +-3 sigma at the largest sigma, so the truncated Gaussian keeps 99.7%.
BLUR_TAPS = 2 * math.ceil(3 * SIGMA_RANGE[1]) + 1


@dataclass(frozen=True)
class AugmentationRecipe:
    crop_size: int
    min_crop_scale: float = 0.2
    max_crop_scale: float = 1.0
    color_jitter: float = 0.4   # brightness, contrast and saturation strength; hue is a quarter of it
    blur: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def draw_view(image: Image.Image, recipe: AugmentationRecipe,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One view's crop (uint8, 3 x crop x crop, flipped or not) and its colour parameters, drawn
    from ``generator`` (torch's global one when None)."""
    box, parameters, flip = _plan_view(image, recipe, generator)
    crop = TF.resized_crop(image, *box, [recipe.crop_size, recipe.crop_size])
    return TF.pil_to_tensor(TF.hflip(crop) if flip else crop), parameters


class CroppedViews:
    """A sample's two views (:func:`draw_view`), both from the sample's generator."""

    def __init__(self, recipe: AugmentationRecipe):
        self.recipe = recipe

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> tuple:
        return draw_view(image, self.recipe, generator), draw_view(image, self.recipe, generator)


def small_view_recipe(recipe: AugmentationRecipe, crop_size: int) -> AugmentationRecipe:
    """The recipe of multi-crop's small views: SwAV's, scaled to this recipe. SwAV pairs full
    crops of (0.14, 1) of the area at 224 px with small ones of (0.05, 0.14) at 96 px; here the
    small ones cover (0.05, the full views' smallest share), at ``crop_size``."""
    smallest = min(SMALL_VIEW_MIN_SCALE, recipe.min_crop_scale)
    return dataclasses.replace(recipe, crop_size=crop_size, min_crop_scale=smallest, max_crop_scale=recipe.min_crop_scale)


class MultiCropViews:
    """A sample of multi-crop: two full views (:func:`draw_view`, drawn first, so a sample's full
    views are the ones it has without small views) and ``count`` small views, stacked."""

    def __init__(self, recipe: AugmentationRecipe, small_recipe: AugmentationRecipe, count: int):
        self.recipe, self.small_recipe, self.count = recipe, small_recipe, count

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> tuple:
        full = draw_view(image, self.recipe, generator), draw_view(image, self.recipe, generator)
        crops, parameters = zip(*(draw_view(image, self.small_recipe, generator) for _ in range(self.count)))
        return (*full, (torch.stack(crops), torch.stack(parameters)))


def draw_uncropped_views(image: Image.Image, recipe: AugmentationRecipe,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Both views' plans, for cropping on the device: the image (uint8, 3 x H x W, decoded once),
    each view's crop box (top, left, height, width), flip and colour parameters.

    The same draws as two :func:`draw_view` calls, so either path makes the same views (up to
    the resampling: PIL's antialiased bilinear here, torch's there)."""
    plans = [_plan_view(image, recipe, generator) for _ in range(2)]
    boxes = torch.tensor([box for box, _, _ in plans], dtype=torch.int64)
    flips = torch.tensor([flip for _, _, flip in plans], dtype=torch.bool)
    return TF.pil_to_tensor(image), boxes, flips, torch.stack([parameters for _, parameters, _ in plans])


class PaddedImages(NamedTuple):
    """Decoded images of similar sizes, zero-padded into one uint8 tensor (n x 3 x H x W), and
    their places in the batch."""
    numbers: torch.Tensor
    images: torch.Tensor


#: A group of padded images, as float32 on the device, stays under this (the half-resized views
#: take about as much again): a batch of 256 photos at 500 x 375 comes in three groups.
CROP_GROUP_BYTES = 256 * 2**20


def stack_uncropped(samples: list[tuple[torch.Tensor, ...]]) -> tuple:
    """Collate :func:`draw_uncropped_views` samples, in the loader's worker: images differ in
    size, so those of similar sizes are padded together (:class:`PaddedImages`, sorted by size
    and cut at CROP_GROUP_BYTES); a batch then reaches the device in a few copies, not one per
    image."""
    images, boxes, flips, parameters = zip(*samples)
    groups = []
    for numbers in _groups_of_similar_size(images):
        height = max(images[number].shape[1] for number in numbers)
        width = max(images[number].shape[2] for number in numbers)
        padded = torch.zeros(len(numbers), 3, height, width, dtype=torch.uint8)
        for slot, number in enumerate(numbers):
            padded[slot, :, :images[number].shape[1], :images[number].shape[2]] = images[number]
        groups.append(PaddedImages(torch.tensor(numbers), padded))
    return groups, torch.stack(boxes), torch.stack(flips), torch.stack(parameters)


def _groups_of_similar_size(images: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: list[list[int]] = []
    height = width = 0
    for number in sorted(range(len(images)), key=lambda number: tuple(images[number].shape[1:])):
        image_height, image_width = images[number].shape[1:]
        grown = (max(height, image_height), max(width, image_width))
        if groups and (len(groups[-1]) + 1) * 3 * 4 * grown[0] * grown[1] <= CROP_GROUP_BYTES:
            groups[-1].append(number)
            height, width = grown
        else:
            groups.append([number])
            height, width = image_height, image_width
    return groups


def crop_on_device(groups: list[PaddedImages], boxes: torch.Tensor, flips: torch.Tensor, size: int,
                   device: str | torch.device) -> torch.Tensor:
    """The views of :func:`draw_uncropped_views` samples collated by :func:`stack_uncropped`,
    cropped and resized on ``device``.

    Returns 2N views (every sample's first view, then every sample's second) as float in
    [0, 255]: torchvision's tensor ``resized_crop`` (bilinear, antialiased) without its rounding.

    An antialiased bilinear resize is separable and linear: a view is ``rows @ image @ columns.T``
    with one weight matrix per axis (:func:`resize_weights`), the crop and the flip folded into
    them (padding gets zero weight). So the views of a group of images are two batched matrix
    products: a few dozen kernel launches a group where a resize and a flip per view made about
    1,024 a step at batch 512, each a Python round trip. The products do dense work a per-view
    resize skips (about 200 GFLOP a step at batch 256 on 500 x 375 photos: milliseconds on a
    GPU, and 13x the per-view loop's time on a 2-core CPU, bench/RESULTS.md), so settings choose
    this path on GPUs only. The tests compare the views with torchvision's crop (within 1e-3 of 255 on small
    images, 0.005 at 500 x 375 -> 224, float32's summation order); on a GPU whose float32 matmuls
    use TF32 they may differ by about 0.1 of a grey level, inside the uint8 rounding a decoded
    crop carries anyway.
    """
    views = torch.empty(2, len(boxes), 3, size, size, device=device)
    # Every copy to the device is asynchronous, and the small ones are made once a step, not once
    # a group: the loader hands the batch over in pinned memory, so the host queues the copies
    # and the products and never waits for the GPU (a blocking copy of each group's boxes,
    # flips and indices made 3 host-device round trips a group; bench/gpu_check.py runs this
    # under CUDA's sync debug mode).
    boxes_on_device = boxes.to(device, non_blocking=True)              # (N, 2, 4): top, left, height, width
    flips_on_device = flips.to(device, non_blocking=True)
    every_number = torch.cat([numbers for numbers, _ in groups])
    if torch.device(device).type == "cuda":
        every_number = every_number.pin_memory()   # made here, not by the loader; PyTorch caches pinned blocks
    numbers_by_group = every_number.to(device, non_blocking=True).split([len(numbers) for numbers, _ in groups])
    for (_, padded), numbers in zip(groups, numbers_by_group):
        padded = padded.to(device, non_blocking=True).float()
        group_boxes = boxes_on_device[numbers]
        rows = resize_weights(group_boxes[..., 0], group_boxes[..., 2], size, padded.shape[2])     # (n, 2, size, H)
        columns = resize_weights(group_boxes[..., 1], group_boxes[..., 3], size, padded.shape[3])  # (n, 2, size, W)
        columns = torch.where(flips_on_device[numbers][..., None, None], columns.flip(-2), columns)
        half = rows.unsqueeze(2) @ padded.unsqueeze(1)                 # (n, 2, 3, size, W)
        views[:, numbers] = (half @ columns.unsqueeze(2).transpose(-1, -2)).transpose(0, 1)
    return views.flatten(0, 1)


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """Weights (..., size, extent) that resize ``lengths`` pixels from ``starts`` along an axis of
    ``extent`` to ``size``: PyTorch's antialiased bilinear interpolation (its
    ``_upsample_bilinear2d_aa``: a triangle filter widened by the scale when shrinking, each
    output's weights normalised to sum to 1), zero outside the crop."""
    lengths = lengths.to(torch.float64)[..., None, None]
    scale = lengths / size
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))      # interp_size / 2 * scale
    inverse = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    centres = scale * (torch.arange(size, dtype=torch.float64, device=starts.device)[:, None] + 0.5)
    first = (centres - support + 0.5).trunc().clamp(min=0)                 # C++'s static_cast<int64_t>
    stop = torch.minimum((centres + support + 0.5).trunc(), lengths)
    offsets = torch.arange(extent, dtype=torch.float64, device=starts.device) - starts.to(torch.float64)[..., None, None]
    weights = (1 - ((offsets - centres + 0.5) * inverse).abs()).clamp(min=0)
    weights = torch.where((offsets >= first) & (offsets < stop), weights, torch.zeros_like(weights))
    return (weights / weights.sum(-1, keepdim=True)).to(torch.float32)


#: Uniforms one view takes: 10 crop attempts of two each (torchvision's RandomResizedCrop tries
#: 10 times), the crop's position (two), the flip, then one for each colour parameter, slot by
#: slot (the jitter's use and order, its four factors, grayscale, blur, the blur's sigma).
_ATTEMPTS, _POSITION, _FLIP, _COLOUR = 0, 20, 22, 23
DRAWS = _COLOUR + PARAMETER_COUNT
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def _plan_view(image: Image.Image, recipe: AugmentationRecipe,
               generator: torch.Generator | None) -> tuple[tuple[int, int, int, int], torch.Tensor, bool]:
    """Crop box, colour parameters and flip of one view: torchvision's distributions (its
    RandomResizedCrop, ColorJitter with a random order, RandomGrayscale, the blur's sigma),
    mapped from one draw of :data:`DRAWS` uniforms."""
    u = torch.rand(DRAWS, generator=generator, dtype=torch.float64).tolist()
    box = _crop_box(image.size, recipe.min_crop_scale, recipe.max_crop_scale, u)
    colour = u[_COLOUR:]   # colour[slot] is the uniform of parameter slot ``slot``
    strength = recipe.color_jitter

    def between(low: float, high: float, slot: int) -> float:
        return low + (high - low) * colour[slot]

    values = [0.0] * PARAMETER_COUNT   # a list, then one tensor: a tensor item at a time costs more than the rest
    values[JITTER] = float(colour[JITTER] < P_JITTER)
    # A uniformly random order of the four operations.
    values[ORDER:ORDER + 4] = sorted(range(4), key=lambda operation: colour[ORDER + operation])
    for slot in (BRIGHTNESS, CONTRAST, SATURATION):
        values[slot] = between(max(0.0, 1.0 - strength), 1.0 + strength, slot)
    values[HUE] = between(-strength / 4, strength / 4, HUE)
    values[GRAYSCALE] = float(colour[GRAYSCALE] < P_GRAYSCALE)
    values[BLUR] = float(recipe.blur and colour[BLUR] < P_BLUR)
    values[SIGMA] = between(*SIGMA_RANGE, SIGMA)
    flip = u[_FLIP] < 0.5   # flips commute with every colour operation and the symmetric blur
    return box, torch.tensor(values, dtype=torch.float32), flip


def _crop_box(size: tuple[int, int], min_scale: float, max_scale: float, u: list[float]) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (ratio 3/4 to 4/3) on given uniforms:
    (top, left, height, width)."""
    width, height = size
    area = width * height
    for attempt in range(10):
        target = area * (min_scale + (max_scale - min_scale) * u[_ATTEMPTS + 2 * attempt])
        aspect = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[_ATTEMPTS + 2 * attempt + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[_POSITION] * (height - h + 1)), int(u[_POSITION + 1] * (width - w + 1)), h, w
    # Ten misses (a very long image): the centre crop at the nearest allowed ratio, as torchvision.
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class BatchAugment:
    """Colour jitter, grayscale, blur and normalisation of a batch of uint8 views, each view with
    its own parameters (:func:`draw_view`), on whatever device the views are on."""

    def __init__(self, recipe: AugmentationRecipe, device: str | torch.device):
        self.mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, views: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """``views``: uint8, or float in [0, 255] (from :func:`crop_on_device`). ``parameters``:
        best left on the CPU, where the loader made them: which views take which operation is
        decided there, so a GPU never waits on a sync for it (a boolean mask on the device would
        cost one ``.any()`` sync per operation, 18 a step); only the factors go to the device."""
        images = views.float() / 255.0
        decide = parameters.cpu()
        factors = parameters.to(images.device, non_blocking=True)
        jittered = decide[:, JITTER] > 0.5
        operations = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

        def apply(chosen: torch.Tensor, operation: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], slot: int) -> None:
            if not chosen.any():   # a CPU tensor: no device sync
                return
            rows = chosen.nonzero().squeeze(1).to(images.device, non_blocking=True)
            images.index_copy_(0, rows, operation(images.index_select(0, rows), factors[:, slot].index_select(0, rows)))

        for position in range(4):   # each view applies the four operations in its own order
            for operation_id, operation in enumerate(operations):
                apply(jittered & (decide[:, ORDER + position] == operation_id), operation, BRIGHTNESS + operation_id)
        apply(decide[:, GRAYSCALE] > 0.5, lambda chosen, _factors: grayscale(chosen).expand(-1, 3, -1, -1), GRAYSCALE)
        apply(decide[:, BLUR] > 0.5, gaussian_blur, SIGMA)
        return (images - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# The operations, batched with one factor per image; each is torchvision's tensor operation
# (transforms.functional) for a single image, so the two agree to float rounding (tested).


def _per_image(factors: torch.Tensor) -> torch.Tensor:
    return factors.view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    ratio = _per_image(factors)
    return (ratio * images + (1.0 - ratio) * other).clamp(0.0, 1.0)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, one channel (torchvision's weights)."""
    red, green, blue = images.unbind(dim=1)
    return (0.2989 * red + 0.587 * green + 0.114 * blue).unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factors)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factors)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = _rgb_to_hsv(images).unbind(dim=1)
    hue = (hue + shifts.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack((hue, saturation, value), dim=1))


def _rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    red, green, blue = images.unbind(dim=1)
    high = images.max(dim=1).values
    low = images.min(dim=1).values
    flat = high == low   # grey pixels: hue and saturation 0, and no division by zero
    spread = high - low
    ones = torch.ones_like(high)
    saturation = spread / torch.where(flat, ones, high)
    divisor = torch.where(flat, ones, spread)
    red_c, green_c, blue_c = (high - red) / divisor, (high - green) / divisor, (high - blue) / divisor
    hue = ((high == red) * (blue_c - green_c)
           + ((high == green) & (high != red)) * (2.0 + red_c - blue_c)
           + ((high != green) & (high != red)) * (4.0 + green_c - red_c))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, high), dim=1)


def _hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = images.unbind(dim=1)
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    # Per sector, which of (value, q, p, t) each channel takes.
    red = torch.stack((value, q, p, p, t, value), dim=1)
    green = torch.stack((t, value, value, q, p, p), dim=1)
    blue = torch.stack((p, p, t, value, value, q), dim=1)
    index = sector.unsqueeze(1)
    return torch.cat([channel.gather(1, index) for channel in (red, green, blue)], dim=1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own sigma: a separable Gaussian of BLUR_TAPS taps, edges
    reflected (torchvision's gaussian_blur with that kernel size)."""
    count, channels, height, width = images.shape
    half = BLUR_TAPS // 2
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-0.5 * (offsets.view(1, -1) / sigmas.view(-1, 1).to(images.dtype)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    planes = images.reshape(1, count * channels, height, width)
    planes = F.conv2d(F.pad(planes, (half, half, 0, 0), mode="reflect"), kernels.view(-1, 1, 1, BLUR_TAPS),
                      groups=count * channels)
    planes = F.conv2d(F.pad(planes, (0, 0, half, half), mode="reflect"), kernels.view(-1, 1, BLUR_TAPS, 1),
                      groups=count * channels)
    return planes.view(count, channels, height, width)
