"""Every failure once training has started ends the process, with loader workers running too.

Each test runs the real command in its own process with a timeout: a failure that printed its
message and then waited for ever on its loader's workers (issue 27) fails here as a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import FAST_TRAINING, assert_one_line_error, run_cli

WORKER = Path(__file__).with_name("failing_run_worker.py")
WITH_WORKERS = [*FAST_TRAINING, "--workers", "2", "--epochs", "50"]   # the later --workers wins
EXIT_WITHIN_S = 120   # seconds: a tiny run fails within a few; a hang meets the timeout


def test_a_diverged_run_with_loader_workers_exits_with_its_error(image_folder, tmp_path):
    result = run_cli("pretrain", str(image_folder), *WITH_WORKERS, "--base-lr", "1e30", cwd=tmp_path,
                     timeout=EXIT_WITHIN_S)
    assert_one_line_error(result, "training diverged")


def test_an_unexpected_error_in_a_step_with_loader_workers_ends_the_process(image_folder, tmp_path):
    result = subprocess.run([sys.executable, str(WORKER), "0", str(image_folder), *WITH_WORKERS],
                            cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_WITHIN_S)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "injected failure in the second step" in result.stderr


def _torchrun_with_failing_ranks(failing: str, image_folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
         failing, str(image_folder), *WITH_WORKERS],
        cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_WITHIN_S,
    )


def test_one_rank_failing_under_torchrun_ends_every_process(image_folder, tmp_path):
    result = _torchrun_with_failing_ranks("1", image_folder, tmp_path)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "injected failure in the second step" in result.stderr


def test_every_rank_failing_under_torchrun_ends_every_process(image_folder, tmp_path):
    result = _torchrun_with_failing_ranks("0,1", image_folder, tmp_path)
    assert result.returncode != 0, result.stderr[-3000:]
    assert result.stderr.count("injected failure in the second step") >= 2, result.stderr[-3000:]


def test_running_out_of_memory_in_a_step_is_one_line_with_what_to_lower(image_folder, tmp_path):
    result = subprocess.run([sys.executable, str(WORKER), "0", str(image_folder), *WITH_WORKERS],
                            cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_WITHIN_S,
                            env={**os.environ, "FAILURE": "oom"})
    assert_one_line_error(result, "out of memory", "--batch-size")
