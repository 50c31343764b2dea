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
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table.splitlines()[2:]
            if line.startswith("| ")}
    assert rows["pretrain, default batch and AMP"] == "ok" and rows["loader vs device"] == "ok"
    assert rows["export to ONNX (parity check)"] == "ok"
    assert rows["embed + index + search --json, provider cpu"] == "ok"
    assert rows["detection fine-tuning"] == "ok"
    assert rows["torchrun, 2 processes on 2 GPUs"] == "skipped" and rows["FAISS on the GPU"] == "skipped"
    assert rows["colour augmentation, no device sync"] == "skipped"
    import json

    saved = json.loads((tmp_path / "work" / "gpu_check.json").read_text())
    assert {row["check"]: row["result"] for row in saved["rows"]} == rows and saved["failed"] is False


def test_asking_for_a_gpu_where_there_is_none_fails_at_once(tmp_path: Path):
    """Without a GPU the script fell back to the CPU mode and exited 0: a device check that passed
    by mistake."""
    import torch

    if torch.cuda.is_available():
        return   # a GPU machine runs the real check instead
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cuda",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "sees no CUDA GPU" in result.stderr
    default = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert default.returncode == 2   # cuda is the default


def test_a_check_that_raises_is_a_failed_row_and_the_table_is_still_written(tmp_path: Path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    table = gpu_check.Table()

    def boom(_table):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert table.run("first", boom) is None
    table.run("second", lambda t: t.add("second", True, "ran after the failure"))
    table.add("third", True, "12 pairs/s", short=True)
    table.write_json(tmp_path / "table.json", "test device")
    saved = json.loads((tmp_path / "table.json").read_text())
    assert [row["result"] for row in saved["rows"]] == ["FAILED", "ok", "SHORT"] and saved["failed"]
    assert "illegal memory access" in saved["rows"][0]["figures"]
