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

from simsiam_embed.image_files import discover_images, label_of
from simsiam_embed.distributed import DistributedContext, from_main, gather_to_main
from simsiam_embed.inference.embed import EmbedResult, Encoder, embed_paths
from simsiam_embed.errors import UserError
from simsiam_embed.settings import EMBED_WORKERS, KNN_SETTINGS

#: (k, temperature) pairs reported by default: the InstDisc setting and solo-learn's.


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
    if k < 1:
        raise UserError(f"kNN needs at least {1 + int(exclude_first)} readable bank images, and there are {len(bank)}")
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
    batch_size: int = 128, workers: int = EMBED_WORKERS, show_progress: bool = True,
) -> KnnEvaluation:
    """Embed a labelled bank and test set with ``encoder`` and score weighted kNN at each setting."""
    bank, test = embed_labelled_pair(encoder, train_dir, test_dir, batch_size, workers, show_progress)
    reports = [knn_classify(bank.vectors, bank.labels, test.vectors, test.labels, test.class_names, k, temperature)
               for k, temperature in settings]
    return KnnEvaluation(reports, len(bank.labels), len(test.labels), bank.skipped + test.skipped)


@dataclass
class EmbeddedLabelledImages:
    vectors: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    skipped: int


def embed_labelled_pair(
    encoder: Encoder, train_dir: Path, test_dir: Path, batch_size: int, workers: int, show_progress: bool,
) -> tuple[EmbeddedLabelledImages, EmbeddedLabelledImages]:
    """Embed a labelled training and test folder; the test labels use the training class indices."""
    train = labelled_folder(train_dir)
    if len(train.class_names) < 2:
        raise UserError(f"{train_dir} has a single class ({train.class_names[0]}): "
                        "a classifier needs two or more")
    test = labelled_folder(test_dir, train.class_names)
    embedded = []
    for images, folder in ((train, train_dir), (test, test_dir)):
        result = embed_readable(images.paths, encoder, folder, batch_size, workers, show_progress)
        embedded.append(EmbeddedLabelledImages(result.vectors, images.labels[result.indices],
                                               test.class_names, len(result.failures)))
    return embedded[0], embedded[1]


def embed_readable(paths: list[Path], encoder: Encoder, folder: Path, batch_size: int, workers: int,
                   show_progress: bool) -> EmbedResult:
    """Embed ``paths``; a folder none of whose images can be read is an error, not a score of nan."""
    result = embed_paths(paths, encoder, batch_size, workers, show_progress)
    if len(result.indices) == 0:
        first = f": the first, {paths[result.failures[0][0]]}: {result.failures[0][1]}" if result.failures else ""
        raise UserError(f"none of the {len(paths)} images in {folder} could be read{first}")
    return result


class _LiveBackbone:
    """An Encoder over a backbone that is still training: eval mode for the call, then back."""

    def __init__(self, backbone, preprocessing, device: str):
        self.backbone, self.preprocessing, self.device = backbone, preprocessing, device
        self.dim = backbone.feature_dim
        self.on_gpu = str(device).startswith("cuda")
        self.description = "the training backbone"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                return self.backbone(torch.from_numpy(images).to(self.device)).float().cpu().numpy()
        finally:
            self.backbone.train(was_training)


class KnnMonitor:
    """kNN accuracy on a labelled folder during pretraining (leave-one-out: each image is
    classified by all the others), with the score of the network it started from as the bar to
    clear: random init, or the weights of a warm start (``warm_start=True``)."""

    def __init__(self, val_dir: Path, preprocessing, device: str, k: int = 20, temperature: float = 0.07,
                 workers: int = 0, context: DistributedContext = DistributedContext(), warm_start: bool = False):
        self.images = labelled_folder(val_dir)
        if len(self.images.class_names) < 2:
            raise UserError(f"--val-dir {val_dir} has a single class: kNN accuracy needs two or more")
        self.preprocessing, self.device, self.val_dir, self.context = preprocessing, device, val_dir, context
        self.k, self.temperature, self.workers = k, temperature, workers
        self.warm_start = warm_start
        self.baseline = "the warm start" if warm_start else "random init"
        self.baseline_top1: float | None = None   # the network's score before its first step

    def top1(self, backbone) -> float:
        """Every rank must call it: under torchrun each embeds its shard of the images, and rank 0
        scores them all, so no rank waits on a long single-process evaluation (NCCL's time-out)."""
        from simsiam_embed.inference.embed import shard_for_rank

        mine = shard_for_rank(len(self.images.paths), self.context.rank, self.context.world_size)
        result = embed_paths([self.images.paths[i] for i in mine], _LiveBackbone(backbone, self.preprocessing, self.device),
                             batch_size=256, workers=self.workers, show_progress=False)
        shards = gather_to_main((result.vectors, np.asarray(list(mine), dtype=np.int64)[result.indices]), self.context)
        top1 = None
        if self.context.is_main:
            vectors = np.concatenate([vectors for vectors, _ in shards])
            rows = np.concatenate([rows for _, rows in shards])
            if len(rows) < 2:
                top1 = -1.0   # said on every rank below
            else:
                labels = self.images.labels[rows]
                top1 = knn_classify(vectors, labels, vectors, labels, self.images.class_names,
                                    self.k, self.temperature, exclude_first=True).top1
        top1 = from_main(top1, self.context)
        if top1 < 0:
            raise UserError(f"fewer than 2 of the {len(self.images.paths)} images in {self.val_dir} could be read: "
                            "the kNN monitor needs a readable --val-dir")
        return top1

    def verdict(self, top1: float) -> str:
        """One sentence: has training beaten the network it started from yet?"""
        if self.baseline_top1 is None:
            return f"kNN top-1 {top1:.3f}"
        gain = top1 - self.baseline_top1
        start = f"{self.baseline} ({self.baseline_top1:.3f})"
        if gain > 0:
            return (f"kNN top-1 {top1:.3f} on the labelled --val-dir, {gain:+.3f} over " +
                    (f"{start}: SimSiam improved on it" if self.warm_start else
                     f"the same network at {start}: training has paid off"))
        return (f"kNN top-1 {top1:.3f} on the labelled --val-dir, {gain:+.3f} against {start}: " +
                ("SimSiam has NOT improved on the weights it started from; train longer, or keep those" if self.warm_start
                 else "this encoder is NOT yet better than an untrained one; train longer"))


@dataclass
class LinearProbeReport:
    top1: float
    top5: float
    train_top1: float
    train_count: int
    test_count: int
    epochs: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def train_linear_probe(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
    num_classes: int, epochs: int = 100, weight_decay: float = 1e-4, seed: int = 0,
) -> LinearProbeReport:
    """A linear classifier on frozen features: the paper's protocol, scaled to one machine.

    The paper trains a linear layer on frozen ResNet-50 features with LARS for 90 epochs at batch
    4096 (Appendix A). On one machine the features of a folder fit in memory, so the layer is
    fitted full-batch with L-BFGS (no learning rate to tune) after standardising each feature
    with the training set's statistics, which plays the role of the paper's BN before the layer.
    """
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(np.asarray(train_features, dtype=np.float32))
    x_test = torch.from_numpy(np.asarray(test_features, dtype=np.float32))
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    layer = torch.nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=20, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x_train), y_train) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    for _ in range(epochs):
        optimizer.step(closure)
    with torch.no_grad():
        train_top1 = float((layer(x_train).argmax(1) == y_train).float().mean())
        ranked = layer(x_test).argsort(dim=1, descending=True).numpy()
    test_labels = np.asarray(test_labels)
    return LinearProbeReport(
        top1=float((ranked[:, 0] == test_labels).mean()),
        top5=float((ranked[:, :5] == test_labels[:, None]).any(axis=1).mean()),
        train_top1=train_top1, train_count=len(x_train), test_count=len(x_test), epochs=epochs,
    )


def evaluate_linear_probe(
    encoder: Encoder, train_dir: Path, test_dir: Path, epochs: int = 100,
    batch_size: int = 128, workers: int = EMBED_WORKERS, show_progress: bool = True,
) -> LinearProbeReport:
    train, test = embed_labelled_pair(encoder, train_dir, test_dir, batch_size, workers, show_progress)
    return train_linear_probe(train.vectors, train.labels, test.vectors, test.labels, len(test.class_names), epochs)
