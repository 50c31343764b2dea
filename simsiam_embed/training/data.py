"""Images on disk -> two augmented views a sample, for SimSiam's training loop.

The paper's per-image augmentation (the baseline the batched on-device path is checked
against), and the dataset that draws both views of a sample from that sample's own seed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms as T

from simsiam_embed.images import IMAGENET_MEAN, IMAGENET_STD
from simsiam_embed.image_files import first_readable, open_image
from simsiam_embed.training.image_store import DecodedImageStore


class RandomGaussianBlur:
    """SimCLR's blur as the official SimSiam code applies it: PIL blur with a random sigma.

    The sigma is drawn from torch's generator so that seeding torch alone makes a view reproducible.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def simsiam_augmentation(
    crop_size: int,
    blur: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    min_crop_scale: float = 0.2,
    color_jitter: float = 0.4,
) -> Callable[[Image.Image], torch.Tensor]:
    """The paper's augmentation (Section 4.1, from MoCo v2); ``blur=False`` for the CIFAR recipe."""
    steps: list[Callable] = [
        T.RandomResizedCrop(crop_size, scale=(min_crop_scale, 1.0)),
        T.RandomApply([T.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur:
        steps.append(T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=0.5))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def training_draft_side(crop_size: int, min_crop_scale: float = 0.2) -> int:
    """The smallest decoded side that still gives the smallest random crop full resolution.

    A RandomResizedCrop of area fraction ``s`` spans about sqrt(s) of the side and is resized to
    ``crop_size``, so decoding below crop_size / sqrt(s) would throw detail away.
    """
    return int(np.ceil(crop_size / np.sqrt(min_crop_scale)))



class TwoViewDataset(Dataset):
    """Two independently augmented views of each image, for SimSiam.

    Indexed by ``(seed, index)`` pairs (see :class:`~simsiam_embed.pretrain.StepBatchSampler`):
    the augmentation of a sample depends only on that seed, not on which worker draws it or
    where a run was resumed, so an interrupted run continues exactly as an uninterrupted one
    would. An unreadable file is replaced by the next readable one (:func:`first_readable`) and
    listed beside the sample; :func:`collate_skipping_unreadable` collects the list.

    ``pair`` makes the whole sample from the image and a generator seeded with the sample's seed
    (:class:`~simsiam_embed.training.augment.CroppedViews` and the other view makers);
    ``augment`` is a torchvision-style transform drawing from torch's global generator (the
    paper's per-image baseline), called twice with that generator seeded for the sample.
    """

    def __init__(self, paths: Sequence[Path], augment: Callable | None = None, draft_side: int | None = None,
                 pair: Callable | None = None, store: DecodedImageStore | None = None):
        """``store``: decode each image once and read it back in later epochs (the same pixels)."""
        if (augment is None) == (pair is None):
            raise ValueError("give either augment or pair")
        if store is not None and store.draft_side != draft_side:
            raise ValueError("the store must decode as the dataset does")
        self.paths = list(paths)
        self.pair = pair or _GloballySeededTwoViews(augment)
        self.draft_side = draft_side
        self.store = store

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        sample_seed, index = key
        load = self.store.load if self.store is not None else partial(open_image, draft_side=self.draft_side)
        image, failures = first_readable(index, self.paths, lambda i: load(self.paths[i]))
        if image is None:
            return None, failures
        return self.pair(image, generator=torch.Generator().manual_seed(sample_seed)), failures


class _GloballySeededTwoViews:
    """A torchvision-style transform applied twice, with torch's global generator seeded from
    the sample's (and restored after). A class, not a lambda: loader workers may pickle it."""

    def __init__(self, augment: Callable):
        self.augment = augment

    def __call__(self, image: Image.Image, generator: torch.Generator) -> tuple[Any, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator.initial_seed())
            return self.augment(image), self.augment(image)


