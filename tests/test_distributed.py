"""Two processes under torchrun on the CPU (gloo): DDP + SyncBN keep the replicas identical."""

import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_image_folder
from simsiam_embed.artefacts import Checkpoint

WORKER = Path(__file__).with_name("distributed_worker.py")
DETECTION_WORKER = Path(__file__).with_name("distributed_detection_worker.py")


def run_two_ranks(*command: str) -> subprocess.CompletedProcess:
    """``python COMMAND`` as two CPU processes under torchrun; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *command],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights_of_both_ranks(worker: Path, *args: Path, settings: str | None = None) -> tuple[dict, dict]:
    """Run ``worker`` on two ranks; each saves its weights as OUT/rank{N}.pt (OUT, the last path)."""
    out = args[-1]
    out.mkdir()
    run_two_ranks(str(worker), *map(str, args), *([settings] if settings else []))
    return tuple(torch.load(out / f"rank{rank}.pt") for rank in (0, 1))


def test_two_ranks_hold_the_same_weights_after_training(tmp_path):
    images = make_image_folder(tmp_path / "images")
    rank0, rank1 = weights_of_both_ranks(WORKER, images, tmp_path / "ws", tmp_path / "out")
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)

    # Training happened, and only rank 0 wrote the run.
    torch.manual_seed(0)
    from simsiam_embed.trained_model import build_model
    from simsiam_embed.settings import PretrainConfig

    run = tmp_path / "ws" / "runs" / "images"
    state = Checkpoint.load(run / "checkpoint.pt")
    assert state.step == 2 * (36 // 8) and state.finished
    fresh = build_model(PretrainConfig.from_dict(state.settings)).state_dict()
    conv = "backbone.resnet.conv1.weight"
    assert not torch.equal(fresh[conv], rank0[conv])
    assert torch.equal(state.model[conv], rank0[conv])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == state.step + 2


def test_embedding_under_torchrun_merges_the_shards_in_order(tmp_path):
    from simsiam_embed.inference.export import export_onnx
    from simsiam_embed.training.pretrain import pretrain
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
    sharded = run_two_ranks(*common, "-o", str(tmp_path / "sharded"))
    assert sharded.stdout.count("embedded ") == 1, sharded.stdout   # rank 0 says what was done, once
    for name in ("paths.jsonl", "skipped.jsonl"):
        assert (tmp_path / "single" / name).read_text() == (tmp_path / "sharded" / name).read_text()
    import numpy as np

    assert np.allclose(np.load(tmp_path / "single" / "embeddings.npy"), np.load(tmp_path / "sharded" / "embeddings.npy"), atol=1e-5)
    assert len((tmp_path / "sharded" / "paths.jsonl").read_text().splitlines()) == 15
    assert not (tmp_path / "sharded" / ".embedding").exists()   # the shards go once the files are written


def test_detection_under_torchrun_keeps_the_replicas_identical(tmp_path):
    from test_detection import draw_detection_images, write_coco

    truth = draw_detection_images(tmp_path / "images", count=8)
    coco = write_coco(tmp_path / "images" / "boxes.json", truth)
    rank0, rank1 = weights_of_both_ranks(DETECTION_WORKER, coco, tmp_path / "ws", tmp_path / "out")
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)   # BN statistics averaged, too

    # 8 images, 4 per step over both ranks, 2 epochs; only rank 0 wrote the run and scored it.
    run = next((tmp_path / "ws" / "runs").iterdir())
    state = Checkpoint.load(run / "checkpoint.pt")
    assert state.step == 4 and state.finished
    assert all(torch.equal(state.model[key], rank0[key]) for key in rank0)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert (run / "evaluation.json").is_file()


def _trained_on_two_ranks(tmp_path: Path, images: Path, settings: dict) -> tuple[dict, dict, list[dict]]:
    import json

    rank0, rank1 = weights_of_both_ranks(WORKER, images, tmp_path / "ws", tmp_path / "out", settings=json.dumps(settings))
    reports = [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return rank0, rank1, reports


def test_a_time_budget_is_planned_once_for_every_rank(tmp_path):
    """Ranks that planned on their own clocks stopped at different steps (a hang) after training
    on different learning rates; rank 0 plans and broadcasts."""
    images = make_image_folder(tmp_path / "images")
    # With the kNN monitor too: every rank embeds its share of --val-dir, rank 0 scores it.
    rank0, rank1, reports = _trained_on_two_ranks(tmp_path, images, {"epochs": None, "time_budget_s": 6,
                                                                     "val_dir": str(images)})
    assert reports[0]["step"] == reports[1]["step"] and reports[0]["finished"] and reports[1]["finished"]
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert Checkpoint.load(tmp_path / "ws" / "runs" / "images" / "checkpoint.pt").step == reports[0]["step"]
    metrics = (tmp_path / "ws" / "runs" / "images" / "metrics.jsonl").read_text()
    assert "knn_top1_random_init" in metrics and '"knn_top1"' in metrics


def test_under_torchrun_a_named_gpu_is_refused_rather_than_shared():
    import pytest

    from simsiam_embed.distributed import DistributedContext, device_for_rank
    from simsiam_embed.errors import UserError

    context = DistributedContext(rank=1, world_size=2, local_rank=1)
    assert device_for_rank("cuda", context) == "cuda:1" and device_for_rank("cuda:1", context) == "cuda:1"
    with pytest.raises(UserError, match="every process on one GPU"):
        device_for_rank("cuda:0", context)


def test_a_rank_whose_whole_share_is_unreadable_still_steps(tmp_path):
    """Truncated JPEGs pass the header scan and fail to decode; a rank with no usable image in a
    batch used to skip the step alone and hang the others' all-reduce."""
    from simsiam_embed.files import read_jsonl
    from simsiam_embed.training.loop import StepBatchSampler
    from simsiam_embed.distributed import DistributedContext
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    count = 24
    for number in range(count):
        path = images / f"photo-{number:02d}.jpg"
        # Noise compresses badly: the file is large, and cutting it in half leaves the header whole.
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path, quality=95)
        if number % 2:
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    truncated = {number for number in range(count) if number % 2}
    from simsiam_embed.image_files import discover_images, scan_images
    assert len(scan_images(discover_images(images)).paths) == count   # the headers are all fine
    # A seed under which some step gives some rank only truncated files: the case that hung.
    def hangs_without_refill(seed: int) -> bool:
        samplers = [StepBatchSampler(count, 8, seed, context=DistributedContext(rank, 2)) for rank in (0, 1)]
        return any(all(index in truncated for _, index in sampler.batch_at(step))
                   for sampler in samplers for step in range(2 * (count // 8)))
    seed = next(seed for seed in range(200) if hangs_without_refill(seed))
    rank0, rank1, reports = _trained_on_two_ranks(tmp_path, images, {"seed": seed, "crop_size": 32})
    assert reports[0]["finished"] and reports[0]["step"] == reports[1]["step"] == 2 * (count // 8)
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    listed = {Path(record["path"]).name for record in read_jsonl(tmp_path / "ws" / "runs" / "images" / "skipped.jsonl")}
    assert listed and listed <= {f"photo-{number:02d}.jpg" for number in truncated}


def test_a_run_of_unreadable_files_longer_than_any_refill_window_still_fills_every_share(tmp_path):
    """40 truncated JPEGs in a row, then 8 good ones, 2 ranks at --batch-size 4: the refill looked
    at the next 32 files only, a rank got a 1-pair share and died in batch norm, and the other
    waited in its all-reduce for ever. Every share is filled from the good files now."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for number in range(48):
        path = images / f"photo-{number:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
        if number < 40:
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
         str(images), str(tmp_path / "ws"), str(tmp_path / "out"), '{"batch_size": 4, "epochs": 1, "crop_size": 32}'],
        capture_output=True, text=True, timeout=300,   # it hung: a time-out here is the failure
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Checkpoint.load(tmp_path / "ws" / "runs" / "images" / "checkpoint.pt").finished


def test_a_share_below_two_pairs_a_process_is_refused_on_every_rank(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=2)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "simsiam_embed.cli.main", "pretrain", str(images), "--batch-size", "2", "--workers", "0",
         "--workspace", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and all("--batch-size 4 or more" in line for line in errors), result.stderr[-2000:]
    # torchrun reports its children's failure with its own traceback; none comes from ours.
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith("File ") and "simsiam_embed" in line]


def test_the_process_group_waits_long_enough_for_rank_0_to_scan_a_large_folder(monkeypatch):
    """Rank 0 scans every file while the others wait in a broadcast: NCCL's default 10 minutes
    ended runs on a few million files."""
    from datetime import timedelta

    import torch.distributed as dist

    from simsiam_embed import distributed

    asked = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: asked.update(kwargs))
    distributed.init_distributed("cpu")
    assert asked["backend"] == "gloo" and asked["timeout"] >= timedelta(hours=1)
