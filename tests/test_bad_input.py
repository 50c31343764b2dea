"""Bad input gets one clear line (or is skipped and listed), and nothing already done is lost."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from simsiam_embed.trained_model import build_model
from simsiam_embed.artefacts import Checkpoint
from simsiam_embed.settings import PretrainConfig, check_crop_size
from simsiam_embed.errors import UserError
from simsiam_embed.inference.export import export_onnx
from simsiam_embed.files import write_json_atomic
from simsiam_embed.index.store import choose_index_type, load_index, update_index
from simsiam_embed.training.pretrain import pretrain
from simsiam_embed.workspace import Workspace

from conftest import (
    CONSOLE_SCRIPT, FAST_TRAINING, PixelEncoder, assert_one_line_error_in_process, invoke, make_awkward_files,
    make_image_folder, pixel_identity,
)

QUIET = dict(report=lambda _m: None, show_progress=False, workers=0)
TINY = dict(batch_size=8, num_workers=0, projector_hidden_dim=32, dim=32, predictor_hidden_dim=8, epochs=1,
            crop_size=16)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(b"stand-in weights")
    return path


def _only_bad_files(folder: Path) -> Path:
    kinds = make_awkward_files(folder)
    for path in folder.iterdir():
        if kinds.get(path.name) != "bad":
            path.unlink()
    return folder


# --------------------------------------------------------------------------------------------
# index


def test_index_skips_and_lists_dangling_and_looping_links(tmp_path, model_file):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    (folder / "disc" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "disc" / "loop.png").symlink_to(folder / "disc" / "loop.png")
    update = update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)
    assert update.count == 6
    assert sorted(Path(path).name for path, _ in update.failures) == ["dangling.png", "loop.png"]


def test_a_folder_of_only_unreadable_files_is_one_line_and_writes_no_index(tmp_path, model_file):
    folder = _only_bad_files(tmp_path / "images")
    with pytest.raises(UserError, match="none of the 5 image files"):
        update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)
    assert not (tmp_path / "index" / "CURRENT").exists()
    with pytest.raises(UserError, match="no index"):
        load_index(tmp_path / "index")


def test_ivfpq_on_a_small_folder_falls_back_before_embedding(tmp_path, model_file):
    assert choose_index_type(30, 12, "ivfpq").factory == "Flat"
    assert "cannot train on 30" in choose_index_type(30, 12, "ivfpq").reason
    with pytest.raises(UserError, match="--index-type IVF64,PQ4 cannot be built from 30 images"):
        choose_index_type(30, 12, "IVF64,PQ4")

    class MustNotEmbed(PixelEncoder):
        def __call__(self, images):
            raise AssertionError("embedding started before the index type was checked")

    folder = make_image_folder(tmp_path / "images", per_class=2)
    with pytest.raises(UserError, match="IVF64,PQ4"):
        update_index(folder, MustNotEmbed(), pixel_identity(model_file), tmp_path / "index", "IVF64,PQ4", **QUIET)
    update = update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", "ivfpq", **QUIET)
    assert update.factory == "Flat" and update.count == 6


def test_a_full_disk_while_writing_the_catalog_is_one_line_and_keeps_the_index(tmp_path, model_file, monkeypatch):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)
    make_image_folder(folder / "more", per_class=1, seed=4)
    import simsiam_embed.index.store as index_module

    def disk_full(*_args, **_kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(index_module, "write_catalog", disk_full)
    with pytest.raises(UserError, match="disk is full.*previous index is unchanged"):
        update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)
    assert load_index(tmp_path / "index").count == 6
    assert not list((tmp_path / "index").glob(".*.partial"))


def test_an_index_folder_that_cannot_be_written_is_refused_before_embedding(tmp_path, model_file, monkeypatch):
    import simsiam_embed.files as files_module

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files_module.tempfile, "NamedTemporaryFile", read_only)
    folder = make_image_folder(tmp_path / "images", per_class=1)
    with pytest.raises(UserError, match="cannot write to .*Read-only file system"):
        update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)


# --------------------------------------------------------------------------------------------
# atomic writes


def test_a_write_the_disk_refuses_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"version": 1})
    import simsiam_embed.files as files_module

    def no_space(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", no_space)
    with pytest.raises(UserError, match="cannot write .*manifest.json .No space left on device.: free some space"):
        write_json_atomic(target, {"version": 2})
    monkeypatch.undo()
    assert target.read_text().count('"version": 1') == 1
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_atomic_writes_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "shared.json", {})
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644


def test_a_file_a_library_writes_itself_is_as_readable_as_any_other(tmp_path):
    """safetensors replaces the path it is given with a 0600 file of its own."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import torch

    from simsiam_embed.files import atomic_path

    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "backbone.safetensors") as temporary:
            safetensors_torch.save_file({"weight": torch.zeros(2)}, str(temporary))
    finally:
        os.umask(previous)
    assert (tmp_path / "backbone.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_checkpoint_write_on_a_full_disk_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    Checkpoint(kind="pretrain", settings={}, model={}, step=1, finished=False).save(path)
    import torch

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        Checkpoint(kind="pretrain", settings={}, model={}, step=2, finished=False).save(path)
    monkeypatch.undo()
    assert Checkpoint.load(path).step == 1


def _make_disk_read_only(monkeypatch) -> None:
    """Every new file fails as on a read-only filesystem (root ignores chmod, so it is simulated)."""
    import simsiam_embed.files as files_module

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files_module.tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(files_module.tempfile, "mkstemp", read_only)


@pytest.fixture
def read_only_disk(monkeypatch):
    _make_disk_read_only(monkeypatch)


def test_embed_to_a_read_only_folder_is_refused_before_embedding(tmp_path, read_only_disk):
    from simsiam_embed.inference.embed import embed_folder

    class MustNotEmbed(PixelEncoder):
        def __call__(self, images):
            raise AssertionError("embedding started before the output folder was checked")

    folder = make_image_folder(tmp_path / "images", per_class=1)
    with pytest.raises(UserError, match="cannot write to .*out .Read-only file system."):
        embed_folder(folder, MustNotEmbed(), tmp_path / "out", workers=0, show_progress=False)


def test_a_search_page_in_a_read_only_folder_is_one_line(tmp_path, read_only_disk):
    from simsiam_embed.index.search import write_results_html

    with pytest.raises(UserError, match="cannot write .*page.html .Read-only file system."):
        write_results_html([], tmp_path / "page.html")


def test_export_to_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    Checkpoint(kind="pretrain", settings=_tiny_config(tmp_path).to_dict(),
               model=build_model(_tiny_config(tmp_path)).state_dict(), step=1, finished=True).save(tmp_path / "checkpoint.pt")
    _make_disk_read_only(monkeypatch)
    result = invoke("export", "checkpoint.pt", "-o", "out/encoder.onnx", cwd=tmp_path)
    assert_one_line_error_in_process(result, "cannot write to", "Read-only file system")


# --------------------------------------------------------------------------------------------
# pretrain


@pytest.mark.parametrize("option", ["--base-lr", "--momentum", "--weight-decay", "--color-jitter"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_settings_are_refused(tmp_path, option, value):
    make_image_folder(tmp_path / "images", per_class=1)
    result = invoke("pretrain", "images", option, value, cwd=tmp_path)
    assert_one_line_error_in_process(result, option)
    assert not (tmp_path / "runs").exists()


def test_the_library_refuses_non_finite_settings_too(image_folder, tmp_path):
    with pytest.raises(UserError, match="--momentum must be a finite number"):
        pretrain(image_folder, Workspace(tmp_path), {**TINY, "momentum": float("nan")}, **{
            "report": lambda _m: None, "show_progress": False})


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(image_folder, tmp_path):
    workspace = Workspace(tmp_path)
    quiet = dict(report=lambda _m: None, show_progress=False)
    good = pretrain(image_folder, workspace, TINY, run_name="good", **quiet)
    assert good.finished
    with pytest.raises(UserError, match="training diverged: the (loss|weights) became NaN"):
        pretrain(image_folder, workspace, {**TINY, "epochs": 3, "base_lr": 1e30, "log_every": 1}, run_name="bad",
                 **quiet)
    assert not (tmp_path / "runs" / "bad" / "checkpoint.pt").exists()
    # LATEST still names the run that has a checkpoint.
    assert workspace.latest_run_dir() == tmp_path / "runs" / "good"


def _tiny_config(folder: Path) -> PretrainConfig:
    return PretrainConfig(data_dir=str(folder), run_name="tiny", recipe="cifar", backbone="resnet18",
                          small_image_stem=True, crop_size=16, dim=16, projector_hidden_dim=16,
                          predictor_hidden_dim=8, projector_layers=2)


def test_export_refuses_a_checkpoint_with_nan_weights(tmp_path):
    config = _tiny_config(tmp_path)
    model = build_model(config)
    for parameter in model.parameters():
        parameter.data.fill_(float("nan"))
    Checkpoint(kind="pretrain", settings=config.to_dict(), model=model.state_dict(), step=1,
               finished=True).save(tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="parity check"):
        export_onnx(tmp_path / "checkpoint.pt", tmp_path / "encoder.onnx")
    assert not (tmp_path / "encoder.onnx").exists()


def test_a_crop_larger_than_the_images_or_memory_allow_is_one_line(tmp_path):
    make_image_folder(tmp_path / "images", per_class=2)
    result = invoke("pretrain", "images", "--crop-size", "100000", "--workers", "0", cwd=tmp_path)
    assert_one_line_error_in_process(result, "--crop-size 100000", "median side")
    config = PretrainConfig(data_dir="x", run_name="y", crop_size=4096, batch_size=256, num_workers=8)
    with pytest.raises(UserError, match="GiB of loader memory"):
        check_crop_size(config, median_short_side=5000, memory_bytes=64 * 2 ** 30)


def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    make_image_folder(tmp_path / "work" / "images", per_class=1)
    for name in ("../../x", "a/b", "..", ".hidden"):
        result = invoke("pretrain", "images", "--name", name, cwd=tmp_path / "work")
        assert_one_line_error_in_process(result, "plain folder name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_val_dir_of_only_unreadable_images_is_one_line(image_folder, tmp_path):
    for label in ("a", "b"):
        _only_bad_files(tmp_path / "val" / label)
    with pytest.raises(UserError, match="of the .* images in .*val could be read"):
        pretrain(image_folder, Workspace(tmp_path), {**TINY, "val_dir": str(tmp_path / "val")},
                 report=lambda _m: None, show_progress=False)


def test_sigterm_to_the_process_group_saves_a_checkpoint(image_folder, tmp_path):
    """What systemd, Slurm and Kubernetes do: SIGTERM to every process, loader workers included."""
    command = [str(CONSOLE_SCRIPT), "pretrain", str(image_folder), "--epochs", "200", *FAST_TRAINING, "--workers", "2"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    metrics = tmp_path / "runs" / "images" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 143, stderr   # 128 + SIGTERM, as a shell reports it (not SIGINT's 130)
    assert "Traceback" not in stderr and "--resume" in stderr
    state = Checkpoint.load(tmp_path / "runs" / "images" / "checkpoint.pt")
    assert not state.finished and state.step > 0
    assert (tmp_path / "runs" / "LATEST").read_text().strip() == "images"


# --------------------------------------------------------------------------------------------
# knn


def test_knn_with_an_unreadable_bank_or_test_folder_is_one_line(tmp_path, model_file):
    from simsiam_embed.inference.evaluate import evaluate_knn

    good = make_image_folder(tmp_path / "good", per_class=2)
    bad = tmp_path / "bad"
    for label in ("disc", "square"):
        _only_bad_files(bad / label)
    with pytest.raises(UserError, match="none of the 10 images in .*bad could be read"):
        evaluate_knn(PixelEncoder(), bad, good, workers=0, show_progress=False)
    with pytest.raises(UserError, match="none of the 10 images in .*bad could be read"):
        evaluate_knn(PixelEncoder(), good, bad, workers=0, show_progress=False)
