"""Run by tests/test_distributed.py under torchrun: fine-tune a detector, then save this rank's weights."""

import os
import sys
from pathlib import Path

import torch

from simsiam_embed.detection.finetune import DetectionConfig, finetune_detection
from simsiam_embed.workspace import Workspace

coco, workspace, out = (Path(arg) for arg in sys.argv[1:4])
config = DetectionConfig(data=str(coco), val_data=str(coco), init="random", backbone="resnet18", epochs=2,
                         batch_size=4, warmup_steps=1, min_size=64, max_size=64, num_workers=0, log_every=1)
result = finetune_detection(config, Workspace(workspace), show_progress=False)
torch.save(result.detector.state_dict(), out / f"rank{os.environ['RANK']}.pt")
