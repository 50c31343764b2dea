"""Ways out of the project: the backbone as safetensors for torchvision and timm, embeddings as
parquet. Round trips, built from small runs made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import models as tv_models

from conftest import assert_one_line_error_in_process, invoke, make_image_folder
from simsiam_embed.artefacts import Checkpoint
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.trained_model import build_model, load_pretrained_resnet

safetensors_torch = pytest.importorskip("safetensors.torch", reason="the [interop] extra (in [dev]) is not installed")


def _run(folder: Path, small_image_stem: bool) -> Path:
    config = PretrainConfig(data_dir=str(folder), run_name="r", backbone="resnet18", small_image_stem=small_image_stem,
                            crop_size=32 if small_image_stem else 64, dim=16, projector_hidden_dim=16,
                            predictor_hidden_dim=8, projector_layers=2)
    torch.manual_seed(5)
    model = build_model(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()   # not the values a fresh network would have, so loading them shows
    (folder / "run").mkdir(parents=True)
    Checkpoint(kind="pretrain", settings=config.to_dict(), model=model.state_dict(), step=1, finished=True,
               extra={"steps_per_epoch": 1}).save(folder / "run" / "checkpoint.pt")
    return folder / "run"


@pytest.mark.parametrize("small_image_stem", [False, True])
def test_the_safetensors_export_loads_into_torchvision(tmp_path, small_image_stem):
    run = _run(tmp_path, small_image_stem)
    result = invoke("export", str(run), "--format", "safetensors", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    path, described = run / "backbone.safetensors", json.loads((run / "backbone.json").read_text())
    assert described["architecture"] == "resnet18" and described["num_features"] == 512
    assert described["small_image_stem"] is small_image_stem
    assert described["input_size"] == [3, 32, 32] if small_image_stem else [3, 64, 64]
    resnet = tv_models.resnet18()
    if small_image_stem:   # as the JSON says: a 3x3 stride-1 stem and no max-pool
        resnet.conv1 = torch.nn.Conv2d(3, 64, 3, stride=described["stem_stride"], padding=1, bias=False)
        resnet.maxpool = torch.nn.Identity()
    missing, unexpected = resnet.load_state_dict(safetensors_torch.load_file(str(path)), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and unexpected == []
    expected = load_pretrained_resnet(run).weights
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, expected[key]), key


def test_the_safetensors_export_loads_into_timm(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    run = _run(tmp_path, small_image_stem=False)
    assert invoke("export", str(run), "--format", "safetensors", "-o", "out/r18.safetensors", cwd=tmp_path).exit_code == 0
    model = timm.create_model("resnet18", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "out" / "r18.safetensors")))
    expected = load_pretrained_resnet(run).weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_safetensors_export_bad_input_is_one_line(tmp_path):
    run = _run(tmp_path, small_image_stem=False)
    assert_one_line_error_in_process(invoke("export", str(run), "--format", "safetensors", "--fp16", cwd=tmp_path),
                                     "--format safetensors")
    assert_one_line_error_in_process(invoke("export", str(run), "--format", "safetensors", "-o", "x.pt", cwd=tmp_path),
                                     "ends in .safetensors")


def test_embed_writes_parquet_that_matches_the_npy_output(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="the [interop] extra (in [dev]) is not installed")
    from conftest import write_pixel_onnx

    folder = make_image_folder(tmp_path / "images", per_class=3)
    encoder = write_pixel_onnx(tmp_path / "pixels.onnx")
    for args in (["-o", "npy"], ["-o", "parquet", "--format", "parquet"]):
        result = invoke("embed", str(folder), "--model", str(encoder), "--workers", "0", *args, cwd=tmp_path)
        assert result.exit_code == 0, result.output
    assert not (tmp_path / "parquet" / "embeddings.npy").exists()
    table = pq.read_table(tmp_path / "parquet" / "embeddings.parquet")
    assert table.column_names == ["path", "label", "embedding"]
    rows = [json.loads(line) for line in (tmp_path / "npy" / "paths.jsonl").read_text().splitlines()]
    assert table.column("path").to_pylist() == [row["path"] for row in rows]
    assert table.column("label").to_pylist() == [row["label"] for row in rows]
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(vectors, np.load(tmp_path / "npy" / "embeddings.npy"))


def test_training_writes_tensorboard_events_beside_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_house import _loop, _TinyTask

    from simsiam_embed.artefacts import read_metrics
    from simsiam_embed.training.loop import StopRequest

    loop = _loop(tmp_path, _TinyTask())
    reports = []
    loop.report = reports.append
    assert loop.run(StopRequest(), started=0.0, show_progress=False).finished
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [record for record in read_metrics(tmp_path / "run" / "metrics.jsonl") if record.has("loss")]
    losses = events.Scalars("loss")
    assert [event.step for event in losses] == [record.step for record in logged]
    assert [event.value for event in losses] == pytest.approx([record.get("loss") for record in logged])
    assert any("tensorboard --logdir" in message for message in reports)
