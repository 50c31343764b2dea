"""Label-based evaluation of an encoder: weighted kNN (the SSL literature's monitor) and collapse.

    >>> report = knn_classify(bank_vectors, bank_labels, test_vectors, test_labels, k=200, temperature=0.1)
    >>> report.top1

Weighted kNN as in Wu et al. 2018 (InstDisc) and most SSL code since: the k most cosine-similar
bank images vote for their class with weight exp(similarity / T). FAISS finds the neighbours,
so the bank can hold millions of images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .data import discover_images, label_of
from .embed import Encoder, embed_paths
from .errors import UserError

#: (k, temperature) pairs reported by default: the InstDisc setting and solo-learn's.
KNN_SETTINGS = ((200, 0.1), (20, 0.07))


@dataclass
class KnnReport:
    k: int
    temperature: float
    top1: float
    top5: float
    per_class: dict[str, float]
    test_count: int
    classes_missing_from_bank: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "top1": self.top1, "top5": self.top5,
                "per_class": self.per_class, "test_count": self.test_count,
                "classes_missing_from_bank": self.classes_missing_from_bank}


def knn_classify(
    bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
    class_names: list[str], k: int = 200, temperature: float = 0.1, exclude_first: bool = False,
) -> KnnReport:
    """Weighted kNN accuracy; labels are integer indices into ``class_names``.

    ``exclude_first`` drops each query's nearest neighbour (when the queries are the bank itself).
    """
    k = min(k, len(bank) - int(exclude_first))
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    similarities, neighbours = index.search(np.ascontiguousarray(queries, dtype=np.float32), k + int(exclude_first))
    if exclude_first:
        similarities, neighbours = similarities[:, 1:], neighbours[:, 1:]
    votes = np.zeros((len(queries), len(class_names)), dtype=np.float64)
    weights = np.exp(similarities.astype(np.float64) / temperature)
    np.add.at(votes, (np.arange(len(queries))[:, None], bank_labels[neighbours]), weights)
    ranked = np.argsort(-votes, axis=1, kind="stable")
    top1_hits = ranked[:, 0] == query_labels
    top5_hits = (ranked[:, :5] == query_labels[:, None]).any(axis=1)
    per_class = {name: float(top1_hits[query_labels == c].mean())
                 for c, name in enumerate(class_names) if (query_labels == c).any()}
    present = set(bank_labels.tolist())
    missing = sorted({class_names[c] for c in query_labels.tolist() if c not in present})
    return KnnReport(k, temperature, float(top1_hits.mean()), float(top5_hits.mean()), per_class,
                     len(queries), missing)


@dataclass
class LabelledImages:
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]


def labelled_folder(folder: Path, class_names: list[str] | None = None) -> LabelledImages:
    """Images in ``folder/<class>/...``; their labels index ``class_names`` (sorted if not given)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give a folder with one subfolder per class")
    paths = discover_images(folder)
    if not paths:
        raise UserError(f"no images in {folder}")
    names = [label_of(path) if path.parent != folder else "" for path in paths]
    if any(name == "" for name in names):
        raise UserError(f"{folder} has images outside class subfolders: labels come from folders, "
                        f"as {folder}/<class>/image.jpg")
    if class_names is None:
        class_names = sorted(set(names))
    else:
        class_names = class_names + sorted(set(names) - set(class_names))
    lookup = {name: index for index, name in enumerate(class_names)}
    return LabelledImages(paths, np.array([lookup[name] for name in names], dtype=np.int64), class_names)


@dataclass
class KnnEvaluation:
    reports: list[KnnReport]
    bank_count: int
    test_count: int
    skipped: int


def evaluate_knn(
    encoder: Encoder, train_dir: Path, test_dir: Path,
    settings: tuple[tuple[int, float], ...] = KNN_SETTINGS,
    batch_size: int = 128, workers: int = 2, show_progress: bool = True,
) -> KnnEvaluation:
    """Embed a labelled bank and test set with ``encoder`` and score weighted kNN at each setting."""
    bank = labelled_folder(train_dir)
    if len(bank.class_names) < 2:
        raise UserError(f"{train_dir} has a single class ({bank.class_names[0]}): kNN accuracy needs two or more")
    test = labelled_folder(test_dir, bank.class_names)
    bank_result = embed_paths(bank.paths, encoder, batch_size, workers, show_progress)
    test_result = embed_paths(test.paths, encoder, batch_size, workers, show_progress)
    reports = [
        knn_classify(bank_result.vectors, bank.labels[bank_result.indices], test_result.vectors,
                     test.labels[test_result.indices], test.class_names, k, temperature)
        for k, temperature in settings
    ]
    skipped = len(bank_result.failures) + len(test_result.failures)
    return KnnEvaluation(reports, len(bank_result.indices), len(test_result.indices), skipped)
