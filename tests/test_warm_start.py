"""Warm start from weights users already have: torchvision and timm state dicts, Hugging Face
safetensors, another run. The files are built here from torchvision's own (untrained) ResNets:
nothing is ever downloaded."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torchvision import models as tv_models

from conftest import FAST_TRAINING, assert_one_line_error_in_process, invoke, make_image_folder
from simsiam_embed.errors import UserError
from simsiam_embed.resnet_weights import read_resnet_weights

safetensors_torch = pytest.importorskip("safetensors.torch", reason="the [interop] extra (in [dev]) is not installed")


def torchvision_state(name: str = "resnet18", seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    resnet = getattr(tv_models, name)(weights=None)
    with torch.no_grad():   # statistics unlike a fresh network's, so loading them is visible
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
    return resnet.state_dict()


def huggingface_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision -> transformers' ResNetModel names, written out independently of the reader."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc."):
            renamed[key.replace("fc.", "classifier.1.")] = value
            continue
        stem = re.fullmatch(r"(conv1|bn1)\.(.+)", key)
        if stem:
            part = "convolution" if stem.group(1) == "conv1" else "normalization"
            renamed[f"resnet.embedder.embedder.{part}.{stem.group(2)}"] = value
            continue
        layer, block, module, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.(.+)", key).groups()
        base = f"resnet.encoder.stages.{int(layer) - 1}.layers.{block}"
        if module.startswith("downsample"):
            part = "convolution" if module.endswith("0") else "normalization"
            renamed[f"{base}.shortcut.{part}.{rest}"] = value
        else:
            part = "convolution" if module.startswith("conv") else "normalization"
            renamed[f"{base}.layer.{int(module[-1]) - 1}.{part}.{rest}"] = value
    return renamed


def assert_same_backbone(read: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    expected = {key: value for key, value in state.items() if not key.startswith("fc.")}
    assert set(read) == set(expected)
    for key, value in expected.items():
        assert torch.equal(read[key], value), key


@pytest.mark.parametrize("layout", ["torchvision", "wrapped", "timm", "huggingface"])
def test_every_naming_reads_as_the_same_torchvision_weights(tmp_path, layout):
    state = torchvision_state("resnet18")
    if layout == "torchvision":
        path = tmp_path / "resnet18.pth"
        torch.save(state, path)
    elif layout == "wrapped":   # a training script's checkpoint: DDP's prefix inside {"state_dict": ...}
        path = tmp_path / "lightning.ckpt"
        torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in state.items()}}, path)
    elif layout == "timm":      # timm's ResNets share torchvision's names
        path = tmp_path / "model.safetensors"
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "model.safetensors"
        safetensors_torch.save_file({k: v.contiguous() for k, v in huggingface_names(state).items()}, str(path))
    start = read_resnet_weights(path)
    assert start.backbone == "resnet18" and not start.small_image_stem and len(start.digest) == 64
    assert_same_backbone(start.weights, state)


def test_the_architecture_is_read_from_the_blocks(tmp_path):
    for name in ("resnet34", "resnet50"):
        torch.save(torchvision_state(name), tmp_path / f"{name}.pth")
        assert read_resnet_weights(tmp_path / f"{name}.pth").backbone == name


def test_files_that_are_not_resnet_weights_are_one_line_errors(tmp_path):
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(UserError, match="holds no ResNet weights"):
        read_resnet_weights(tmp_path / "linear.pth")
    torch.save({"model": torch.nn.Linear(3, 2)}, tmp_path / "pickled.pth")   # a whole module: code, not data
    with pytest.raises(UserError, match="more than tensors"):
        read_resnet_weights(tmp_path / "pickled.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_resnet_weights(tmp_path / "broken.safetensors")
    state = torchvision_state("resnet18")
    state = {key: value for key, value in state.items() if not key.startswith("layer4.1.")}
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"\(2, 2, 2, 1\) blocks per stage"):
        read_resnet_weights(tmp_path / "odd.pth")


def test_pretrain_starts_from_the_file_and_records_it(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4, size=16)
    state = torchvision_state("resnet18")
    torch.save(state, tmp_path / "resnet18.pth")
    result = invoke("pretrain", "images", "--init", "resnet18.pth", "--epochs", "1", "--val-dir", str(images),
                    *FAST_TRAINING, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    # The small images train the CIFAR stem (3x3): the file's 7x7 conv1 cannot fit it, the rest does.
    loadable = sum(not key.startswith("fc.") for key in state) - 1
    assert f"warm start: {loadable} tensors of the backbone" in result.stderr, result.stderr
    assert "left at random init: conv1.weight" in result.stderr
    assert "chosen: backbone resnet18: the --init file's" in result.stderr
    assert re.search(r"kNN top-1 on \S+ at the warm start: \d\.\d{3}", result.stderr)
    assert "over the warm start" in result.stdout or "against the warm start" in result.stdout, result.stdout
    config = json.loads((tmp_path / "runs" / "images" / "config.json").read_text())
    assert config["init"] == str(tmp_path / "resnet18.pth") and len(config["init_digest"]) == 64
    metrics = (tmp_path / "runs" / "images" / "metrics.jsonl").read_text()
    assert "knn_top1_warm_start" in metrics and "knn_top1_random_init" not in metrics


def test_pretrain_refuses_weights_of_another_backbone(tmp_path):
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    torch.save(torchvision_state("resnet34"), tmp_path / "resnet34.pth")
    result = invoke("pretrain", "images", "--init", "resnet34.pth", "--backbone", "resnet18", *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, "resnet34's weights", "--backbone resnet34")
    assert not (tmp_path / "runs" / "images" / "checkpoint.pt").exists()


def test_detection_fine_tunes_from_a_torchvision_file(tmp_path):
    from simsiam_embed.detection.finetune import DetectionConfig, build_detector, simsiam_backbone_weights

    state = torchvision_state("resnet18")
    torch.save(state, tmp_path / "resnet18.pth")
    weights, name = simsiam_backbone_weights(tmp_path / "resnet18.pth")
    assert name == "resnet18"
    detector, loaded = build_detector(DetectionConfig(data="x", backbone=name), 2, weights)
    body = detector.backbone.body.state_dict()
    assert loaded == sum(not key.startswith("fc.") for key in state)
    for key, value in body.items():
        assert torch.equal(value, state[key]), key


def test_weights_with_nan_are_refused_when_read_not_blamed_on_the_learning_rate(tmp_path):
    state = torchvision_state("resnet18")
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(UserError, match=r"NaN or infinite weights \(1 tensors, first layer2.0.conv1.weight\)"):
        read_resnet_weights(tmp_path / "damaged.pth")
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "damaged.pth", *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, "NaN or infinite weights")
    assert not (tmp_path / "runs" / "images" / "checkpoint.pt").exists()


def test_a_raw_pickle_is_refused_without_pytorchs_protocol_warning(tmp_path, recwarn):
    import pickle

    with open(tmp_path / "raw.pkl", "wb") as handle:
        pickle.dump(torchvision_state("resnet18"), handle, protocol=4)
    with pytest.raises(UserError, match="more than tensors"):
        read_resnet_weights(tmp_path / "raw.pkl")
    assert not [warning for warning in recwarn if "pickle protocol" in str(warning.message)]


# --------------------------------------------------------------------------------------------
# Pretrained weights by name (torchvision's weight API and torch.hub's cache; never the network)


def _cache_with(tmp_path, monkeypatch, state, name="resnet18.IMAGENET1K_V1"):
    """torch.hub's cache in tmp_path holding ``state`` as the file torchvision publishes for
    ``name``: its URL is made to carry this file's own hash prefix, as torchvision's real ones do."""
    import hashlib

    import simsiam_embed.pretrained_weights as pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    file = checkpoints / f"resnet18-{prefix}.pth"
    staged.rename(file)
    real = pretrained.published_weights

    def published(asked, backbone):
        label, _url = real(asked, backbone)
        return label, f"https://download.pytorch.org/models/{file.name}"

    monkeypatch.setattr(pretrained, "published_weights", published)
    return file


def test_pretrain_starts_from_imagenet_weights_by_name_from_the_cache(tmp_path, monkeypatch):
    import torch.hub

    state = torchvision_state("resnet18")
    file = _cache_with(tmp_path, monkeypatch, state)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("nothing is downloaded"))
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "imagenet", "--epochs", "1", *FAST_TRAINING, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "torchvision's resnet18.IMAGENET1K_V1" in result.stderr and str(file) in result.stderr
    config = json.loads((tmp_path / "runs" / "images" / "config.json").read_text())
    assert config["init"] == "resnet18.IMAGENET1K_V1" and config["backbone"] == "resnet18"
    resumed = invoke("pretrain", "images", "--init", "imagenet", "--epochs", "1", *FAST_TRAINING, cwd=tmp_path)
    assert resumed.exit_code == 0, resumed.output   # a finished run: nothing to do, the name is no path


def test_a_cached_file_that_is_not_the_published_one_is_refused_with_how_to_remove_it(tmp_path, monkeypatch):
    file = _cache_with(tmp_path, monkeypatch, torchvision_state("resnet18"))
    file.write_bytes(file.read_bytes()[:-10] + bytes(10))   # damaged in the cache
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "resnet18.IMAGENET1K_V1", *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, "is not the file torchvision publishes", f"rm {file}")


def test_a_download_that_fails_names_the_file_and_where_it_goes_and_leaves_nothing(tmp_path, monkeypatch):
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "imagenet", *FAST_TRAINING, cwd=tmp_path)
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    assert_one_line_error_in_process(result, "cannot download resnet18.IMAGENET1K_V1", "resnet18-f37072fd.pth",
                                     str(cache / "resnet18-f37072fd.pth"))
    assert list(cache.iterdir()) == [] and not (tmp_path / "runs" / "images" / "checkpoint.pt").exists()


@pytest.mark.parametrize("given", ["resnet50.IMAGENET9K_V7", "missing-file.pth"])
def test_an_unknown_name_or_a_missing_file_lists_the_names_there_are(tmp_path, given):
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", given, *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, f"{given} is neither a file nor a weights name",
                                     "imagenet", "resnet50.IMAGENET1K_V2")


def test_index_search_and_knn_use_pretrained_weights_by_name_with_no_training(tmp_path, monkeypatch):
    state = torchvision_state("resnet18")
    _cache_with(tmp_path, monkeypatch, state)
    images = make_image_folder(tmp_path / "images", per_class=3, size=24)
    indexed = invoke("index", "images", "--model", "imagenet", "--workers", "0", cwd=tmp_path)
    assert indexed.exit_code == 0, indexed.output
    run = tmp_path / "runs" / "resnet18.IMAGENET1K_V1"
    assert (run / "checkpoint.pt").is_file() and not (tmp_path / "runs" / "LATEST").exists()
    # The exported encoder is the file's backbone: its weights, ImageNet's 224-px preprocessing.
    from simsiam_embed.trained_model import load_trained_backbone

    backbone, preprocessing, _config = load_trained_backbone(run)
    assert preprocessing.input_size == 224
    assert torch.equal(backbone.resnet.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    found = invoke("search", str(images / "disc" / "disc-00.png"), "--json", cwd=tmp_path)
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)[0]["hits"][0]["path"].endswith("disc-00.png")
    scored = invoke("knn", "--train", "images", "--test", "images", "--model", "imagenet", "--json", cwd=tmp_path)
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["trained"]["test"] == 9

    nothing_to_index = invoke("index", "--model", "imagenet", "--index-dir", "other", cwd=tmp_path)
    assert_one_line_error_in_process(nothing_to_index, "name the folder to index")
    unknown = invoke("embed", "images", "-o", "out", "--model", "resnet50.IMAGENET9K_V7", cwd=tmp_path)
    assert_one_line_error_in_process(unknown, "resnet50.IMAGENET9K_V7", "imagenet")


# timm's names: the Hugging Face Hub's cache, laid out here as its client lays it out


def _hub_cache_with(tmp_path, monkeypatch, state, name="resnet18.a1_in1k"):
    """The Hub's cache in tmp_path holding ``state`` as timm's ``name``: the blob named by its
    SHA-256 (as the Hub publishes it), a snapshot linking to it, refs/main naming the snapshot."""
    import hashlib

    import huggingface_hub.constants
    from safetensors.torch import save_file

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repository = cache / f"models--timm--{name}"
    staged = tmp_path / "staged.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    (repository / "blobs").mkdir(parents=True)
    blob = repository / "blobs" / digest
    staged.rename(blob)
    commit = "0" * 40
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(commit)
    (repository / "snapshots" / commit).mkdir(parents=True)
    (repository / "snapshots" / commit / "model.safetensors").symlink_to(f"../../blobs/{digest}")
    return repository, blob


def _no_hub_downloads(monkeypatch):
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def cache_only(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the Hub: the machine is offline")
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cache_only)


def test_pretrain_starts_from_timm_weights_by_name_from_the_hub_cache(tmp_path, monkeypatch):
    state = torchvision_state("resnet18", seed=3)   # timm's plain ResNets share torchvision's names
    _hub_cache_with(tmp_path, monkeypatch, state)
    _no_hub_downloads(monkeypatch)
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "resnet18.a1_in1k", "--epochs", "1", *FAST_TRAINING, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert "timm's resnet18.a1_in1k" in result.stderr
    config = json.loads((tmp_path / "runs" / "images" / "config.json").read_text())
    assert config["init"] == "resnet18.a1_in1k" and config["backbone"] == "resnet18"


def test_a_damaged_hub_blob_is_refused_with_how_to_remove_it(tmp_path, monkeypatch):
    repository, blob = _hub_cache_with(tmp_path, monkeypatch, torchvision_state("resnet18"))
    blob.write_bytes(blob.read_bytes()[:-10] + bytes(10))
    _no_hub_downloads(monkeypatch)
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "resnet18.a1_in1k", *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, "is not the file the Hugging Face Hub publishes", f"rm -r {repository}")


def test_timm_weights_offline_name_the_repository_and_the_cache_and_leave_nothing(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _no_hub_downloads(monkeypatch)
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "resnet50.a1_in1k", *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, "cannot download timm's resnet50.a1_in1k",
                                     "hf download timm/resnet50.a1_in1k model.safetensors",
                                     "models--timm--resnet50.a1_in1k", str(cache))
    assert not (tmp_path / "runs" / "images" / "checkpoint.pt").exists()


def test_an_unknown_timm_tag_lists_the_names_there_are(tmp_path):
    make_image_folder(tmp_path / "images", per_class=4, size=16)
    result = invoke("pretrain", "images", "--init", "resnet18.zz_in1k", *FAST_TRAINING, cwd=tmp_path)
    assert_one_line_error_in_process(result, "resnet18.zz_in1k is neither a file nor a weights name",
                                     "resnet18.a1_in1k", "resnet50.IMAGENET1K_V2")


def test_a_cpu_budget_too_short_to_learn_starts_from_cached_imagenet_weights_unless_told_not_to(tmp_path, monkeypatch):
    from simsiam_embed.training import budget_plan

    _cache_with(tmp_path, monkeypatch, torchvision_state("resnet18"))
    monkeypatch.setattr(budget_plan, "measure_seconds_per_pair", lambda config, crop: 1.0)   # a very slow machine
    make_image_folder(tmp_path / "images", per_class=4, size=72)   # photos: the ImageNet recipe, a standard stem
    tiny = ["--workers", "0", "--dim", "64", "--projector-hidden-dim", "64", "--predictor-hidden-dim", "16"]
    result = invoke("pretrain", "images", "--time-budget", "3s", *tiny, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "runs" / "images" / "config.json").read_text())
    assert config["init"] == "resnet18.IMAGENET1K_V1"
    assert config["choices"][0].startswith("init resnet18.IMAGENET1K_V1: the time budget affords about")
    assert "--init none" in config["choices"][0] and "warning: the time budget" not in result.stderr

    scratch = invoke("pretrain", "images", "--time-budget", "3s", "--init", "none", "--name", "scratch", *tiny,
                     cwd=tmp_path)
    assert scratch.exit_code == 0, scratch.output
    assert json.loads((tmp_path / "runs" / "scratch" / "config.json").read_text())["init"] is None
    assert "warning: the time budget affords about" in scratch.stderr
