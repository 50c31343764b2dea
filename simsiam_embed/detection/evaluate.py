"""COCO-style detection metrics (AP, AP50, AP75, per-class AP) computed by pycocotools.

    >>> evaluation = evaluate_detector(detector, val_set, "cpu")
    >>> evaluation.ap, evaluation.ap50, evaluation.per_class_ap["raccoon"]

Whatever the annotation format, the validation set is handed to the official COCO evaluator as
a ground-truth object built in memory, so the numbers mean what they mean in every paper.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms import functional as TF
from tqdm import tqdm

from simsiam_embed.image_files import UnreadableImage, open_image
from simsiam_embed.detection.data import DetectionSet


@dataclass
class DetectionEvaluation:
    ap: float            # mean over IoU 0.50:0.95, as COCO's headline AP
    ap50: float
    ap75: float
    per_class_ap: dict[str, float]   # NaN for a class with no box in the validation set
    images: int
    boxes: int
    detections: int

    def to_dict(self) -> dict:
        as_number = lambda v: None if math.isnan(v) else round(v, 4)  # noqa: E731  (JSON has no NaN)
        return {"AP": as_number(self.ap), "AP50": as_number(self.ap50), "AP75": as_number(self.ap75),
                "per_class_AP": {name: as_number(v) for name, v in self.per_class_ap.items()},
                "images": self.images, "boxes": self.boxes, "detections": self.detections}

    @classmethod
    def from_dict(cls, values: dict) -> "DetectionEvaluation":
        """Read back :meth:`to_dict`'s JSON (None -> NaN); raises ValueError/TypeError/KeyError if malformed."""
        as_float = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return cls(as_float(values["AP"]), as_float(values["AP50"]), as_float(values["AP75"]),
                   {str(name): as_float(v) for name, v in dict(values["per_class_AP"]).items()},
                   int(values["images"]), int(values["boxes"]), int(values["detections"]))


def coco_ground_truth(dataset: DetectionSet) -> dict:
    """The validation set as a COCO annotation document (category ids are class index + 1)."""
    annotations = []
    for image_id, image in enumerate(dataset.images):
        for (x1, y1, x2, y2), label in zip(image.boxes.tolist(), image.labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": [{"id": i, "width": image.width, "height": image.height, "file_name": str(image.path)}
                       for i, image in enumerate(dataset.images)],
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(dataset.class_names)]}


def coco_metrics(ground_truth: dict, detections: list[dict], class_names: list[str]) -> tuple[float, float, float, dict]:
    """pycocotools' bbox evaluation: (AP, AP50, AP75, per-class AP). No detection scores 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        # pycocotools cannot load an empty result list; with no detection every AP is 0.
        has_boxes = {a["category_id"] for a in ground_truth["annotations"]}
        return 0.0, 0.0, 0.0, {name: 0.0 if i + 1 in has_boxes else float("nan") for i, name in enumerate(class_names)}
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress and table
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: [IoU thresholds, recall points, classes, area ranges, max detections]
    precision = evaluator.eval["precision"]
    per_class = {}
    for index, name in enumerate(class_names):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        per_class[name] = float(values.mean()) if values.size else float("nan")
    ap, ap50, ap75 = (float(max(v, 0.0)) for v in evaluator.stats[:3])
    return ap, ap50, ap75, per_class


@torch.no_grad()
def predict(detector: nn.Module, dataset: DetectionSet, device: str, show_progress: bool = False) -> list[dict]:
    """Run ``detector`` over every image; COCO result dicts (xywh boxes, category = label)."""
    detector.eval()
    results = []
    for image_id, record in enumerate(tqdm(dataset.images, desc="evaluating", unit="image", disable=not show_progress)):
        try:
            image = TF.to_tensor(open_image(record.path, upright=False)).to(device)
        except UnreadableImage:
            continue   # it was readable when the annotations were loaded; counts as no detections
        output = detector([image])[0]
        for (x1, y1, x2, y2), label, score in zip(output["boxes"].tolist(), output["labels"].tolist(),
                                                  output["scores"].tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "score": float(score),
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return results


def evaluate_detector(detector: nn.Module, dataset: DetectionSet, device: str,
                      show_progress: bool = False) -> DetectionEvaluation:
    """COCO AP of ``detector`` on ``dataset`` (whose class order must be the detector's)."""
    was_training = detector.training
    detections = predict(detector, dataset, device, show_progress)
    detector.train(was_training)
    ap, ap50, ap75, per_class = coco_metrics(coco_ground_truth(dataset), detections, dataset.class_names)
    return DetectionEvaluation(ap, ap50, ap75, per_class, len(dataset.images), dataset.box_count, len(detections))

