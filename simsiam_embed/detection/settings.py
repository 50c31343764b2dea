"""Detection fine-tuning settings: the dataclass, its defaults, and the rules that fill the
ones the hardware decides (device, precision, layout, batch).

Importable without PyTorch, so that ``finetune-detection --help`` shows these defaults at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from simsiam_embed.settings import SavedSettings

#: Training memory of one image for Faster R-CNN R50-FPN at max_size 853 under fp16 AMP: an
#: estimate (detectron2 fits 2 images of up to 1333 px in fp32 on a 16 GB V100); memory grows
#: with the image's area. bench/gpu_check.py measures the real peak.
DETECTION_IMAGE_BYTES_853_AMP = 1 << 30
#: detectron2's batch (16 images) on a CPU would take minutes a step: the CPU default is 4.
DETECTION_BATCH_GPU_MAX, DETECTION_BATCH_CPU = 16, 4


@dataclass
class DetectionConfig(SavedSettings):
    """Every setting of a detection fine-tuning run; saved as the run's config.json.

    ``None`` for device, amp, channels_last or batch_size means "this machine's choice":
    ``choose_for_hardware`` fills them when the run starts, and says why.
    """

    data: str
    val_data: str | None = None
    checkpoint: str | None = None       # a SimSiam run folder or checkpoint (init "simsiam")
    init: str = "simsiam"
    backbone: str | None = None         # from the checkpoint; resnet50 (GPU) / resnet18 (CPU) for random init
    # The paper's detection recipe (from MoCo) fine-tunes every layer with normalisation that
    # trains: SyncBN across GPUs; in one process, ordinary BN is the closest. None: that rule.
    norm: str | None = None
    trainable_layers: int = 5
    epochs: int = 12
    batch_size: int | None = None       # None: default_detection_batch
    base_lr: float = 0.02               # detectron2's, per 16 images: lr = base_lr x batch / 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "step"              # x0.1 at 2/3 and 8/9 of the steps (detectron2), or cosine
    min_size: int = 512                 # shorter image side; torchvision's 800 is 2.4x the compute
    max_size: int = 853
    # Proposals sampled per image for the box head's loss (detectron2's 512). The head's two
    # 1024-wide layers run on every one of them: 128 made a CPU step 1.2-1.3x faster (bench/RESULTS.md).
    roi_samples: int = 512
    seed: int = 0
    num_workers: int = 2
    device: str | None = None           # None: cuda when available
    amp: str | None = None              # None: fp16 on a GPU, off on a CPU
    channels_last: bool | None = None   # None: on a GPU
    log_every: int = 10
    class_names: list[str] = field(default_factory=list)

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 16

    def choose_for_hardware(self, processes: int | None = None) -> list[str]:
        """Fill the settings left to the machine; returns a line for each choice it made."""
        choices = []
        if self.device is None:
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        on_gpu = self.device.startswith("cuda")
        if self.amp is None:
            # fp16 + loss scaler, not bf16, even where bf16 is native: bf16's 8-bit mantissa moves
            # decoded boxes by about 4 px at 512-1024 px (a box regression is a small delta on a
            # large coordinate).
            self.amp = "fp16" if on_gpu else "off"
        if self.channels_last is None:
            self.channels_last = on_gpu   # NHWC pays on tensor cores; FPN's odd shapes gain nothing on a CPU
        processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
        if self.norm is None:
            # Per-GPU BN over 2 images a GPU estimates its statistics from 2 images: SyncBN pools
            # them over every GPU, as the MoCo/SimSiam detection recipe does.
            self.norm = "syncbn" if on_gpu and processes > 1 else "bn"
            if self.norm == "syncbn":
                choices.append(f"norm syncbn: {processes} GPU processes share batch-norm statistics (the paper's recipe)")
        if self.batch_size is None:
            self.batch_size, reason = default_detection_batch(self.device, self.max_size, processes)
            choices.append(reason)
        return choices


def default_detection_batch(device: str, max_size: int, processes: int) -> tuple[int, str]:
    """The batch over all processes when none is given, and why: 4 on a CPU; on GPUs, as many
    images as their memory fits (an estimate with a margin), up to detectron2's 16."""
    if not device.startswith("cuda"):
        return DETECTION_BATCH_CPU, f"batch {DETECTION_BATCH_CPU}: on a CPU (detectron2's 16 would take minutes a step)"
    from simsiam_embed.settings import GPU_MEMORY_SHARE, GPU_RESERVE_BYTES, gpu_memory_bytes, largest_power_of_two_at_most

    memory = gpu_memory_bytes(device)
    per_image = DETECTION_IMAGE_BYTES_853_AMP * (max_size / 853) ** 2
    fits = int(GPU_MEMORY_SHARE * max(memory - GPU_RESERVE_BYTES, 0) / per_image)
    # An equal share for every process: 16 over 3 GPUs is 5 each (15), not 16 that does not divide.
    per_process = min(largest_power_of_two_at_most(max(fits, 1)), max(1, DETECTION_BATCH_GPU_MAX // processes))
    batch = per_process * processes
    return batch, (f"batch {batch}: {processes} GPU(s) of {memory / 2**30:.0f} GiB fit about {fits} images each "
                   f"(estimate {per_image / 2**30:.1f} GiB an image), at most detectron2's {DETECTION_BATCH_GPU_MAX}; "
                   "the lr follows the batch (base_lr x batch / 16)")
