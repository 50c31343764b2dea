"""Detection transfer: the three annotation formats, box validation, fine-tuning, COCO AP, detectron2."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_one_line_error_in_process, invoke
from simsiam_embed.trained_model import build_model
from simsiam_embed.artefacts import Checkpoint
from simsiam_embed.settings import PretrainConfig
from simsiam_embed.detection.finetune import (
    DetectionConfig, build_detector, finetune_detection, simsiam_backbone_weights,
)
from simsiam_embed.detection.data import load_detection_set
from simsiam_embed.detection.evaluate import coco_ground_truth, coco_metrics
from simsiam_embed.detection.detectron2 import detectron2_key, export_detectron2
from simsiam_embed.errors import UserError
from simsiam_embed.training.loop import StopRequest
from simsiam_embed.workspace import Workspace

CLASSES = ["box", "disc"]


def draw_detection_images(folder: Path, count: int = 8, size: int = 64, seed: int = 0) -> dict[str, list]:
    """Images with one or two shapes at known pixel boxes: file name -> [(x1, y1, x2, y2, class)]."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for number in range(count):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(image)
        shapes = []
        for _ in range(1 + number % 2):
            x1, y1 = (int(v) for v in rng.integers(0, size // 2, 2))
            w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
            label = int(rng.integers(0, 2))
            colour = tuple(int(v) for v in rng.integers(150, 255, 3))
            (draw.rectangle if label == 0 else draw.ellipse)([x1, y1, x1 + w, y1 + h], fill=colour)
            shapes.append((x1, y1, x1 + w, y1 + h, label))
        name = f"shapes-{number:02d}.png"
        image.save(folder / name)
        truth[name] = shapes
    return truth


def write_coco(path: Path, truth: dict, size: int = 64) -> Path:
    images, annotations = [], []
    for image_id, (name, shapes) in enumerate(sorted(truth.items())):
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        for x1, y1, x2, y2, label in shapes:
            annotations.append({"id": len(annotations), "image_id": image_id, "category_id": label + 10,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0, "area": (x2 - x1) * (y2 - y1)})
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": i + 10, "name": n} for i, n in enumerate(CLASSES)]}))
    return path


def write_voc(folder: Path, truth: dict, size: int = 64) -> Path:
    (folder / "Annotations").mkdir(parents=True, exist_ok=True)
    for name, shapes in truth.items():
        objects = "".join(
            f"<object><name>{CLASSES[label]}</name><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for x1, y1, x2, y2, label in shapes)
        (folder / "Annotations" / f"{Path(name).stem}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")
    return folder


def write_yolo(folder: Path, truth: dict, size: int = 64) -> Path:
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for name, shapes in truth.items():
        lines = [f"{label} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"
                 for x1, y1, x2, y2, label in shapes]
        (folder / "labels" / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def three_formats(tmp_path: Path):
    """The same images and boxes as COCO JSON, a VOC folder and a YOLO folder."""
    images = tmp_path / "images"
    truth = draw_detection_images(images)
    coco = write_coco(tmp_path / "train.json", truth)
    voc = write_voc(tmp_path, truth)   # finds its images in images/ beside Annotations/
    yolo_root = tmp_path / "yolo"
    yolo_root.mkdir()
    (yolo_root / "images").symlink_to(images)
    yolo = write_yolo(yolo_root, truth)
    return truth, coco, voc, yolo


def _by_name(dataset):
    return {image.path.name: (image.boxes, image.labels) for image in dataset.images}


def test_all_three_formats_give_the_same_boxes(three_formats):
    truth, coco, voc, yolo = three_formats
    parsed = {source: load_detection_set(source) for source in (coco, voc, yolo)}
    assert {d.source_format for d in parsed.values()} == {"coco", "voc", "yolo"}
    for dataset in parsed.values():
        assert dataset.class_names == CLASSES
        assert not dataset.problems.counts, dataset.problems.summary()
        boxes = _by_name(dataset)
        assert set(boxes) == set(truth)
        for name, shapes in truth.items():
            expected = np.array([s[:4] for s in shapes], dtype=np.float32)
            np.testing.assert_allclose(boxes[name][0], expected, atol=1e-3)
            assert boxes[name][1].tolist() == [s[4] for s in shapes]


def test_bad_boxes_are_fixed_or_dropped_and_counted(tmp_path: Path):
    truth = draw_detection_images(tmp_path)
    name = sorted(truth)[0]
    truth[name] = truth[name] + [(-10, -5, 20, 30, 0), (40, 40, 40, 60, 1), (100, 100, 120, 120, 0)]
    dataset = load_detection_set(write_coco(tmp_path / "a.json", truth))
    boxes, labels = _by_name(dataset)[name]
    assert [0.0, 0.0, 20.0, 30.0] in boxes.tolist()          # clipped into the image
    assert len(boxes) == len(truth[name]) - 2                 # zero-width and outside boxes dropped
    assert dataset.problems.counts["boxes clipped to their image"] == 1
    assert dataset.problems.counts["degenerate or outside-the-image boxes dropped"] == 2


def test_missing_images_unknown_categories_and_empty_files(tmp_path: Path):
    truth = draw_detection_images(tmp_path, count=4)
    document = json.loads(write_coco(tmp_path / "a.json", truth).read_text())
    document["images"].append({"id": 99, "file_name": "not-there.png", "width": 64, "height": 64})
    document["annotations"].append({"id": 999, "image_id": 0, "category_id": 77, "bbox": [1, 1, 10, 10]})
    (tmp_path / "b.json").write_text(json.dumps(document))
    dataset = load_detection_set(tmp_path / "b.json")
    assert len(dataset.images) == 4
    assert dataset.problems.counts["annotated images missing on disk, skipped"] == 1
    assert dataset.problems.counts["annotations of unknown categories dropped"] == 1
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(UserError, match="no \"images\" list"):
        load_detection_set(tmp_path / "empty.json")
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(UserError, match="no VOC .xml files and no YOLO"):
        load_detection_set(tmp_path / "nothing-here")


def test_validation_set_follows_the_training_class_order(tmp_path: Path):
    truth = draw_detection_images(tmp_path, count=4)
    voc = write_voc(tmp_path / "voc", {k: v for k, v in truth.items()})
    for name in truth:
        Image.open(tmp_path / name).save(voc / "Annotations" / name)
    dataset = load_detection_set(voc, class_names=["disc"])
    assert dataset.class_names == ["disc"]
    assert all(set(image.labels.tolist()) <= {0} for image in dataset.images)
    assert dataset.problems.counts["annotations of unknown categories dropped"] == sum(
        label == 0 for shapes in truth.values() for *_, label in shapes)


def test_coco_metrics_score_perfect_and_empty_detections(three_formats):
    _, coco, _, _ = three_formats
    dataset = load_detection_set(coco)
    truth = coco_ground_truth(dataset)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in truth["annotations"]]
    ap, ap50, ap75, per_class = coco_metrics(truth, perfect, dataset.class_names)
    assert ap == pytest.approx(1.0) and ap50 == pytest.approx(1.0) and ap75 == pytest.approx(1.0)
    assert per_class == {name: pytest.approx(1.0) for name in CLASSES}
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2], *d["bbox"][1:]]} for d in perfect]   # IoU 0
    assert coco_metrics(truth, shifted, dataset.class_names)[1] == 0.0
    assert coco_metrics(truth, [], dataset.class_names)[:3] == (0.0, 0.0, 0.0)


def _simsiam_checkpoint(path: Path, small_image_stem: bool = False, backbone: str = "resnet18") -> Path:
    config = PretrainConfig(data_dir="x", run_name="x", backbone=backbone, small_image_stem=small_image_stem,
                            dim=64, projector_hidden_dim=64, predictor_hidden_dim=16, projector_layers=2)
    torch.manual_seed(3)
    model = build_model(config)
    with torch.no_grad():   # statistics that differ from a fresh BN's, so loading them is visible
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    path.mkdir(parents=True, exist_ok=True)
    Checkpoint(kind="pretrain", settings=config.to_dict(), model=model.state_dict(), step=1, finished=True,
               extra={"steps_per_epoch": 1}).save(path / "checkpoint.pt")
    return path


@pytest.mark.parametrize("norm", ["bn", "frozen"])
def test_detector_backbone_equals_the_simsiam_backbone(tmp_path: Path, norm: str):
    run = _simsiam_checkpoint(tmp_path / "run")
    weights, name = simsiam_backbone_weights(run)
    detector, loaded = build_detector(DetectionConfig(data="x", backbone=name, norm=norm), 2, weights)
    body = detector.backbone.body.state_dict()
    expected = {k: v for k, v in weights.items() if not k.startswith("fc.") and
                not (norm == "frozen" and k.endswith("num_batches_tracked"))}
    assert loaded == len(expected)
    assert set(body) == set(expected)
    for key, value in expected.items():
        assert torch.equal(body[key], value), key


def test_architecture_mismatches_are_clear_errors(tmp_path: Path):
    with pytest.raises(UserError, match="small-image stem"):
        simsiam_backbone_weights(_simsiam_checkpoint(tmp_path / "small", small_image_stem=True))
    weights, _ = simsiam_backbone_weights(_simsiam_checkpoint(tmp_path / "r18"))
    with pytest.raises(UserError, match="does not fit the detector's ResNet"):
        build_detector(DetectionConfig(data="x", backbone="resnet50"), 2, weights)


def test_detectron2_key_mapping_and_export(tmp_path: Path):
    assert detectron2_key("conv1.weight") == "stem.conv1.weight"
    assert detectron2_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_key("layer1.0.conv2.weight") == "res2.0.conv2.weight"
    assert detectron2_key("layer3.1.bn3.bias") == "res4.1.conv3.norm.bias"
    assert detectron2_key("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert detectron2_key("layer4.0.downsample.1.running_mean") == "res5.0.shortcut.norm.running_mean"
    run = _simsiam_checkpoint(tmp_path / "run")
    count, settings = export_detectron2(run, tmp_path / "out" / "r18.pkl")
    payload = pickle.loads((tmp_path / "out" / "r18.pkl").read_bytes())
    weights, _ = simsiam_backbone_weights(run)
    assert count == len(payload["model"]) == sum(not k.endswith("num_batches_tracked") for k in weights)
    np.testing.assert_array_equal(payload["model"]["res2.0.conv1.norm.running_mean"],
                                  weights["layer1.0.bn1.running_mean"].numpy())
    assert "MODEL.RESNETS.DEPTH 18" in settings and "STRIDE_IN_1X1 False" in settings


def _tiny_config(coco: Path, **overrides) -> DetectionConfig:
    values = dict(data=str(coco), val_data=str(coco), init="random", backbone="resnet18", epochs=4, batch_size=2,
                  base_lr=0.08, warmup_steps=2, min_size=64, max_size=64, num_workers=0, log_every=1)
    return DetectionConfig(**{**values, **overrides})


def test_finetuning_lowers_the_loss_and_is_scored_by_coco_ap(three_formats, tmp_path: Path):
    _, coco, _, _ = three_formats
    result = finetune_detection(_tiny_config(coco), Workspace(tmp_path / "ws"), report=lambda _m: None,
                                show_progress=False)
    assert result.finished and result.step == 4 * 4
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
    assert 0.0 <= result.evaluation.ap50 <= 1.0 and result.evaluation.images == 8
    saved = json.loads((result.run_dir / "evaluation.json").read_text())
    assert saved["AP50"] == pytest.approx(result.evaluation.ap50, abs=1e-4)
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 16


def test_interrupted_finetuning_resumes_to_the_same_weights(three_formats, tmp_path: Path):
    _, coco, _, _ = three_formats
    config = _tiny_config(coco, val_data=None, epochs=2)
    straight = finetune_detection(config, Workspace(tmp_path / "a"), report=lambda _m: None, show_progress=False)
    stopped = finetune_detection(_tiny_config(coco, val_data=None, epochs=2), Workspace(tmp_path / "b"),
                                 report=lambda _m: None, show_progress=False, stop=StopRequest(stop_at_step=3))
    assert not stopped.finished and stopped.step == 3
    with pytest.raises(UserError, match="--resume"):
        finetune_detection(_tiny_config(coco, val_data=None, epochs=2), Workspace(tmp_path / "b"),
                           report=lambda _m: None, show_progress=False)
    # A changed setting on resume is refused, as pretrain refuses it; the device may change.
    with pytest.raises(UserError, match="epochs=2, not 3"):
        finetune_detection(_tiny_config(coco, val_data=None, epochs=3), Workspace(tmp_path / "b"), resume=True,
                           report=lambda _m: None, show_progress=False, explicit={"epochs", "device"})
    # Steps logged after the checkpoint (here: a crash after step 3's log line) are not logged twice.
    metrics = stopped.run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + json.dumps({"step": 4, "loss": 9.0}) + "\n")
    resumed = finetune_detection(_tiny_config(coco, val_data=None, epochs=2), Workspace(tmp_path / "b"), resume=True,
                                 report=lambda _m: None, show_progress=False, explicit={"device"})
    assert resumed.finished and resumed.step == straight.step
    a = Checkpoint.load(straight.run_dir / "checkpoint.pt").model
    b = Checkpoint.load(resumed.run_dir / "checkpoint.pt").model
    assert all(torch.equal(a[key], b[key]) for key in a)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)) and 9.0 not in [json.loads(line).get("loss") for line in metrics.read_text().splitlines()]
    assert (resumed.run_dir / "skipped.jsonl").exists()


def test_cli_finetunes_from_a_simsiam_run_and_reports_json(three_formats, tmp_path: Path):
    _, _, voc, _ = three_formats
    run = _simsiam_checkpoint(tmp_path / "runs" / "photos")
    result = invoke("finetune-detection", "--data", str(voc), "--val-data", str(voc), "--checkpoint", str(run),
                      "--epochs", "1", "--batch-size", "2", "--min-size", "64", "--max-size", "64",
                      "--roi-samples", "32", "--workers", "0", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["init"] == "simsiam" and report["loaded_tensors"] > 100 and report["steps"] == 4
    assert report["data_problems"] == {}
    assert json.loads((Path(report["run"]) / "config.json").read_text())["roi_samples"] == 32
    assert set(report["evaluation"]["per_class_AP"]) == set(CLASSES)
    assert "tensors loaded from the SimSiam checkpoint" in result.stderr


def test_cli_bad_detection_input_is_one_line(tmp_path: Path):
    (tmp_path / "empty.json").write_text("")
    assert_one_line_error_in_process(
        invoke("finetune-detection", "--data", "empty.json", "--init", "random", cwd=tmp_path), "empty.json")
    assert_one_line_error_in_process(invoke("finetune-detection", "--data", "x.json", cwd=tmp_path), "pretrain")
    assert_one_line_error_in_process(
        invoke("finetune-detection", "--data", "x.json", "--roi-samples", "0", cwd=tmp_path), "--roi-samples")
    run = _simsiam_checkpoint(tmp_path / "small", small_image_stem=True)
    truth = draw_detection_images(tmp_path / "images", count=2)
    write_coco(tmp_path / "images" / "a.json", truth)
    assert_one_line_error_in_process(
        invoke("finetune-detection", "--data", "images/a.json", "--checkpoint", str(run), cwd=tmp_path), "small-image stem")
    assert_one_line_error_in_process(invoke("export-detectron2", "-o", "out.pkl", cwd=tmp_path / "images"), "pretrain")
    assert_one_line_error_in_process(
        invoke("export-detectron2", str(run), "-o", "out.pkl", cwd=tmp_path), "small-image stem")


def _yolo_labels(folder: Path, truth: dict, size: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, shapes in truth.items():
        lines = [f"{label} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}"
                 for x1, y1, x2, y2, label in shapes]
        (folder / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")


def make_ultralytics(root: Path, yaml_text: str) -> dict[str, dict]:
    """images/{train,val}/ and labels/{train,val}/ under ``root``, with ``yaml_text`` as data.yaml."""
    truths = {}
    for split, seed in (("train", 0), ("val", 1)):
        truths[split] = draw_detection_images(root / "images" / split, count=4, seed=seed)
        _yolo_labels(root / "labels" / split, truths[split])
    (root / "data.yaml").write_text(yaml_text)
    return truths


@pytest.mark.parametrize("yaml_text", [
    "train: images/train\nval: images/val\nnames: [box, disc]\n",
    "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: box\n  1: disc\n",
    # Written on another machine: absolute paths there, re-rooted here.
    "path: /home/alice/datasets/shapes\ntrain: /home/alice/datasets/shapes/images/train\n"
    "val: /home/alice/datasets/shapes/images/val\nnames: {0: box, 1: disc}\n",
    # Written on Windows (a real Ultralytics file's form): drive letters and backslashes, re-rooted too.
    "path: F:\\github_projects\\datasets\\shapes\ntrain: F:\\github_projects\\datasets\\shapes\\images\\train\n"
    "val: images\\val\nnames: [box, disc]\n",
])
def test_ultralytics_data_yaml_gives_the_boxes_of_each_split(tmp_path: Path, yaml_text: str):
    truths = make_ultralytics(tmp_path / "shapes", yaml_text)
    for source in (tmp_path / "shapes" / "data.yaml", tmp_path / "shapes"):   # the file or its folder
        for split in ("train", "val"):
            dataset = load_detection_set(source, split=split)
            assert dataset.class_names == CLASSES and not dataset.problems.counts, dataset.problems.summary()
            boxes = _by_name(dataset)
            assert set(boxes) == set(truths[split])
            for name, shapes in truths[split].items():
                np.testing.assert_allclose(boxes[name][0], np.array([s[:4] for s in shapes], dtype=np.float32), atol=1e-3)
                assert boxes[name][1].tolist() == [s[4] for s in shapes]


def test_roboflow_export_layout(tmp_path: Path):
    root = tmp_path / "export"
    truths = {}
    for split, seed in (("train", 0), ("valid", 1)):
        truths[split] = draw_detection_images(root / split / "images", count=3, seed=seed)
        _yolo_labels(root / split / "labels", truths[split])
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 2\nnames: ['box', 'disc']\n")
    assert set(_by_name(load_detection_set(root))) == set(truths["train"])
    assert set(_by_name(load_detection_set(root, split="val"))) == set(truths["valid"])


@pytest.mark.parametrize("yaml_text, fragment", [
    ("train: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("train: images/train\nnames: {0: box, 2: disc}\n", "'names'"),
    ("train: nowhere/train\nnames: [box]\n", "not on this machine"),
    ("val: images/val\nnames: [box]\n", "no 'train' split"),
    ("train: !!python/object/apply:os.system ['true']\nnames: [box]\n", "not valid YAML"),
])
def test_a_bad_data_yaml_is_one_line(tmp_path: Path, yaml_text: str, fragment: str):
    make_ultralytics(tmp_path, yaml_text)
    with pytest.raises(UserError, match=fragment):
        load_detection_set(tmp_path / "data.yaml")


def test_cli_fine_tunes_from_a_data_yaml_scores_its_val_split_and_is_done_after(tmp_path: Path):
    make_ultralytics(tmp_path / "shapes", "train: images/train\nval: images/val\nnames: [box, disc]\n")
    common = ["finetune-detection", "--data", "shapes", "--init", "random", "--epochs", "1", "--batch-size", "2",
              "--min-size", "64", "--max-size", "64", "--roi-samples", "16", "--workers", "0", "--json"]
    first = invoke(*common, cwd=tmp_path)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["finished"] and report["evaluation"]["images"] == 4
    assert "the 'val' split of shapes" in first.stderr and Path(report["run"]).name == "detection-shapes-random"
    again = invoke(*common, cwd=tmp_path)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["already_finished"] and "nothing to do" in again.stderr


def test_cli_json_without_val_data_still_reports_the_run(tmp_path: Path):
    truth = draw_detection_images(tmp_path / "yolo" / "images", count=4)
    write_yolo(tmp_path / "yolo", truth)
    result = invoke("finetune-detection", "--data", "yolo", "--init", "random", "--epochs", "1", "--batch-size", "2",
                      "--min-size", "64", "--max-size", "64", "--roi-samples", "16", "--workers", "0", "--json",
                      cwd=tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["evaluation"] is None and report["finished"]


@pytest.mark.parametrize("memory_gib, processes, max_size, expected", [
    (80, 1, 853, 16), (24, 1, 853, 16), (16, 1, 853, 8), (8, 1, 853, 4), (8, 2, 853, 8), (16, 1, 1333, 4),
    (80, 3, 853, 15), (80, 5, 853, 15), (80, 6, 853, 12), (80, 7, 853, 14),   # an equal share for every GPU
])
def test_the_gpu_detection_batch_follows_the_memory(monkeypatch, memory_gib, processes, max_size, expected):
    import simsiam_embed.settings as config_module
    from simsiam_embed.detection.finetune import default_detection_batch

    monkeypatch.setattr(config_module, "gpu_memory_bytes", lambda _device: int(memory_gib * 2 ** 30))
    batch, reason = default_detection_batch("cuda", max_size, processes)
    assert batch == expected and reason.startswith(f"batch {expected}:")
    assert default_detection_batch("cpu", 853, 1)[0] == 4


def test_images_travel_as_uint8_and_train_as_to_tensor_would_make_them(three_formats, tmp_path: Path):
    """Each image went through the loader's shared memory as float32: a 12-megapixel photo is
    144 MB so, 36 MB as uint8."""
    from torchvision.transforms import functional as TF

    from simsiam_embed.detection.finetune import DetectionTrainingSet
    from simsiam_embed.image_files import open_image

    _, coco, _, _ = three_formats
    dataset = load_detection_set(coco)
    training = DetectionTrainingSet(dataset.images, flip=False)
    (image, _target), failures = training[(0, 0)]
    assert image.dtype == torch.uint8 and not failures
    expected = TF.to_tensor(open_image(dataset.images[0].path, upright=False))
    assert torch.equal(image.float().div_(255), expected)
