"""Pretraining end to end: the console script, checkpoints, resume, bad files, bad input."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from simsiam_embed.artefacts import FORMAT_VERSION, Checkpoint
from simsiam_embed.errors import UserError
from simsiam_embed.files import read_jsonl
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.training.pretrain import cosine_lr, pretrain, set_learning_rate
from simsiam_embed.training.loop import StepBatchSampler, StopRequest
from simsiam_embed.workspace import Workspace

from conftest import (
    CONSOLE_SCRIPT, FAST_TRAINING, assert_one_line_error_in_process, invoke, make_awkward_files,
    make_image_folder, run_cli,
)

FAST_OVERRIDES = dict(crop_size=16, batch_size=8, num_workers=0, projector_hidden_dim=64, dim=64,
                      predictor_hidden_dim=16, log_every=1)


def test_one_epoch_through_the_console_script(image_folder, tmp_path):
    result = run_cli("pretrain", str(image_folder), "--epochs", "1", *FAST_TRAINING, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "done: 4 steps (1.0 epochs)" in result.stdout
    assert "recipe cifar" in result.stderr and "settings" in result.stderr
    run = tmp_path / "runs" / "images"
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "cifar" and config["epochs"] == 1 and config["batch_size"] == 8
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "lr" in line] == [1, 2, 3, 4]
    assert all(-1 <= line["loss"] <= 1 and line["z_std"] > 0 for line in lines)
    assert (tmp_path / "runs" / "LATEST").read_text().strip() == "images"
    state = torch.load(run / "checkpoint.pt", weights_only=True)   # the file as written, field by field
    assert state["finished"] and state["step"] == 4 and state["format_version"] == FORMAT_VERSION == 3
    assert state["kind"] == "pretrain" and Checkpoint.load(run / "checkpoint.pt").kind == "pretrain"

    again = run_cli("pretrain", str(image_folder), cwd=tmp_path)
    assert again.returncode == 0 and "finished run" in again.stderr


def _weights(result):
    return {key: value.clone() for key, value in result.model.state_dict().items()}


def test_a_resumed_run_ends_with_the_same_weights(tmp_path):
    images = make_image_folder(tmp_path / "images")
    settings = dict(FAST_OVERRIDES, epochs=3)
    quiet = dict(report=lambda _m: None, show_progress=False)
    straight = pretrain(images, Workspace(tmp_path / "a"), settings, **quiet)

    second = Workspace(tmp_path / "b")
    interrupted = pretrain(images, second, settings, stop=StopRequest(stop_at_step=4), **quiet)
    assert not interrupted.finished and interrupted.step == 4   # stopped after epoch 1
    with pytest.raises(UserError, match="--resume"):
        pretrain(images, second, settings, **quiet)
    resumed = pretrain(images, second, settings, resume=True, **quiet)
    assert resumed.finished and resumed.step == straight.step == 12

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])]
    metrics = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "lr" in m] == list(range(1, 13))   # no step logged twice


def test_resume_mid_epoch_is_exact_too(tmp_path):
    images = make_image_folder(tmp_path / "images")
    settings = dict(FAST_OVERRIDES, epochs=2, num_workers=1)
    quiet = dict(report=lambda _m: None, show_progress=False)
    straight = pretrain(images, Workspace(tmp_path / "a"), settings, **quiet)
    pretrain(images, Workspace(tmp_path / "b"), settings, stop=StopRequest(stop_at_step=6), **quiet)
    resumed = pretrain(images, Workspace(tmp_path / "b"), settings, resume=True, **quiet)
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_bad_files_are_skipped_and_listed(tmp_path):
    images = make_image_folder(tmp_path / "images")
    kinds = make_awkward_files(images / "odd")
    result = invoke("pretrain", str(images), "--epochs", "2", *FAST_TRAINING, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    bad = sorted(name for name, kind in kinds.items() if kind == "bad")
    listed = read_jsonl(tmp_path / "runs" / "images" / "skipped.jsonl")
    assert sorted(Path(record["path"]).name for record in listed) == bad
    assert f"{len(bad)} unreadable files skipped" in result.stdout


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(image_folder, tmp_path):
    command = [str(CONSOLE_SCRIPT), "pretrain", str(image_folder), "--epochs", "200", *FAST_TRAINING]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "images" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    state = Checkpoint.load(tmp_path / "runs" / "images" / "checkpoint.pt")
    assert not state.finished and 0 < state.step < 800

    resumed = invoke("pretrain", str(image_folder), "--resume", "--epochs", "200", "--backbone", "resnet34", cwd=tmp_path)
    assert_one_line_error_in_process(resumed, "backbone", "resnet18")
    after = Checkpoint.load(tmp_path / "runs" / "images" / "checkpoint.pt")
    assert after.step == state.step   # the refused resume touched nothing


def test_time_budget_plans_a_finished_schedule(image_folder, tmp_path):
    """The mechanism end to end; how many steps fit, and ending on time, depend on this machine's
    speed and are tested with a fake clock (tests/test_training.py)."""
    result = run_cli("pretrain", str(image_folder), "--time-budget", "8s", *FAST_TRAINING, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "cosine schedule planned over exactly those" in result.stderr
    config = json.loads((tmp_path / "runs" / "images" / "config.json").read_text())
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "images" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "lr" in m]
    assert config["total_steps"] == steps[-1]["step"]
    assert Checkpoint.load(tmp_path / "runs" / "images" / "checkpoint.pt").finished
    initial_lr = 0.03 * 8 / 256
    if config["total_steps"] > 6:   # planned past the measuring steps: the cosine reached its end
        assert steps[-1]["lr"] < 0.05 * initial_lr


def test_sampler_covers_each_epoch_once_and_shards_ranks():
    from simsiam_embed.distributed import DistributedContext

    sampler = StepBatchSampler(num_images=10, global_batch=4, seed=0)
    epoch0 = sampler.batch_at(0) + sampler.batch_at(1)
    assert len({index for _, index in epoch0}) == 8
    assert sampler.batch_at(2) != sampler.batch_at(0)   # a new permutation each epoch
    ranks = [StepBatchSampler(10, 4, 0, context=DistributedContext(rank=r, world_size=2)).batch_at(0) for r in (0, 1)]
    assert ranks[0] + ranks[1] == sampler.batch_at(0)


def test_cosine_schedule_ends_at_zero():
    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0)


def test_warmup_rises_linearly_then_the_cosine_runs_over_the_rest():
    assert [cosine_lr(0.1, step, 110, warmup_steps=10) for step in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    assert cosine_lr(0.1, 60, 110, warmup_steps=10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 110, 110, warmup_steps=10) == pytest.approx(0.0)


def test_an_unplanned_time_budget_runs_at_the_peak_lr_unless_a_warmup_was_asked_for():
    for warmup_fraction, expected in ((0.0, 0.1), (0.1, 0.0)):
        config = PretrainConfig(data_dir="-", run_name="-", batch_size=512, base_lr=0.05,
                                warmup_fraction=warmup_fraction)
        optimizer = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "fix_lr": False}], lr=1.0)
        assert set_learning_rate(optimizer, config, step=3, total_steps=None) == pytest.approx(expected)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize("args, fragments", [
    (["pretrain", "no-such-folder"], ["no-such-folder", "not a folder"]),
    (["pretrain", "empty"], ["no images"]),
    (["pretrain", "few", "--batch-size", "64"], ["fewer than one batch"]),
    (["pretrain", "few", "--time-budget", "soon"], ["duration"]),
    (["pretrain", "few", "--epochs", "2", "--time-budget", "1m"], ["either"]),
    (["pretrain", "few", "--resume"], ["nothing to resume"]),
    (["pretrain", "few", "--workspace", "a-file/ws", "--batch-size", "4"], ["cannot write"]),
    (["pretrain", "few", "--batch-size", "4", "--small-views", "2", "--small-crop-size", "40"],
     ["--small-crop-size must be between 8 and the crop size"]),
    (["pretrain", "few", "--batch-size", "4", "--start-crop-size", "40"],
     ["--start-crop-size must be between 8 and the crop size"]),
])
def test_bad_input_gets_a_one_line_error(tmp_path, args, fragments):
    (tmp_path / "empty").mkdir()
    make_image_folder(tmp_path / "few", per_class=2)
    (tmp_path / "a-file").write_text("not a folder")
    # In process: no process boundary is under test here, and a console-script start costs ~3 s.
    assert_one_line_error_in_process(invoke(*args, cwd=tmp_path), *fragments)


@pytest.mark.parametrize("args", [["--epochs", "-3"], ["--batch-size", "lots"], ["--backbone", "vgg"],
                                  ["--color-jitter", "-0.1"], ["--warmup-fraction", "1"], ["--stem-stride", "3"],
                                  ["--small-views", "-1"], ["--small-views", "17"], ["--small-crop-size", "4"],
                                  ["--start-crop-size", "4"], ["--start-crop-size", "big"]])
def test_nonsense_flag_values_are_refused(tmp_path, args):
    make_image_folder(tmp_path / "few", per_class=2)
    result = invoke("pretrain", "few", *args, cwd=tmp_path)
    assert result.exit_code == 2 and (result.exception is None or isinstance(result.exception, SystemExit))
    assert "Error: Invalid value" in result.stderr


def test_the_crop_on_device_path_trains(image_folder, tmp_path):
    """What a GPU run uses by default (workers only decode), exercised here on the CPU."""
    result = pretrain(image_folder, Workspace(tmp_path), dict(FAST_OVERRIDES, epochs=1, num_workers=1,
                                                               crop_on_device=True),
                      report=lambda _m: None, show_progress=False)
    assert result.finished and result.config.crop_on_device and -1 <= result.loss <= 1


def test_a_crop_on_device_batch_counts_its_samples_not_its_groups_of_images():
    """Images are padded together in groups of similar size: a batch of 3 samples is one group,
    and counted as one pair it would be skipped as too small for BatchNorm."""
    from simsiam_embed.training.augment import stack_uncropped
    from simsiam_embed.training.pretrain import _pairs_in

    sample = (torch.zeros(3, 8, 8, dtype=torch.uint8), torch.tensor([[0, 0, 8, 8]] * 2), torch.tensor([False, True]),
              torch.zeros(2, 12))
    batch = stack_uncropped([sample] * 3)
    assert len(batch[0]) == 1 and _pairs_in(batch) == 3


def test_multi_crop_trains_and_resumes_exactly(image_folder, tmp_path):
    """--small-views through the real loop: the small views change what is learned, and an
    interrupted run ends with the same weights as an uninterrupted one (the small views come from
    the sample's seed)."""
    settings = dict(FAST_OVERRIDES, epochs=2, small_views=2, small_crop_size=8)
    whole = pretrain(image_folder, Workspace(tmp_path / "whole"), settings, report=lambda _m: None, show_progress=False)
    assert whole.finished and whole.config.small_views == 2 and -1 <= whole.loss <= 1
    two_views = pretrain(image_folder, Workspace(tmp_path / "two"), dict(settings, small_views=0),
                         report=lambda _m: None, show_progress=False)
    assert not torch.equal(_weights(whole)["backbone.resnet.conv1.weight"],
                           _weights(two_views)["backbone.resnet.conv1.weight"])
    halves = Workspace(tmp_path / "halves")
    first = pretrain(image_folder, halves, settings, stop=StopRequest(stop_at_step=whole.step // 2),
                     report=lambda _m: None, show_progress=False)
    assert not first.finished
    resumed = pretrain(image_folder, halves, settings, resume=True, report=lambda _m: None, show_progress=False)
    assert resumed.finished
    for key, value in _weights(whole).items():
        assert torch.equal(value, _weights(resumed)[key]), key


def test_progressive_resizing_trains_small_first_and_ends_at_the_full_crop(image_folder, tmp_path, monkeypatch):
    """--start-crop-size through the real loop: the network sees the starting side first, growing
    sides after, the full crop at the end; a resumed run sees what an uninterrupted one saw."""
    from simsiam_embed.models import SimSiam

    seen: list[int] = []
    forward = SimSiam.forward

    def recording_forward(self, view1, view2, small=None):
        assert view1.shape == view2.shape
        seen.append(view1.shape[-1])
        return forward(self, view1, view2, small)

    monkeypatch.setattr(SimSiam, "forward", recording_forward)
    settings = dict(FAST_OVERRIDES, epochs=5, start_crop_size=8)   # 36 images, batch 8: 20 steps
    whole = pretrain(image_folder, Workspace(tmp_path / "whole"), settings, report=lambda _m: None, show_progress=False)
    assert whole.finished and whole.config.start_crop_size == 8
    assert seen[0] == 8 and seen[-1] == 16 and seen == sorted(seen) and 12 in seen, seen
    whole_sides, seen[:] = list(seen), []
    halves = Workspace(tmp_path / "halves")
    pretrain(image_folder, halves, settings, stop=StopRequest(stop_at_step=7), report=lambda _m: None, show_progress=False)
    pretrain(image_folder, halves, settings, resume=True, report=lambda _m: None, show_progress=False)
    assert seen == whole_sides


def test_a_run_stopped_before_its_first_log_every_has_curves_from_its_first_step(image_folder, tmp_path):
    result = pretrain(image_folder, Workspace(tmp_path), dict(FAST_OVERRIDES, epochs=3, log_every=10),
                      stop=StopRequest(stop_at_step=2), report=lambda _m: None, show_progress=False)
    assert not result.finished and result.step == 2
    steps = [record for record in read_jsonl(result.run_dir / "metrics.jsonl") if "lr" in record]
    assert [record["step"] for record in steps] == [1] and "z_std" in steps[0] and "loss" in steps[0]
    report = (result.run_dir / "report.html").read_text()
    assert 'src="report-lr.png"' in report and 'src="report-z_std.png"' in report
