"""Two processes under torchrun on the CPU (gloo): DDP + SyncBN keep the replicas identical."""

import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_image_folder

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_two_ranks_hold_the_same_weights_after_training(tmp_path):
    images = make_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(images), str(tmp_path / "ws"), str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{rank}.pt") for rank in (0, 1))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)

    # Training happened, and only rank 0 wrote the run.
    torch.manual_seed(0)
    from simsiam_embed.checkpoint import build_model
    from simsiam_embed.config import PretrainConfig

    run = tmp_path / "ws" / "runs" / "images"
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 * (36 // 8) and state["finished"]
    fresh = build_model(PretrainConfig.from_dict(state["config"])).state_dict()
    conv = "backbone.resnet.conv1.weight"
    assert not torch.equal(fresh[conv], rank0[conv])
    assert torch.equal(state["model"][conv], rank0[conv])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == state["step"] + 2
