"""Files that change hands: a received checkpoint or index runs no code, and index writers never
corrupt each other's work or lose the index to a crash."""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from simsiam_embed.trained_model import build_model
from simsiam_embed.artefacts import Checkpoint
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.inference.embed import embed_paths
from simsiam_embed.errors import UserError
from simsiam_embed.index.store import load_index, update_index

from conftest import (
    CodeRunsIfUnpickled, PixelEncoder, assert_one_line_error_in_process, invoke, make_image_folder, pixel_identity,
)

QUIET = dict(report=lambda _m: None, show_progress=False, workers=0)


@pytest.fixture
def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """runs/evil/checkpoint.pt whose unpickling would create ``marker``; (checkpoint, marker)."""
    marker = tmp_path / "code-ran"
    run = tmp_path / "runs" / "evil"
    run.mkdir(parents=True)
    torch.save({"format_version": 1, "config": {"payload": CodeRunsIfUnpickled(marker)}, "model": {}, "step": 0,
                "finished": True}, run / "checkpoint.pt")
    return run / "checkpoint.pt", marker


@pytest.mark.parametrize("command", [
    ["export", "runs/evil/checkpoint.pt"],
    ["embed", "images", "-o", "out", "--model", "runs/evil/checkpoint.pt", "--backend", "torch"],
    ["knn", "--train", "images", "--test", "images", "--model", "runs/evil/checkpoint.pt"],
    ["index", "images", "--model", "runs/evil/checkpoint.pt"],
    ["pretrain", "images", "--name", "evil", "--resume"],
    ["finetune-detection", "--data", "images", "--name", "evil", "--resume", "--init", "random"],
    ["export-detectron2", "runs/evil", "-o", "out.pkl"],
])
def test_a_crafted_checkpoint_runs_no_code(crafted_checkpoint, tmp_path, command):
    _, marker = crafted_checkpoint
    make_image_folder(tmp_path / "images", per_class=2)
    result = invoke(*command, "--workspace", str(tmp_path), cwd=tmp_path)
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    assert_one_line_error_in_process(result, "checkpoint.pt")


def _pixel_index(tmp_path: Path, kind: str, model_file: Path) -> Path:
    folder = make_image_folder(tmp_path / "images", per_class=2)
    index_dir = tmp_path / "index"
    update_index(folder, PixelEncoder(), pixel_identity(model_file, kind), index_dir, **QUIET)
    return index_dir


def test_a_crafted_encoder_inside_an_index_runs_no_code(crafted_checkpoint, tmp_path):
    checkpoint, marker = crafted_checkpoint
    index_dir = _pixel_index(tmp_path, "torch", checkpoint)
    result = invoke("search", "images", "--index-dir", str(index_dir), cwd=tmp_path)
    assert not marker.exists()
    assert_one_line_error_in_process(result, "encoder.pt")


@pytest.mark.parametrize("encoder_file", ["../../runs/evil/checkpoint.pt", "/tmp/elsewhere/encoder.pt", "encoder.onnx"])
def test_an_index_may_only_name_an_encoder_inside_itself(crafted_checkpoint, tmp_path, encoder_file):
    checkpoint, marker = crafted_checkpoint
    index_dir = _pixel_index(tmp_path, "torch", checkpoint)
    manifest_path = next(index_dir.glob("gen-*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["encoder_file"] = encoder_file   # "encoder.onnx" is not the name of a torch encoder
    manifest_path.write_text(json.dumps(manifest))
    result = invoke("search", "images", "--index-dir", str(index_dir), cwd=tmp_path)
    assert not marker.exists()
    assert_one_line_error_in_process(result, "encoder")


def test_an_index_of_the_old_format_naming_an_outside_encoder_is_refused(crafted_checkpoint, tmp_path):
    checkpoint, marker = crafted_checkpoint
    generation = tmp_path / "index" / "gen-000001"
    generation.mkdir(parents=True)
    (tmp_path / "index" / "CURRENT").write_text("gen-000001\n")
    (generation / "manifest.json").write_text(json.dumps({
        "format": "simsiam-embed.index/1", "encoder": {"kind": "torch", "path": str(checkpoint), "digest": "0"}}))
    make_image_folder(tmp_path / "images", per_class=1)
    result = invoke("search", "images", "--index-dir", str(tmp_path / "index"), cwd=tmp_path)
    assert not marker.exists()
    assert_one_line_error_in_process(result, "--rebuild")


def test_checkpoints_of_format_1_still_load_safely(tmp_path):
    """Format 1 kept numpy's RNG state as an ndarray: the one non-torch global it may use."""
    config = PretrainConfig(data_dir=str(tmp_path), run_name="old", backbone="resnet18", dim=16,
                            projector_hidden_dim=16, predictor_hidden_dim=8)
    torch.save({"format_version": 1, "config": config.to_dict(), "model": build_model(config).state_dict(),
                "step": 3, "finished": True,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
               tmp_path / "old.pt")
    state = Checkpoint.load(tmp_path / "old.pt", kind="pretrain")
    assert state.step == 3 and isinstance(state.rng["numpy"][1], np.ndarray)


def test_a_checkpoint_of_the_wrong_kind_is_one_line(tmp_path):
    torch.save({"format_version": 2, "kind": "detection", "config": {}, "model": {}, "step": 1, "finished": True},
               tmp_path / "checkpoint.pt")
    make_image_folder(tmp_path / "images", per_class=1)
    for command in (["export", "checkpoint.pt"], ["embed", ".", "-o", "out", "--model", "checkpoint.pt", "--backend", "torch"],
                    ["knn", "--train", ".", "--test", ".", "--model", "checkpoint.pt"],
                    ["index", "images", "--model", "checkpoint.pt"], ["index", "--model", "checkpoint.pt"]):
        assert_one_line_error_in_process(invoke(*command, cwd=tmp_path), "detection checkpoint")


@pytest.mark.parametrize("field, value", [("step", "3"), ("model", [1]), ("config", None), ("kind", "evil"),
                                          ("total_steps", "9"), ("elapsed_s", float("nan")), ("skipped", {"a.png": 3}),
                                          ("extra", [1]), ("optimizer", "x")])
def test_a_checkpoint_with_a_field_of_the_wrong_type_is_one_line(tmp_path, field, value):
    state = {"format_version": 2, "kind": "pretrain", "config": {}, "model": {}, "step": 1, "finished": True}
    state[field] = value
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match=field):
        Checkpoint.load(tmp_path / "checkpoint.pt")


def test_saved_settings_are_checked_field_by_field():
    good = PretrainConfig(data_dir="x", run_name="y").to_dict()
    with pytest.raises(UserError, match="'dim'"):
        PretrainConfig.from_dict({**good, "dim": "2048"})
    with pytest.raises(UserError, match="backbone"):
        PretrainConfig.from_dict({**good, "backbone": "evil"})
    with pytest.raises(UserError, match="dim"):
        PretrainConfig.from_dict({**good, "dim": 10 ** 9})


# --------------------------------------------------------------------------------------------
# Index writers and readers


def test_concurrent_index_runs_never_corrupt_the_index(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=4)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    index_dir = tmp_path / "index"
    heard: list[str] = []
    for round_number in range(3):
        # Each round changes the folder so both writers have work to do.
        make_image_folder(folder / f"round{round_number}", per_class=1, seed=round_number + 10)
        errors: list[BaseException] = []

        def write():
            try:
                update_index(folder, PixelEncoder(delay_s=0.05), pixel_identity(model_file), index_dir, batch_size=2,
                             report=heard.append, show_progress=False, workers=0)
            except BaseException as error:   # noqa: BLE001  (the test reports it below)
                errors.append(error)

        writers = [threading.Thread(target=write) for _ in range(2)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        assert not errors, errors
        loaded = load_index(index_dir)
        assert loaded.count == 12 + 3 * (round_number + 1)
        assert sorted(entry.path for entry in loaded.entries.values()) == sorted(
            str(p) for p in folder.resolve().rglob("*.png"))
        query = embed_paths([folder / "disc" / "disc-00.png"], PixelEncoder(), workers=0, show_progress=False)
        scores, ids = loaded.search(query.vectors, 1)
        assert scores[0, 0] > 0.999 and loaded.entries[int(ids[0, 0])].path.endswith("disc-00.png")
    assert any("holds the lock" in message for message in heard)
    assert not list(index_dir.glob(".*.partial"))


def test_a_generation_left_by_a_crash_before_current_moved_is_cleaned(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    index_dir = tmp_path / "index"
    update_index(folder, PixelEncoder(), pixel_identity(model_file), index_dir, **QUIET)
    assert (index_dir / "CURRENT").read_text().strip() == "gen-000001"
    (index_dir / "gen-000002").mkdir()
    (index_dir / "gen-000002" / "x").touch()
    (index_dir / ".gen-000003.partial").mkdir()
    make_image_folder(folder / "more", per_class=1, seed=5)
    update = update_index(folder, PixelEncoder(), pixel_identity(model_file), index_dir, **QUIET)
    assert update.count == 9 and load_index(index_dir).count == 9
    assert not (index_dir / ".gen-000003.partial").exists()
    assert not (index_dir / "gen-000002" / "x").exists()


def test_a_search_that_loses_a_race_with_an_update_reads_the_new_generation(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    index_dir = tmp_path / "index"
    for _ in range(2):
        make_image_folder(folder / f"more{_}", per_class=1, seed=_ + 20)
        update_index(folder, PixelEncoder(), pixel_identity(model_file), index_dir, **QUIET)
    # The previous generation stays for readers that read CURRENT just before the swap.
    assert sorted(p.name for p in index_dir.glob("gen-*")) == ["gen-000001", "gen-000002"]

    import simsiam_embed.index.store as index_module

    real_open = index_module._open_generation
    calls = []

    def swapped_underneath(index_dir_arg, generation):
        calls.append(generation.name)
        if len(calls) == 1:   # an updater removes this generation right after the reader chose it
            shutil.rmtree(index_dir_arg / "gen-000001", ignore_errors=True)
            return real_open(index_dir_arg, index_dir_arg / "gen-000001")
        return real_open(index_dir_arg, generation)

    (index_dir / "CURRENT").write_text("gen-000001\n")
    monkeypatch.setattr(index_module, "_open_generation", swapped_underneath)
    original_current = index_module.current_generation

    def current_after_first(index_dir_arg):
        return index_dir_arg / "gen-000002" if calls else original_current(index_dir_arg)

    monkeypatch.setattr(index_module, "current_generation", current_after_first)
    assert load_index(index_dir).count == 12
    assert calls == ["gen-000001", "gen-000002"]


@pytest.mark.parametrize("current", ["../../etc", "gen-1", "", "gen-000009"])
def test_a_damaged_current_is_one_line(tmp_path, current):
    folder = make_image_folder(tmp_path / "images", per_class=1)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)
    (tmp_path / "index" / "CURRENT").write_text(current)
    result = invoke("search", "images", "--index-dir", "index", cwd=tmp_path)
    assert_one_line_error_in_process(result, "index")


@pytest.mark.parametrize("change", [
    {"dim": "12"}, {"count": -1}, {"encoder_digest": "x"}, {"format": "other"}, {"image_dir": None}, "[]",
    {"search_parameters": {"nprobe": "9"}}, {"search_parameters": {"__class__": 1}}, {"search_parameters": [1]},
    {"recall_at_10": 2.0}, {"recall_target": "high"},
])
def test_a_malformed_manifest_is_one_line_naming_the_field(tmp_path, change):
    folder = make_image_folder(tmp_path / "images", per_class=1)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)
    manifest_path = next((tmp_path / "index").glob("gen-*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(change if isinstance(change, str) else json.dumps({**manifest, **change}))
    result = invoke("search", "images", "--index-dir", "index", cwd=tmp_path)
    name = next(iter(change)) if isinstance(change, dict) else "manifest"
    assert_one_line_error_in_process(result, name if name != "format" else "manifest")


def test_many_queries_are_embedded_in_bounded_batches(tmp_path):
    """A folder of thousands of queries must not become one GPU batch."""
    from simsiam_embed.index.search import QUERY_BATCH, embed_queries

    class RecordingEncoder(PixelEncoder):
        batches: list[int] = []

        def __call__(self, images):
            self.batches.append(len(images))
            return super().__call__(images)

    folder = make_image_folder(tmp_path / "queries", per_class=45)
    paths = sorted(folder.rglob("*.png"))
    encoder = RecordingEncoder()
    vectors = embed_queries(paths, encoder)
    assert len(vectors) == 135 and max(encoder.batches) == QUERY_BATCH
    assert np.allclose(vectors[7], embed_queries([paths[7]], encoder)[0], atol=1e-6)


class _FakeGpuIndex:
    """What faiss.index_cpu_to_gpu returns, as far as routing is concerned: refuses k > 2048."""

    def __init__(self, cpu_index):
        self.cpu_index = cpu_index
        self.searches = 0

    def search(self, queries, k):
        assert k <= 2048, "FAISS GPU indexes cannot select more than 2048 neighbours"
        self.searches += 1
        return self.cpu_index.search(queries, k)


@pytest.fixture
def fake_faiss_gpu(monkeypatch):
    import faiss

    copies: list = []

    def to_gpu(_resources, _device, index):
        if "HNSW" in type(faiss.downcast_index(index.index)).__name__:
            raise RuntimeError("no GPU implementation of HNSW")
        copies.append(_FakeGpuIndex(index))
        return copies[-1]

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    return copies


def test_faiss_gpu_searches_up_to_2048_neighbours_and_the_cpu_beyond(tmp_path, fake_faiss_gpu):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", **QUIET)
    assert not fake_faiss_gpu, "an update copied the index to the GPU, which only searches need"
    loaded = load_index(tmp_path / "index")
    query = np.zeros((1, 12), dtype=np.float32)
    loaded.search(query, 5)
    assert fake_faiss_gpu[0].searches == 1
    loaded.search(query, 3000)   # past the GPU's k-selection: the CPU index answers
    assert fake_faiss_gpu[0].searches == 1


def test_an_index_type_without_a_gpu_version_says_so_and_stays_on_the_cpu(tmp_path, fake_faiss_gpu):
    folder = make_image_folder(tmp_path / "images", per_class=2)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"weights")
    update_index(folder, PixelEncoder(), pixel_identity(model_file), tmp_path / "index", "hnsw", **QUIET)
    heard: list[str] = []
    loaded = load_index(tmp_path / "index", report=heard.append)
    assert loaded.searcher is None and any("on the CPU" in message for message in heard)


def test_each_torchrun_process_asks_onnx_runtime_for_its_own_gpu(monkeypatch, tmp_path):
    """Without device_id every rank's CUDA and TensorRT sessions land on GPU 0."""
    from simsiam_embed.inference.onnx_encoder import _provider_options

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _provider_options("CUDAExecutionProvider", 64, 224, None, False)["device_id"] == "3"
    tensorrt = _provider_options("TensorrtExecutionProvider", 64, 224, tmp_path / "engines", False)
    assert tensorrt["device_id"] == "3" and tensorrt["trt_engine_cache_enable"] == "True"
    assert tensorrt["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert (tensorrt["trt_profile_min_shapes"], tensorrt["trt_profile_max_shapes"]) == (
        "images:1x3x224x224", "images:64x3x224x224")
