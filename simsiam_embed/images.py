"""Images as tensors: the evaluation transform, the embedding dataset, and loader helpers.

Finding and decoding files is :mod:`simsiam_embed.image_files`; every loader here survives bad
files: an unreadable one becomes a skipped sample that the training or embedding loop counts and
lists, so one broken JPEG never stops a long job.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T

from simsiam_embed.image_files import UnreadableImage, open_image

# ImageNet statistics: the paper's normalisation, and a sound default for natural photos.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform, as data: saved in checkpoints and in the ONNX file's metadata.

    Resize the shorter side to ``resize_size``, centre-crop ``input_size``, scale to [0, 1],
    normalise with ``mean`` and ``std``. One definition for every backend (PyTorch and ONNX).
    """

    input_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def for_input_size(cls, input_size: int, whole_image: bool) -> "Preprocessing":
        # Photos larger than the crop: the standard 0.875 centre crop (256 -> 224). Images no larger
        # than the crop were trained on whole, and are shown whole.
        resize = input_size if whole_image else int(round(input_size / 0.875))
        return cls(input_size=input_size, resize_size=resize)

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return T.Compose(
            [
                T.Resize(self.resize_size, interpolation=T.InterpolationMode(self.interpolation)),
                T.CenterCrop(self.input_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    @property
    def draft_side(self) -> int:
        return self.resize_size


# --------------------------------------------------------------------------------------------
# Datasets


class EvalImageDataset(Dataset):
    """Images through the evaluation transform, for embedding; unreadable files yield ``None``."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing):
        self.paths = list(paths)
        self.transform = preprocessing.transform()
        self.draft_side = preprocessing.draft_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = open_image(self.paths[index], self.draft_side)
        except UnreadableImage as reason:
            return None, (index, str(reason))
        return (self.transform(image), index), None


def start_workers(loader: Iterable) -> Iterator:
    """``iter(loader)``, which forks the loader's workers, made safe for what this process holds.

    A forked worker inherits the parent's garbage, and when its first garbage collection frees
    an object of a threaded library (an ONNX Runtime session from an export's parity check,
    say), the destructor waits on threads that do not exist in the child: the worker hangs and
    the job with it (seen in the test suite). Collecting first, and freezing what is left so the
    children's collector never visits it, keeps such destructors in the parent.
    """
    if getattr(loader, "num_workers", 0) == 0:   # nothing is forked: no full collection to pay for
        return iter(loader)
    gc.collect()
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


def stop_workers(batches: Iterator) -> None:
    """End the worker processes of an iterator from :func:`start_workers` now, whatever happened.

    Persistent workers otherwise live as long as the iterator, and an exception's traceback keeps
    it alive: until the process exits, they hold their memory and shared-memory batches.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)   # PyTorch's own orderly shutdown
    if shutdown is not None:
        shutdown()


def collate_skipping_unreadable(batch: Iterable[tuple], stack: Callable[[list], Any] = default_collate):
    """Stack the good samples of a batch; return the failures beside them.

    Each item is ``(sample or None, failure)``, the failure None, one ``(key, reason)``, or a
    list of them (a refilled training sample). ``stack`` joins the good samples (``None`` if
    there are none); the default stacks tensors, which needs samples of one shape.
    """
    batch = list(batch)
    good = [sample for sample, _ in batch if sample is not None]
    failures = [failure for _, found in batch for failure in _failure_list(found)]
    return (stack(good) if good else None), failures


def _failure_list(found: Any) -> list:
    if found is None:
        return []
    return list(found) if isinstance(found, list) else [found]
