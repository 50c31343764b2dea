"""An approximate index's search knob, set for a recall target on the user's own vectors.

    >>> tuned = tune_for_recall(index, vectors, ids, target=0.95)
    >>> tuned.parameters, tuned.recall, tuned.queries_per_second   # {"efSearch": 64}, 0.962, 2100.0

HNSW's ``efSearch`` and IVF's ``nprobe`` trade speed for recall, and how much recall a value
buys depends on the data and its size. So, as autofaiss does, the knob is measured rather than
assumed: held-back queries (vectors of the set itself, each leaving itself out of both answers)
are searched exactly and approximately, and the fastest setting that meets the target is kept,
in the index's manifest, for every search after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

from simsiam_embed.index.exact import RerankedIndex, exact_neighbours
from simsiam_embed.settings import DEFAULT_RECALL

RECALL_K = 10
#: Queries held back to measure recall: enough that 0.95 is read to about +-0.01.
TUNING_QUERIES = 1_000
#: The values tried, smallest (fastest) first.
KNOB_VALUES = {
    "efSearch": (16, 32, 64, 128, 256, 512, 1024, 2048),
    "nprobe": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
}
#: Candidates a re-ranking index (IVF-PQ re-ranked exactly, or FAISS's Refine) re-ranks, per result:
#: deeper where codes rank coarsely (exact re-ranking reads 64 x 10 rows a query, ~1 MB at 512-d).
REFINE_K_FACTORS = (4, 8, 16, 32, 64)
#: A doubled knob that raises recall by less than this has reached what the index can find
#: (its codes, not its search, limit it): the next re-ranking depth is tried instead.
SATURATION = 0.002


@dataclass(frozen=True)
class Tuning:
    parameters: dict[str, int]   # knob -> value; what a loaded index is set to
    recall: float                # recall@10 measured at those values
    queries_per_second: float    # on this machine, one query batch of the held-back queries
    target: float
    queries: int

    @property
    def met(self) -> bool:
        return self.recall >= self.target

    def describe(self) -> str:
        if not self.parameters:
            return f"exact search: recall@{RECALL_K} 1"
        knobs = ", ".join(f"{name} {value}" for name, value in self.parameters.items())
        verdict = "meets" if self.met else "misses"
        return (f"recall@{RECALL_K} {self.recall:.3f} at {knobs} ({verdict} the target {self.target:g}; "
                f"{self.queries} held-back queries, {self.queries_per_second:,.0f} queries/s)")


def _parts(index: faiss.Index | RerankedIndex) -> tuple[faiss.Index | RerankedIndex | None, faiss.Index]:
    """(the re-ranking stage or None, the index whose knob sets recall) under an IDMap."""
    if isinstance(index, RerankedIndex):
        return index, _parts(index.base)[1]
    inner = faiss.downcast_index(index.index) if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    if isinstance(inner, faiss.IndexRefine):
        return inner, faiss.downcast_index(inner.base_index)
    return None, inner


def knob_of(index: faiss.Index) -> str | None:
    """The search knob of ``index``: None for exact search (nothing to tune)."""
    _, base = _parts(index)
    if isinstance(base, faiss.IndexHNSW):
        return "efSearch"
    if isinstance(base, faiss.IndexIVF):
        return "nprobe"
    return None


def set_search_parameters(index: faiss.Index, parameters: dict[str, int]) -> None:
    """Apply the knob values of :class:`Tuning` (names as FAISS calls them)."""
    refine, base = _parts(index)
    for name, value in parameters.items():
        if name == "efSearch" and isinstance(base, faiss.IndexHNSW):
            base.hnsw.efSearch = value
        elif name == "nprobe" and isinstance(base, faiss.IndexIVF):
            base.nprobe = min(value, base.nlist)
        elif name == "k_factor" and refine is not None:
            refine.k_factor = value


def valid_parameters(raw: object) -> bool:
    """Whether a manifest's ``search_parameters`` are knob values this module could have set."""
    return isinstance(raw, dict) and all(
        isinstance(name, str) and name in (*KNOB_VALUES, "k_factor") and isinstance(value, int)
        and not isinstance(value, bool) and 1 <= value <= 1 << 16 for name, value in raw.items())


def held_back_queries(count: int, queries: int = TUNING_QUERIES) -> np.ndarray:
    """Positions of the query vectors, the same for the same count (a re-tuned index is comparable)."""
    return np.sort(np.random.default_rng(count).choice(count, size=min(count, queries), replace=False))


def measure_recall(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, positions: np.ndarray,
                   exact: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """(recall@10, queries/s, the exact neighbours' ids) of ``index`` for the vectors at
    ``positions``, each query's own id left out of both answers: a query in the index would
    otherwise count itself, an answer found for free."""
    queries = np.ascontiguousarray(vectors[positions], dtype=np.float32)
    own = ids[positions][:, None]
    k = min(RECALL_K + 1, len(ids))
    if exact is None:
        # Read block by block (``vectors`` may be a memory-mapped file larger than memory).
        nearest = exact_neighbours(queries, vectors, k)[1]
        exact = _without(np.where(nearest >= 0, ids[nearest], -1), own, k - 1)
    started = time.perf_counter()
    _, found = index.search(queries, k)
    seconds = max(time.perf_counter() - started, 1e-9)
    found = _without(found, own, k - 1)
    hits = sum(len(set(row[row >= 0]) & set(truth[truth >= 0])) for row, truth in zip(found, exact))
    wanted = int((exact >= 0).sum())
    return (hits / wanted if wanted else 1.0), len(queries) / seconds, exact


def _without(neighbours: np.ndarray, own: np.ndarray, keep: int) -> np.ndarray:
    """Each row's first ``keep`` ids other than its own (-1 pads)."""
    rows = np.full((len(neighbours), keep), -1, dtype=np.int64)
    for i, row in enumerate(neighbours):
        others = row[row != own[i, 0]][:keep]
        rows[i, :len(others)] = others
    return rows


def tune_for_recall(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, target: float = DEFAULT_RECALL) -> Tuning:
    """The fastest setting that meets ``target``, set on ``index``; when none does, the one with
    the best recall (then :attr:`Tuning.met` is False and the caller says what to do).

    For each re-ranking depth (REFINE_K_FACTORS, when the index re-ranks), the smallest knob
    value that meets the target is found, climbing until the recall stops rising; of those, the one that answered
    the held-back queries fastest wins: a deeper re-rank at nprobe 1 can beat a shallow one at
    nprobe 64.
    """
    positions = held_back_queries(len(ids))
    knob = knob_of(index)
    if knob is None:   # exact search: recall 1 by construction, nothing to set or measure
        return Tuning({}, 1.0, 0.0, target, 0)
    refine, base = _parts(index)
    exact = None
    best: Tuning | None = None
    meeting: list[Tuning] = []
    for k_factor in REFINE_K_FACTORS if refine is not None else (None,):
        previous_recall = -1.0
        for value in KNOB_VALUES[knob]:
            parameters = {knob: value, **({"k_factor": k_factor} if k_factor else {})}
            set_search_parameters(index, parameters)
            recall, speed, exact = measure_recall(index, vectors, ids, positions, exact)
            tuning = Tuning(parameters, recall, speed, target, len(positions))
            if best is None or recall > best.recall:
                best = tuning
            if tuning.met:
                meeting.append(tuning)
                break
            saturated = recall < previous_recall + SATURATION
            if saturated or (knob == "nprobe" and value >= base.nlist):   # more of this knob buys nothing
                break
            previous_recall = recall
    chosen = max(meeting, key=lambda tuning: tuning.queries_per_second) if meeting else best
    set_search_parameters(index, chosen.parameters)
    return chosen
