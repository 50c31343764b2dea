"""Two processes under torchrun on the CPU (gloo): DDP + SyncBN keep the replicas identical."""

import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_image_folder
from simsiam_embed.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("distributed_worker.py")
DETECTION_WORKER = Path(__file__).with_name("distributed_detection_worker.py")


def run_two_ranks(*command: str) -> None:
    """``python COMMAND`` as two CPU processes under torchrun; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def weights_of_both_ranks(worker: Path, *args: Path) -> tuple[dict, dict]:
    """Run ``worker`` on two ranks; each saves its weights as OUT/rank{N}.pt (OUT, the last arg)."""
    out = args[-1]
    out.mkdir()
    run_two_ranks(str(worker), *map(str, args))
    return tuple(torch.load(out / f"rank{rank}.pt") for rank in (0, 1))


def test_two_ranks_hold_the_same_weights_after_training(tmp_path):
    images = make_image_folder(tmp_path / "images")
    rank0, rank1 = weights_of_both_ranks(WORKER, images, tmp_path / "ws", tmp_path / "out")
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)

    # Training happened, and only rank 0 wrote the run.
    torch.manual_seed(0)
    from simsiam_embed.checkpoint import build_model
    from simsiam_embed.config import PretrainConfig

    run = tmp_path / "ws" / "runs" / "images"
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 2 * (36 // 8) and state["finished"]
    fresh = build_model(PretrainConfig.from_dict(state["config"])).state_dict()
    conv = "backbone.resnet.conv1.weight"
    assert not torch.equal(fresh[conv], rank0[conv])
    assert torch.equal(state["model"][conv], rank0[conv])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == state["step"] + 2


def test_embedding_under_torchrun_merges_the_shards_in_order(tmp_path):
    from simsiam_embed.export import export_onnx
    from simsiam_embed.pretrain import pretrain
    from simsiam_embed.workspace import Workspace

    images = make_image_folder(tmp_path / "images", per_class=5)
    (images / "disc" / "broken.png").write_bytes(b"")
    run = pretrain(images, Workspace(tmp_path), dict(epochs=1, crop_size=16, batch_size=8, num_workers=0,
                   projector_hidden_dim=32, dim=32, predictor_hidden_dim=8),
                   report=lambda _m: None, show_progress=False).run_dir
    encoder = export_onnx(run / "checkpoint.pt", tmp_path / "encoder.onnx").path
    common = ["-m", "simsiam_embed.cli.main", "embed", str(images), "--model", str(encoder), "--workers", "0"]
    single = subprocess.run([sys.executable, *common, "-o", str(tmp_path / "single")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    run_two_ranks(*common, "-o", str(tmp_path / "sharded"))
    for name in ("paths.jsonl", "skipped.jsonl"):
        assert (tmp_path / "single" / name).read_text() == (tmp_path / "sharded" / name).read_text()
    import numpy as np

    assert np.allclose(np.load(tmp_path / "single" / "embeddings.npy"), np.load(tmp_path / "sharded" / "embeddings.npy"), atol=1e-5)
    assert len((tmp_path / "sharded" / "paths.jsonl").read_text().splitlines()) == 15
    assert not list((tmp_path / "sharded").glob(".shard-*"))


def test_detection_under_torchrun_keeps_the_replicas_identical(tmp_path):
    from test_detection import draw_detection_images, write_coco

    truth = draw_detection_images(tmp_path / "images", count=8)
    coco = write_coco(tmp_path / "images" / "boxes.json", truth)
    rank0, rank1 = weights_of_both_ranks(DETECTION_WORKER, coco, tmp_path / "ws", tmp_path / "out")
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)   # BN statistics averaged, too

    # 8 images, 4 per step over both ranks, 2 epochs; only rank 0 wrote the run and scored it.
    run = next((tmp_path / "ws" / "runs").iterdir())
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 4 and state["finished"]
    assert all(torch.equal(state["model"][key], rank0[key]) for key in rank0)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert (run / "evaluation.json").is_file()
