"""Run by tests/test_failure_exit.py: the real command line, with an error injected into training.

Usage: python failing_run_worker.py FAILING_RANKS PRETRAIN-ARGS...  FAILING_RANKS is a comma list
("0", "1", "0,1"); those ranks (RANK, 0 without torchrun) raise a RuntimeError in their second
step, as an OOM, a cuDNN or NCCL error would, after the loader's workers have started.
"""

import os
import sys

from simsiam_embed.cli.main import main
from simsiam_embed.training.pretrain import SimSiamTask

failing = {int(rank) for rank in sys.argv[1].split(",")}
#: FAILURE=oom raises what PyTorch raises when the GPU's memory runs out.
FAILURE = os.environ.get("FAILURE", "runtime")
train_step = SimSiamTask.train_step
steps = 0


def train_step_that_fails(self, batch):
    global steps
    steps += 1
    if steps == 2 and int(os.environ.get("RANK", "0")) in failing:
        if FAILURE == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        raise RuntimeError("injected failure in the second step")
    return train_step(self, batch)


SimSiamTask.train_step = train_step_that_fails
sys.argv = ["simsiam-embed", "pretrain", *sys.argv[2:]]
main()
