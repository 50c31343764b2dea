"""Run by tests/test_distributed.py under torchrun: train, then save this rank's weights."""

import os
import sys
from pathlib import Path

import torch

from simsiam_embed.pretrain import pretrain
from simsiam_embed.workspace import Workspace

images, workspace, out = (Path(arg) for arg in sys.argv[1:4])
result = pretrain(images, Workspace(workspace), dict(
    epochs=2, crop_size=16, batch_size=8, num_workers=0, projector_hidden_dim=64, dim=64,
    predictor_hidden_dim=16, log_every=1,
), show_progress=False)
torch.save(result.model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
