"""Run by tests/test_distributed.py under torchrun: train, then save this rank's weights and step.

Arguments: IMAGES WORKSPACE OUT [SETTINGS_JSON] (settings that replace the tiny defaults).
"""

import json
import os
import sys
from pathlib import Path

import torch

from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace

images, workspace, out = (Path(arg) for arg in sys.argv[1:4])
settings = dict(epochs=2, crop_size=16, batch_size=8, num_workers=0, projector_hidden_dim=64, dim=64,
                predictor_hidden_dim=16, log_every=1)
settings.update(json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
result = pretrain(images, Workspace(workspace), settings, show_progress=False)
rank = os.environ["RANK"]
torch.save(result.model.state_dict(), out / f"rank{rank}.pt")
(out / f"rank{rank}.json").write_text(json.dumps({"step": result.step, "finished": result.finished,
                                                  "skipped": len(result.skipped)}))
