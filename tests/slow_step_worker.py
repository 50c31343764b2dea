"""Run by tests/test_training.py: a run whose third step is one long C call (a large matmul, which
no Python signal handler interrupts), to be stopped with Ctrl-C twice while it computes."""

import sys
from pathlib import Path

import torch

from simsiam_embed.distributed import DistributedContext
from simsiam_embed.artefacts import RunFolder
from simsiam_embed.training.loop import LoopPlan, StopRequest, TrainingLoop

sys.path.insert(0, str(Path(__file__).parent))
from test_house import _Dataset, _TinyTask  # noqa: E402


class LongStep(_TinyTask):
    def train_step(self, batch):
        if self.steps == 2:
            print("long step begins", file=sys.stderr, flush=True)
            side = 16_000   # about 8 TFLOP: seconds on the largest CPUs, a minute on a small one, in one call
            torch.mm(torch.ones(side, side), torch.ones(side, side))
            print("long step ends", file=sys.stderr, flush=True)
        return super().train_step(batch)


task = LongStep()
task.dataset = _Dataset(range(4))
folder = Path(sys.argv[1])
folder.mkdir(exist_ok=True)
plan = LoopPlan(steps_per_epoch=2, total_steps=6, log_every=1, batch_size=2, seed=0, workers=0)
loop = TrainingLoop(task, RunFolder(folder), plan, DistributedContext(), "cpu",
                    lambda message: print(message, file=sys.stderr, flush=True))
loop.resume_and_run(None, StopRequest(), started=0.0, show_progress=False)
