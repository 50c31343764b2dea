"""Detection annotations: COCO JSON, PASCAL VOC XML folders and YOLO txt labels, one interface.

    >>> dataset = load_detection_set(Path("raccoon/annotations"))     # any of the formats
    >>> val_set = load_detection_set(Path("data.yaml"), split="val")  # Ultralytics / Roboflow
    >>> dataset.images[0].boxes      # float32 [N, 4], x1 y1 x2 y2 in pixels, clipped to the image
    >>> print(dataset.problems.summary())

Every format becomes a :class:`DetectionSet`: images with pixel boxes and class indices into
``class_names``. Boxes are validated on the way in: a box partly outside its image is clipped,
a degenerate or wholly outside one is dropped, each counted in ``problems`` (never a crash).
Images without boxes are kept (negatives teach the detector what is background).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

from simsiam_embed.image_files import IMAGE_EXTENSIONS
from simsiam_embed.errors import UserError

#: A box narrower or shorter than this (pixels, after clipping) cannot be learned: dropped.
MIN_BOX_SIDE = 1.0
CLIP_TOLERANCE = 0.5

YOLO_CLASS_FILES = ("classes.txt", "obj.names", "classes.names")
DATA_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")
SPLITS = ("train", "val")


@dataclass
class DetectionImage:
    path: Path
    width: int
    height: int
    boxes: np.ndarray            # float32 [N, 4]: x1, y1, x2, y2 in pixels
    labels: np.ndarray           # int64 [N]: indices into DetectionSet.class_names


@dataclass
class AnnotationProblems:
    """What was wrong with the annotations and what was done about it, counted."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, example)

    def summary(self) -> str:
        return "; ".join(f"{count} {kind} (e.g. {self.examples[kind]})" for kind, count in sorted(self.counts.items()))


@dataclass
class DetectionSet:
    images: list[DetectionImage]
    class_names: list[str]
    source_format: str
    problems: AnnotationProblems

    @property
    def box_count(self) -> int:
        return sum(len(image.boxes) for image in self.images)


def load_detection_set(source: Path, class_names: list[str] | None = None, split: str = "train") -> DetectionSet:
    """Read ``source`` in whichever format it is: a COCO ``.json`` file, a folder of VOC
    ``.xml`` files, a YOLO folder (``images/`` and ``labels/`` with a class-name file), or an
    Ultralytics / Roboflow ``data.yaml`` (the file or its folder), of which ``split`` is read.

    ``class_names`` fixes the class order (a validation set must use its training set's);
    annotations of other classes are then dropped and counted as unknown.
    """
    source = Path(source)
    if not source.exists():
        raise UserError(f"no annotations at {source}: give a COCO .json file, a VOC folder, a YOLO folder or a data.yaml")
    data_yaml = data_yaml_of(source)
    if data_yaml is not None:
        dataset = _load_ultralytics(data_yaml, split, class_names)
    elif source.is_file():
        if source.suffix.lower() != ".json":
            raise UserError(f"{source} is not a COCO .json file: give a .json file, a VOC folder, a YOLO folder "
                            "or a data.yaml")
        dataset = _load_coco(source, class_names)
    elif _voc_xml_files(source):
        dataset = _load_voc(source, class_names)
    elif (source / "labels").is_dir():
        dataset = _load_yolo(source, class_names)
    else:
        raise UserError(f"{source} holds no VOC .xml files and no YOLO labels/ folder: "
                        "give a COCO .json file, a VOC folder or a YOLO folder (images/, labels/, classes.txt)")
    if not dataset.images:
        raise UserError(f"{source} has no usable annotated image" +
                        (f" ({dataset.problems.summary()})" if dataset.problems.counts else "") +
                        ": check that the annotations name images that exist")
    return dataset


def _clean_boxes(raw: list[tuple[float, float, float, float]], labels: list[int], width: int, height: int,
                 where: str, problems: AnnotationProblems) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image; drop the ones that are degenerate or outside it; count both."""
    kept_boxes, kept_labels = [], []
    for (x1, y1, x2, y2), label in zip(raw, labels):
        if not all(np.isfinite([x1, y1, x2, y2])):
            problems.add("boxes with non-numeric coordinates dropped", where)
            continue
        clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                   min(max(x2, 0.0), width), min(max(y2, 0.0), height))
        if clipped[2] - clipped[0] < MIN_BOX_SIDE or clipped[3] - clipped[1] < MIN_BOX_SIDE:
            problems.add("degenerate or outside-the-image boxes dropped", where)
            continue
        # Normalised formats (YOLO) round to a hair outside the image; that is not worth a warning.
        if max(abs(a - b) for a, b in zip(clipped, (x1, y1, x2, y2))) > CLIP_TOLERANCE:
            problems.add("boxes clipped to their image", where)
        kept_boxes.append(clipped)
        kept_labels.append(label)
    return (np.asarray(kept_boxes, dtype=np.float32).reshape(-1, 4), np.asarray(kept_labels, dtype=np.int64))


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, Image.DecompressionBombError, ValueError):
        return None


def _find_image(folders: list[Path], file_name: str, stem: str | None = None) -> Path | None:
    for folder in folders:
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    if stem is not None:   # VOC and YOLO files often name the image only by its stem
        for folder in folders:
            for extension in IMAGE_EXTENSIONS:
                for candidate in (folder / f"{stem}{extension}", folder / f"{stem}{extension.upper()}"):
                    if candidate.is_file():
                        return candidate
    return None


def _fixed_class_index(class_names: list[str] | None, found: list[str]) -> tuple[list[str], dict[str, int]]:
    names = list(class_names) if class_names is not None else sorted(set(found))
    return names, {name: index for index, name in enumerate(names)}


# --------------------------------------------------------------------------------------------
# COCO


def _load_coco(path: Path, class_names: list[str] | None) -> DetectionSet:
    try:
        document = json.loads(path.read_text() or "null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(document, dict) or not document.get("images"):
        raise UserError(f"{path} has no \"images\" list: is it a COCO detection annotation file?")
    categories = {c["id"]: c["name"] for c in document.get("categories", [])}
    if not categories:
        raise UserError(f"{path} has no \"categories\": a COCO file must name its classes")
    names, index_of = _fixed_class_index(class_names, list(categories.values()))
    problems = AnnotationProblems()
    per_image: dict[int, list[dict]] = {}
    for annotation in document.get("annotations", []):
        per_image.setdefault(annotation.get("image_id"), []).append(annotation)
    folders = [path.parent, path.parent / "images"]
    images = []
    for entry in document["images"]:
        image_path = _find_image(folders, entry["file_name"])
        if image_path is None:
            problems.add("annotated images missing on disk, skipped", entry["file_name"])
            continue
        width, height = entry.get("width"), entry.get("height")
        if not width or not height:
            size = _image_size(image_path)
            if size is None:
                problems.add("unreadable images skipped", str(image_path))
                continue
            width, height = size
        raw, labels = [], []
        for annotation in per_image.get(entry["id"], []):
            if annotation.get("iscrowd"):
                continue   # crowd regions are neither positives nor negatives in COCO's protocol
            name = categories.get(annotation.get("category_id"))
            if name is None or name not in index_of:
                problems.add("annotations of unknown categories dropped", f"category {annotation.get('category_id')}")
                continue
            x, y, w, h = (float(v) for v in annotation["bbox"])
            raw.append((x, y, x + w, y + h))
            labels.append(index_of[name])
        boxes, label_array = _clean_boxes(raw, labels, width, height, entry["file_name"], problems)
        images.append(DetectionImage(image_path, int(width), int(height), boxes, label_array))
    return DetectionSet(images, names, "coco", problems)


# --------------------------------------------------------------------------------------------
# PASCAL VOC


def _voc_xml_files(folder: Path) -> list[Path]:
    for candidate in (folder, folder / "Annotations", folder / "annotations"):
        if candidate.is_dir():
            files = sorted(candidate.glob("*.xml"))
            if files:
                return files
    return []


def _load_voc(folder: Path, class_names: list[str] | None) -> DetectionSet:
    xml_files = _voc_xml_files(folder)
    xml_folder = xml_files[0].parent
    # VOC keeps images in JPEGImages/ beside Annotations/; many exports use images/ or one folder.
    image_folders = [base / sub for base in dict.fromkeys((xml_folder.parent, folder))
                     for sub in ("JPEGImages", "images")] + [xml_folder]
    problems = AnnotationProblems()
    parsed = []
    for xml_file in xml_files:
        try:
            root = ElementTree.parse(xml_file).getroot()
        except ElementTree.ParseError as error:
            problems.add("unparseable XML files skipped", f"{xml_file.name}: {error}")
            continue
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            name = (obj.findtext("name") or "").strip()
            try:
                coords = tuple(float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                problems.add("objects without a readable bndbox dropped", xml_file.name)
                continue
            # VOC pixel indices are 1-based and inclusive: (1, 1, W, H) is the whole image.
            objects.append((name, (coords[0] - 1, coords[1] - 1, coords[2], coords[3])))
        parsed.append((xml_file, (root.findtext("filename") or "").strip(), root.find("size"), objects))
    names, index_of = _fixed_class_index(class_names, [name for *_, objects in parsed for name, _ in objects])
    images = []
    for xml_file, file_name, size_element, objects in parsed:
        image_path = _find_image(image_folders, file_name, xml_file.stem) if file_name else \
            _find_image(image_folders, xml_file.stem, xml_file.stem)
        if image_path is None:
            problems.add("annotated images missing on disk, skipped", file_name or xml_file.stem)
            continue
        size = _image_size(image_path)
        if size is None:
            problems.add("unreadable images skipped", str(image_path))
            continue
        raw, labels = [], []
        for name, box in objects:
            if name not in index_of:
                problems.add("annotations of unknown categories dropped", name or "(no name)")
                continue
            raw.append(box)
            labels.append(index_of[name])
        boxes, label_array = _clean_boxes(raw, labels, size[0], size[1], xml_file.name, problems)
        images.append(DetectionImage(image_path, size[0], size[1], boxes, label_array))
    return DetectionSet(images, names, "voc", problems)


# --------------------------------------------------------------------------------------------
# YOLO


def _yolo_class_names(folder: Path) -> list[str]:
    for name in YOLO_CLASS_FILES:
        if (folder / name).is_file():
            names = [line.strip() for line in (folder / name).read_text().splitlines() if line.strip()]
            if names:
                return names
    raise UserError(f"{folder} is a YOLO folder without class names: add {YOLO_CLASS_FILES[0]} with one name a line")


def _load_yolo(folder: Path, class_names: list[str] | None) -> DetectionSet:
    file_names = _yolo_class_names(folder)
    image_folder, label_folder = folder / "images", folder / "labels"
    image_paths = sorted(p for p in image_folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    problems = AnnotationProblems()
    for orphan in sorted(label_folder.rglob("*.txt")):
        if _find_image([image_folder / orphan.parent.relative_to(label_folder)], orphan.stem, orphan.stem) is None:
            problems.add("annotated images missing on disk, skipped", orphan.name)
    label_of = lambda image: label_folder / image.relative_to(image_folder).with_suffix(".txt")  # noqa: E731
    return _yolo_set(image_paths, label_of, file_names, class_names, problems)


def _yolo_set(image_paths: list[Path], label_file_of, file_names: list[str], class_names: list[str] | None,
              problems: AnnotationProblems) -> DetectionSet:
    """Images with their YOLO label files (class cx cy w h, normalised); ids index ``file_names``."""
    names = list(class_names) if class_names is not None else file_names   # the file's order is the ids'
    index_of = {name: index for index, name in enumerate(names)}
    images = []
    for image_path in image_paths:
        size = _image_size(image_path)
        if size is None:
            problems.add("unreadable images skipped", str(image_path))
            continue
        width, height = size
        label_file = label_file_of(image_path)
        raw, labels = [], []
        lines = label_file.read_text().splitlines() if label_file.is_file() else []
        for line in filter(str.strip, lines):
            fields = line.split()
            try:
                class_id = int(fields[0])
                cx, cy, w, h = (float(v) for v in fields[1:5])
            except (ValueError, IndexError):
                problems.add("unreadable label lines dropped", f"{label_file.name}: {line.strip()}")
                continue
            if not 0 <= class_id < len(file_names) or file_names[class_id] not in index_of:
                problems.add("annotations of unknown categories dropped", f"class {class_id} in {label_file.name}")
                continue
            raw.append(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height))
            labels.append(index_of[file_names[class_id]])
        boxes, label_array = _clean_boxes(raw, labels, width, height, label_file.name, problems)
        images.append(DetectionImage(image_path, width, height, boxes, label_array))
    return DetectionSet(images, names, "yolo", problems)


# --------------------------------------------------------------------------------------------
# Ultralytics / Roboflow: a data.yaml naming the splits and the classes


def data_yaml_of(source: Path) -> Path | None:
    """``source`` itself if it is a YAML file, else the data.yaml in the folder ``source`` (which
    describes the folder better than its layout: Ultralytics' has images/ and labels/ too)."""
    if source.is_file():
        return source if source.suffix.lower() in (".yaml", ".yml") else None
    return next((source / name for name in DATA_YAML_NAMES if (source / name).is_file()), None)


def _read_data_yaml(path: Path) -> dict:
    import yaml

    try:
        document = yaml.safe_load(path.read_text())   # safe_load: a YAML file builds no Python objects
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path} is not a dataset description: it must be a mapping with train, val and names")
    return document


def has_split(source: Path, split: str) -> bool:
    """Whether ``source`` is a data.yaml (or its folder) that names ``split``."""
    data_yaml = data_yaml_of(Path(source)) if Path(source).exists() else None
    return data_yaml is not None and bool(_read_data_yaml(data_yaml).get(split))


def _yaml_class_names(document: dict, path: Path) -> list[str]:
    names = document.get("names")
    if isinstance(names, dict):
        try:
            ordered = sorted((int(key), value) for key, value in names.items())
        except (TypeError, ValueError):
            ordered = []
        if not ordered or [key for key, _ in ordered] != list(range(len(ordered))):
            raise UserError(f"{path}: 'names' must map the class ids 0, 1, 2, ... to names")
        names = [value for _, value in ordered]
    if not isinstance(names, list) or not names or not all(isinstance(name, (str, int)) for name in names):
        raise UserError(f"{path}: 'names' must list the class names (a list, or a mapping from id to name)")
    return [str(name) for name in names]


def _as_written(entry: str) -> PurePath:
    """A path as the YAML's author wrote it: with a drive letter or backslashes, a Windows one
    (``F:\\data\\coco128\\images\\train`` is absolute there, and re-rooted like any other)."""
    if "\\" in entry or re.match(r"^[A-Za-z]:[\\/]", entry):
        return PureWindowsPath(entry)
    return PurePosixPath(entry)


def _split_folders(document: dict, split: str, path: Path) -> list[Path]:
    """The image folders (or list files) of ``split``, found on this machine.

    As Ultralytics reads them: relative to ``path:`` (itself relative to the YAML's folder), or
    to the YAML's folder; a leading ``../`` that leads nowhere is dropped (Roboflow's exports
    say ``../train/images`` from inside the dataset folder). An absolute path from another
    machine is re-rooted: the longest tail of it that exists under the YAML's folder.
    """
    entries = document.get(split)
    if not entries:
        raise UserError(f"{path} names no {split!r} split")
    entries = entries if isinstance(entries, list) else [entries]
    here = path.parent
    root_value = document.get("path")
    root = here
    if isinstance(root_value, str) and root_value:
        root = Path(root_value) if Path(root_value).is_absolute() else here / root_value
        if not root.is_dir():
            root = here   # a dataset root on another machine: this folder stands in for it
    found = []
    for entry in entries:
        if not isinstance(entry, str):
            raise UserError(f"{path}: {split!r} must be a path or a list of paths")
        written = _as_written(entry)
        if written.is_absolute():
            parts = written.parts
            candidates = [Path(entry)] + [here.joinpath(*parts[i:]) for i in range(1, len(parts))]
        elif isinstance(written, PureWindowsPath):   # images\train, from a YAML written on Windows
            candidates = [root.joinpath(*written.parts), here.joinpath(*written.parts)]
        else:
            candidates = [root / entry, here / entry]
            if entry.startswith("../"):
                candidates += [root / entry[3:], here / entry[3:]]
        match = next((candidate for candidate in candidates if candidate.exists()), None)
        if match is None:
            raise UserError(f"{path}: the {split} images {entry!r} are not on this machine (looked in {root})")
        found.append(match.resolve())
    return found


def _split_images(sources: list[Path]) -> list[Path]:
    images: list[Path] = []
    for source in sources:
        if source.is_dir():
            images += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:   # a .txt list of image paths, relative to the list's folder
            for line in filter(str.strip, source.read_text().splitlines()):
                image = Path(line.strip())
                images.append(image if image.is_absolute() else (source.parent / image).resolve())
    return images


def ultralytics_label_file(image: Path) -> Path:
    """Ultralytics' rule: the label of ``.../images/x.jpg`` is ``.../labels/x.txt`` (last ``images``)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _load_ultralytics(path: Path, split: str, class_names: list[str] | None) -> DetectionSet:
    document = _read_data_yaml(path)
    file_names = _yaml_class_names(document, path)
    images = _split_images(_split_folders(document, split, path))
    problems = AnnotationProblems()
    existing = [image for image in images if image.is_file()]
    for missing in sorted(set(images) - set(existing)):
        problems.add("listed images missing on disk, skipped", missing.name)
    dataset = _yolo_set(existing, ultralytics_label_file, file_names, class_names, problems)
    dataset.source_format = f"ultralytics {split}"
    return dataset
