"""bench/gpu_check.py, the script run first on any GPU machine, runs on the CPU too (small sizes),
so a broken device check is found here, not in a lent machine's few minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_the_device_check_runs_on_the_cpu(tmp_path: Path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu",
                             "--out", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("| check | result | figures |"):]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table.splitlines()[2:] if line}
    assert rows["pretrain, default batch and AMP"] == "ok" and rows["loader vs device"] == "ok"
    assert rows["export to ONNX (parity check)"] == "ok"
    assert rows["embed + index + search --json, provider cpu"] == "ok"
    assert rows["detection fine-tuning"] == "ok"
    assert rows["torchrun, 2 processes on 2 GPUs"] == "skipped" and rows["FAISS on the GPU"] == "skipped"
