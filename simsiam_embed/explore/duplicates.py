"""Near-duplicate groups: byte-identical files, and candidate pairs (the encoder's mutual nearest
neighbours, each photo's nearest colour layout) confirmed as copies by local features or pixels;
the plans that say which file of a group to keep, with the user's decisions.

    >>> groups = find_duplicates(load_index(Path("index"), for_search=False)).groups
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from simsiam_embed.image_files import UnreadableImage, open_image
from simsiam_embed.errors import Report, UserError
from simsiam_embed.explore.decisions import Decisions
from simsiam_embed.explore.results import AnalysisResult
from simsiam_embed.explore.neighbours import CentredVectors, NeighbourGraph, PlainVectors, entries_by_position, neighbour_graph
from simsiam_embed.index.catalog import CatalogEntry
from simsiam_embed.index.store import LoadedIndex, centred_cosines
from simsiam_embed.index.thumbnails import indexed_bytes
from simsiam_embed.settings import CANDIDATE_THRESHOLD, DUPLICATE_NEIGHBOURS, GEOMETRY_THRESHOLD, PLANS, SMALL_PICTURE_SIDE, SMALL_PICTURE_THRESHOLD, UNCHECKED_THRESHOLD


#: When two mutual nearest neighbours are copies, by default. Calibrated, not guessed: JPEG
#: re-encodes, resizes, crops and brightness changes planted among 595 distinct photos and among
#: the 1,000 28-px sample images (bench/bench_dedup_threshold.py, tables in bench/RESULTS.md).
#: - Centred cosine >= 0.8 and pictures that agree (the pixel check): on the photos the highest
#:   threshold within 0.01 of the best F1 (precision 0.92, recall 0.89).
#: - Pictures of <= 64 px a side also need >= 0.93: at that size distinct items (two trousers of
#:   Fashion-MNIST) agree pixel for pixel too, and 0.93 is the lowest threshold with precision
#:   >= 0.8 on the sample. Precision first: a plan built on a false group removes a real file.
#: - Without the pixel check: >= 0.95, the lowest with precision >= 0.8 on both sets.
#: An explicit threshold applies to every pair as given.
#: Neighbours searched per image for duplicates: its nearest other image is among them unless
#: more than this many byte-identical copies of it come first (those group by their bytes).


class _DisjointSets:
    """Union-find with path halving and union by size."""

    def __init__(self, count: int):
        self.parent = np.arange(count)
        self.size = np.ones(count, dtype=np.int64)

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return int(item)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


@dataclass
class DuplicateMember:
    id: int
    path: str
    size: int
    mtime_ns: int
    digest: str
    score: float          # cosine to the group's first member
    action: str = ""      # "keep" or "remove" once a plan is applied
    pixels: int = 0       # width x height as stored (0: unreadable); keep-original keeps the most
    chosen: bool = False  # the user chose to keep it (explore/decisions.py)


@dataclass
class DuplicateGroup:
    number: int
    exact: bool           # every member has the same bytes
    min_score: float      # the weakest link that joined the group
    members: list[DuplicateMember]
    # What confirmed its links: "bytes", "pixels", "pixels (small picture)", "geometry: N keypoints on one transform, ...[, mirrored]".
    evidence: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DuplicateRule:
    """When a candidate pair (mutual nearest neighbours) counts as a pair of copies."""

    threshold: float                        # centred cosine, every pair
    small_picture_threshold: float | None   # pairs with a picture of <= SMALL_PICTURE_SIDE px
    pixel_check: bool
    geometry: bool = False                  # photos confirmed by local features (explore/verify.py)
    layouts: bool = False                   # and each photo's nearest colour layout a candidate too (explore/layout.py)

    @classmethod
    def default_or(cls, threshold: float | None, pixel_check: bool = True,
                   geometry: bool | None = None) -> "DuplicateRule":
        """The calibrated rule, or the user's ``threshold`` for every pair. ``geometry`` None: on
        when OpenCV is installed (with the pixel check; without it, the check is pixels alone)."""
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise UserError(f"--threshold {threshold} is not a cosine similarity: choose a value in [-1, 1]")
        if not pixel_check:
            return cls(threshold if threshold is not None else UNCHECKED_THRESHOLD, None, False)
        if geometry is None:
            from simsiam_embed.explore.verify import opencv_available

            geometry = opencv_available()
        if geometry:   # an explicit threshold holds for every pair, small pictures too
            if threshold is not None:
                return cls(threshold, None, True, True)
            return cls(GEOMETRY_THRESHOLD, SMALL_PICTURE_THRESHOLD, True, True)
        if threshold is not None:
            return cls(threshold, None, True)
        return cls(CANDIDATE_THRESHOLD, SMALL_PICTURE_THRESHOLD, True)

    def describe(self) -> str:
        small = (f" ({self.small_picture_threshold} for pictures of {SMALL_PICTURE_SIDE} px or less, which only "
                 "pixels can check)" if self.small_picture_threshold is not None else "")
        if self.geometry:
            from simsiam_embed.explore.verify import MIN_DETAIL_AGREEMENT, MIN_INLIERS, MIN_OVERLAP

            check = (f", confirmed by local features: >= {MIN_INLIERS} keypoints agreeing on one shift, scale and "
                     f"rotation (mirrored or not) that lays each picture over >= {MIN_OVERLAP:.0%} of the other, "
                     f"where their fine detail correlates >= {MIN_DETAIL_AGREEMENT} on average")
        else:
            check = ", pictures agreeing pixel for pixel" if self.pixel_check else ", no pixel check"
        layouts = ", or each photo's nearest colour layout (mirrored or not)" if self.layouts else ""
        return f"mutual nearest neighbours at centred cosine >= {self.threshold}{small}{layouts}{check}"


@dataclass
class DuplicateResult(AnalysisResult):
    listed = "groups"
    rule: DuplicateRule
    method: str
    images: int
    groups: list[DuplicateGroup]
    plan: str | None = None
    failed_pixel_check: int = 0   # candidate pairs whose pictures disagree (or small ones below their threshold)
    unreadable_pairs: int = 0     # candidate pairs with a file gone or changed since indexing
    duplicate_files: int = 0      # files beyond the first of each group: what a plan would remove
    set_aside: list[DuplicateGroup] = field(default_factory=list)   # the user said: not duplicates
    candidates: dict[str, int] = field(default_factory=dict)   # candidate pairs by source (CANDIDATE_SOURCES)
    confirmed: dict[str, int] = field(default_factory=dict)    # of those, confirmed as copies

    def __post_init__(self) -> None:
        self.duplicate_files = sum(len(group.members) - 1 for group in self.groups)

    def described(self) -> dict:
        return {"rule_text": self.rule.describe(), "plan_text": PLAN_RULES.get(self.plan or "", "")}


def find_duplicates(loaded: LoadedIndex, threshold: float | None = None,
                    neighbours: int = DUPLICATE_NEIGHBOURS, plan: str | None = None, pixel_check: bool = True,
                    report: Report | None = None, geometry: bool | None = None,
                    layouts: bool = True) -> DuplicateResult:
    """Groups of images that are each other's nearest neighbours, similar enough by the
    :class:`DuplicateRule` (the calibrated one unless ``threshold`` is given) and, unless
    ``pixel_check`` is off, the same picture pixel for pixel; joined transitively. Files with
    identical bytes group whatever their vectors. With ``geometry`` (default: when OpenCV is
    installed) photos are confirmed by local features instead of pixels (:class:`GeometricAgreement`),
    and, with ``layouts``, pairs whose colour layouts are nearest neighbours are candidates too
    (:mod:`.layout`): a copy is found even where the encoder is barely trained."""
    rule = DuplicateRule.default_or(threshold, pixel_check, geometry)
    # Layouts only propose pairs: only the geometric check is strict enough to judge them (two
    # photos of similar layout often agree pixel for pixel at 32 x 32).
    rule = dataclasses.replace(rule, layouts=rule.geometry and layouts)
    if plan is not None and plan not in PLANS:
        raise UserError(f"unknown plan {plan!r}: choose one of {', '.join(PLANS)}")
    entries = entries_by_position(loaded)
    vectors = CentredVectors(loaded.vectors, loaded.mean_vector())
    graph = neighbour_graph(vectors, neighbours, report)
    positions_of_digest: dict[str, list[int]] = {}
    for position, entry in enumerate(entries):
        positions_of_digest.setdefault(entry.digest, []).append(position)
    representative = np.arange(len(entries))
    sets = _DisjointSets(len(entries))
    touched: set[int] = set()
    for same_bytes in positions_of_digest.values():
        for position in same_bytes[1:]:
            representative[position] = same_bytes[0]
            sets.union(same_bytes[0], position)
            touched.update((same_bytes[0], position))
    weakest: dict[int, float] = {}   # by the position an edge starts from
    evidence: dict[int, str] = {}    # by the position an edge starts from
    candidates = mutual_near_pairs(graph, rule.threshold, representative)
    sources = {(a, b): CANDIDATE_SOURCES[0] for a, b, _ in candidates}
    if rule.layouts:
        candidates = _with_layout_candidates(loaded.folder, entries, vectors, candidates, sources, representative,
                                             neighbours, report)
    agreement = PixelAgreement(entries, rule.small_picture_threshold) if rule.pixel_check else None
    if rule.geometry:
        # Pictures checked by pixels keep the pixel check's own calibrated floor (the geometric
        # rule's candidates start lower, since keypoints are the stricter test).
        pixel_floor = CANDIDATE_THRESHOLD if threshold is None else rule.threshold
        agreement = GeometricAgreement(entries, candidates, agreement, pixel_floor)
    confirmed = []
    confirmed_by_source = dict.fromkeys(CANDIDATE_SOURCES, 0)
    for row, other, score in candidates:
        found = agreement.evidence(row, other, score) if agreement is not None else "centred cosine only"
        if found is not None:
            confirmed.append((row, other, score))
            confirmed_by_source[sources[row, other]] += 1
            evidence[row] = found
    for row, other, score in confirmed:
        sets.union(row, other)
        touched.update((row, other))
        weakest[row] = min(weakest.get(row, 1.0), score)

    components: dict[int, list[int]] = {}
    for position in sorted(touched):
        components.setdefault(sets.find(position), []).append(position)
    groups = []
    for members in components.values():
        floor = min((weakest[p] for p in members if p in weakest), default=1.0)
        group = _group(vectors, entries, members, floor)
        found = {evidence[p] for p in members if p in evidence}
        if len({entries[p].digest for p in members}) < len(members):
            found.add("bytes")
        group.evidence = sorted(found)
        groups.append(group)
    groups.sort(key=lambda group: (-len(group.members), group.members[0].path))
    for number, group in enumerate(groups, start=1):
        group.number = number
    if agreement is not None and report is not None:
        checks = "; ".join(f"{name} check: {confirmed_count} of {judged} candidate pairs confirmed"
                           for name, (judged, confirmed_count) in agreement.tally.items() if judged)
        report((checks or f"0 of {len(candidates)} candidate pairs checked")
               + (f"; {agreement.small_pairs_below} pairs of small pictures below {rule.small_picture_threshold}"
                  if agreement.small_pairs_below else "")
               + (f"; {agreement.unreadable_pairs} not checked (file gone or changed since indexing)"
                  if agreement.unreadable_pairs else ""))
    unreadable = agreement.unreadable_pairs if agreement is not None else 0
    candidates_by_source = dict.fromkeys(CANDIDATE_SOURCES, 0)
    for source in sources.values():
        candidates_by_source[source] += 1
    result = DuplicateResult(rule, graph.method, len(entries), groups, None,
                             len(candidates) - len(confirmed) - unreadable, unreadable,
                             candidates=candidates_by_source, confirmed=confirmed_by_source)
    return with_plan(loaded, result, plan) if plan is not None else result


#: Where a candidate pair came from: the encoder's mutual nearest neighbours, the colour
#: layouts' (:mod:`.layout`), or both.
CANDIDATE_SOURCES = ("encoder", "colour layout", "both")


def _with_layout_candidates(index_folder: Path, entries: list[CatalogEntry], vectors: CentredVectors,
                            candidates: list[tuple[int, int, float]], sources: dict[tuple[int, int], str],
                            representative: np.ndarray, neighbours: int,
                            report: Report | None) -> list[tuple[int, int, float]]:
    """``candidates`` and each image with its nearest colour layout (mirrored or not; the
    geometric check decides, so these need not be mutual), each scored by its centred cosine like the encoder's; ``sources`` says whose each is.
    A copy reaches the geometric check even when the encoder has not learnt to pair it."""
    from simsiam_embed.explore.layout import LAYOUT_FLOOR, MIRRORED, colour_layouts

    started = time.monotonic()
    layouts = PlainVectors(colour_layouts(entries, index_folder))
    graph = neighbour_graph(layouts, neighbours, mirrored=MIRRORED)
    extra = []
    for a, b, _ in nearest_pairs(graph, LAYOUT_FLOOR, representative):
        if (a, b) in sources:
            sources[a, b] = "both"
            continue
        sources[a, b] = "colour layout"
        rows = vectors.take(np.array([a, b]))
        extra.append((a, b, float(rows[0] @ rows[1])))
    if report is not None:
        report(f"candidates: {len(candidates)} pairs of mutual nearest neighbours by the encoder, "
               f"{len(extra)} more by colour layout ({time.monotonic() - started:.1f} s)")
    return candidates + extra


def with_plan(loaded: LoadedIndex, result: DuplicateResult, plan: str) -> DuplicateResult:
    """``result`` with each group's members in ``plan``'s order, the keeper first, and scored
    against it. A plan only orders the groups: they are found once (and stored) and ordered for
    each plan, not found again (the web app took 24-36 s a plan)."""
    if plan not in PLANS:
        raise UserError(f"unknown plan {plan!r}: choose one of {', '.join(PLANS)}")
    groups = []
    for group in result.groups:
        members = sorted(group.members, key=PLAN_ORDER[plan])
        rows = loaded.vectors_of(np.array([member.id for member in members]))
        scores = centred_cosines(rows[0], rows, loaded.mean_vector())
        members = [dataclasses.replace(member, score=round(float(scores[rank]), 6),
                                       action="keep" if rank == 0 else "remove")
                   for rank, member in enumerate(members)]
        groups.append(dataclasses.replace(group, members=members))
    return dataclasses.replace(result, groups=groups, plan=plan)


def choose_keepers(result: DuplicateResult, keepers: dict[int, int]) -> DuplicateResult:
    """The plan with the user's choices: ``keepers`` maps a group's number to the id of the member
    to keep instead of the plan's (the web app's duplicates view). The chosen member moves first;
    :func:`confirm_plan` then checks it against the disk like any keeper."""
    groups = {group.number: group for group in result.groups}
    for number, member_id in keepers.items():
        group = groups.get(number)
        if group is None:
            raise UserError(f"there is no duplicate group {number}: reload the duplicates view")
        chosen = [member for member in group.members if member.id == member_id]
        if not chosen:
            raise UserError(f"image {member_id} is not in duplicate group {number}: reload the duplicates view")
        groups[number] = dataclasses.replace(group, members=chosen + [m for m in group.members if m.id != member_id])
    return dataclasses.replace(result, groups=[groups[group.number] for group in result.groups])


def with_decisions(result: DuplicateResult, decisions: Decisions) -> DuplicateResult:
    """``result`` with the user's decisions (:mod:`.decisions`): groups they said are not
    duplicates set aside, and in each other group the file they chose kept (first, in the plan's
    order otherwise)."""
    groups, set_aside = [], []
    for group in result.groups:
        if decisions.set_aside({member.digest for member in group.members}):
            set_aside.append(dataclasses.replace(group, members=[dataclasses.replace(m, action="")
                                                                 for m in group.members]))
            continue
        chosen = decisions.keeper_among(group.members)
        if chosen is not None:
            members = [dataclasses.replace(chosen, chosen=True)] + [m for m in group.members if m is not chosen]
            if result.plan is not None:
                members = [dataclasses.replace(m, action="keep" if rank == 0 else "remove")
                           for rank, m in enumerate(members)]
            group = dataclasses.replace(group, members=members)
        groups.append(group)
    return dataclasses.replace(result, groups=groups, set_aside=set_aside)


def confirm_plan(result: DuplicateResult) -> tuple[DuplicateResult, list[str]]:
    """The plan checked against the disk just before it is written: a plan is acted on, and the
    groups were found from what the index recorded. A member whose file is gone or whose bytes
    changed since indexing leaves its group; a group whose keeper left keeps the next member in
    the plan's order instead; a group with one member left is dropped (its last copy is never
    marked for removal). Returns the confirmed result and a sentence for each change."""
    if result.plan is None:
        return result, []
    groups, notes = [], []
    for group in result.groups:
        # A member carries its catalogue path and digest, all indexed_bytes reads.
        present = [member for member in group.members if indexed_bytes(member) is not None]
        gone = [Path(member.path).name for member in group.members if member not in present]
        if len(present) < 2:   # a group has two members or more: something is gone
            notes.append(f"group {group.number} left out of the plan: {', '.join(gone)} gone or changed since "
                         "indexing, so no copy is left to remove")
            continue
        if gone:
            kept = "" if present[0] is group.members[0] else f"; keeping {Path(present[0].path).name} instead"
            notes.append(f"group {group.number}: {', '.join(gone)} gone or changed since indexing, left out{kept}")
        members = [dataclasses.replace(member, action="keep" if number == 0 else "remove")
                   for number, member in enumerate(present)]
        groups.append(dataclasses.replace(group, members=members))
    return dataclasses.replace(result, groups=groups), notes


#: The pixel check: each picture as a 32 x 32 grey image, brightness and contrast normalised
#: away; a candidate pair is a copy when the two correlate at least this well. Measured on the
#: planted copies of the calibration (bench/bench_dedup_threshold.py): re-encoded, resized and
#: brightened photos correlated above 0.92 with their originals, 5%-cropped ones above 0.63;
#: the nine distinct photos a barely trained encoder paired at >= 0.95 stayed below 0.41.
PIXEL_SIDE = 32
PIXEL_AGREEMENT = 0.6


class PixelAgreement:
    """Whether two indexed images are the same picture: the check that turns "look alike to
    the encoder" into "copies". Reads only the candidates' files, each once, at a reduced
    JPEG decode, and only while their bytes are those the index recorded.

    ``small_picture_threshold``: the centred cosine a pair needs when either picture is at most
    SMALL_PICTURE_SIDE px a side, where pixels cannot tell look-alikes from copies.
    """

    def __init__(self, entries: list[CatalogEntry], small_picture_threshold: float | None = None):
        self.entries = entries
        self.small_picture_threshold = small_picture_threshold
        self.pictures: dict[int, tuple[np.ndarray, int] | None] = {}
        self.unreadable_pairs = 0
        self.small_pairs_below = 0   # small pictures under small_picture_threshold
        self.judged = self.confirmed = 0

    def agree(self, a: int, b: int, score: float) -> bool:
        first, second = self._picture(a), self._picture(b)
        if first is None or second is None:
            self.unreadable_pairs += 1
            return False
        if (self.small_picture_threshold is not None and min(first[1], second[1]) <= SMALL_PICTURE_SIDE
                and score < self.small_picture_threshold):
            self.small_pairs_below += 1
            return False
        return float(first[0] @ second[0]) >= PIXEL_AGREEMENT

    def _picture(self, position: int) -> tuple[np.ndarray, int] | None:
        if position not in self.pictures:
            self.pictures[position] = pixel_signature(self.entries[position])
        return self.pictures[position]

    @property
    def tally(self) -> dict[str, tuple[int, int]]:
        """Pairs judged and confirmed, by the check that judged them."""
        return {"pixel": (self.judged, self.confirmed)}

    def evidence(self, a: int, b: int, score: float) -> str | None:
        before = self.unreadable_pairs
        agreed = self.agree(a, b, score)
        if self.unreadable_pairs == before:   # a pair whose file is gone was not judged
            self.judged += 1
            self.confirmed += agreed
        if not agreed:
            return None
        small = min(self.pictures[a][1], self.pictures[b][1]) <= SMALL_PICTURE_SIDE
        return "pixels (small picture)" if small and self.small_picture_threshold is not None else "pixels"


class GeometricAgreement:
    """Candidate pairs of photos confirmed by local features (:mod:`.verify`): a copy shares many
    keypoints with its original under one similarity transform, mirrored or not; a look-alike
    does not. Pairs with a picture too small or too plain for keypoints (a flat logo, a diagram)
    go to ``pixels`` instead (with the small-picture threshold where small), as before there was
    a verifier, and their evidence says so."""

    def __init__(self, entries: list[CatalogEntry], candidates: list[tuple[int, int, float]],
                 small_pictures: PixelAgreement, pixel_floor: float):
        from simsiam_embed.explore.verify import extract_features

        positions = sorted({p for a, b, _ in candidates for p in (a, b)})
        self.features = dict(zip(positions, extract_features([entries[p] for p in positions])))
        self.small_pictures = small_pictures
        self.pixel_floor = pixel_floor
        self.gone_pairs = 0
        self.judged = self.confirmed = 0

    @property
    def unreadable_pairs(self) -> int:
        return self.gone_pairs + self.small_pictures.unreadable_pairs

    @property
    def small_pairs_below(self) -> int:
        return self.small_pictures.small_pairs_below

    @property
    def tally(self) -> dict[str, tuple[int, int]]:
        return {"geometric": (self.judged, self.confirmed), **self.small_pictures.tally}

    def evidence(self, a: int, b: int, score: float) -> str | None:
        from simsiam_embed.explore.verify import match

        first, second = self.features.get(a), self.features.get(b)
        if first is None or second is None:
            self.gone_pairs += 1
            return None
        if not (first.verifiable and second.verifiable):   # too small, or too plain, for keypoints
            return self.small_pictures.evidence(a, b, score) if score >= self.pixel_floor else None
        found = match(first, second)
        self.judged += 1
        if found is None or not found.is_copy:
            return None
        self.confirmed += 1
        return found.describe()


def pixel_signature(entry: CatalogEntry) -> tuple[np.ndarray, int] | None:
    """The picture as PIXEL_SIDE^2 grey levels with zero mean and unit length, and its shorter
    side in pixels; None if the file cannot be read as indexed."""
    data = indexed_bytes(entry)
    if data is None:
        return None
    try:
        image = open_image(io.BytesIO(data), draft_side=PIXEL_SIDE)
        with Image.open(io.BytesIO(data)) as header:   # the stored size, not the draft's
            shorter_side = min(header.size)
    except (UnreadableImage, OSError, ValueError):
        return None
    grey = np.asarray(image.convert("L").resize((PIXEL_SIDE, PIXEL_SIDE), Image.BILINEAR), dtype=np.float32).ravel()
    grey -= grey.mean()
    norm = float(np.linalg.norm(grey))
    return (grey / norm if norm > 0 else grey), shorter_side   # a flat picture agrees with nothing


def mutual_near_pairs(graph: NeighbourGraph, threshold: float,
                      representative: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cosine) at or above ``threshold`` where each is the other's nearest neighbour
    (ties included).

    Mutual, not any pair above the threshold: in a collection of similar images, single links
    chain distinct images into one giant group. On the planted photos of bench/RESULTS.md at a
    threshold of 0.8, single links joined pairs with precision 0.002, mutual ones 0.62 (0.92
    with the pixel check); at 0.95, 0.61 and 0.85.

    ``representative[i]``: the position standing for every byte-identical copy of image i.
    Copies are one image here (they are grouped by their bytes anyway); otherwise an original
    with an exact copy would be "nearest" only to that copy, and its edited copies, whose
    nearest it is, would be left out of the group.
    """
    count = len(graph.positions)
    representative = np.arange(count) if representative is None else representative
    found = graph.positions >= 0
    neighbours = np.where(found, representative[np.maximum(graph.positions, 0)], -1)
    other = found & (neighbours != representative[:, None])
    scores = np.where(other, graph.scores, -np.inf)
    best = scores.max(axis=1, initial=-np.inf)
    nearest = other & (scores >= threshold) & (scores >= best[:, None])
    rows = [row for row in np.flatnonzero(nearest.any(axis=1)) if representative[row] == row]
    near = {int(row): {int(n): float(s) for n, s in zip(neighbours[row, nearest[row]], scores[row, nearest[row]])}
            for row in rows}
    return [(row, other_row, score) for row, others in near.items() for other_row, score in others.items()
            if row < other_row and row in near.get(other_row, {})]


def nearest_pairs(graph: NeighbourGraph, floor: float, representative: np.ndarray) -> list[tuple[int, int, float]]:
    """Pairs (i, j, score), i < j, where j is i's nearest other image (or i is j's) at ``floor``
    or above. Not mutual: an original with two copies is each copy's nearest, and only one of
    them is the original's, so mutual pairs would leave the other copy out of the group."""
    pairs: dict[tuple[int, int], float] = {}
    for row in np.flatnonzero(representative == np.arange(len(representative))):
        for position, score in zip(graph.positions[row], graph.scores[row]):
            other = int(representative[position]) if position >= 0 else -1
            if other < 0 or score < floor:
                break
            if other != row:
                pairs[min(row, other), max(row, other)] = float(score)
                break
    return [(a, b, score) for (a, b), score in pairs.items()]


def _group(vectors: CentredVectors, entries: list[CatalogEntry], positions: list[int],
           min_score: float) -> DuplicateGroup:
    """A group's members by path (no plan yet), scored against the first."""
    positions = sorted(positions, key=lambda position: entries[position].path)
    rows = vectors.take(np.array(positions))
    members = []
    for rank, position in enumerate(positions):
        entry = entries[position]
        members.append(DuplicateMember(entry.id, entry.path, entry.size, entry.mtime_ns, entry.digest,
                                       round(min(float(rows[rank] @ rows[0]), 1.0), 6), pixels=_pixel_count(entry)))
    exact = len({member.digest for member in members}) == 1
    return DuplicateGroup(0, exact, 1.0 if exact else round(min_score, 6), members)


def _pixel_count(entry: CatalogEntry) -> int:
    """Width x height from the file's header (no decode); 0 if it cannot be read."""
    try:
        with Image.open(entry.path) as image:
            return image.width * image.height
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0


#: Each plan's rule, in the words the page and the command line say it.
PLAN_RULES = {
    "keep-original": "keep the original: the most pixels (a crop or a reduced copy has fewer), then the most "
                     "bytes (a re-encode at a lower quality has fewer), then the oldest",
    "keep-largest": "keep the most bytes",
    "keep-oldest": "keep the earliest modified",
    "keep-first": "keep the first by path",
}
#: Each plan's order of a group's members, the one to keep first; ties by path.
PLAN_ORDER: dict[str, Callable[[DuplicateMember], tuple]] = {
    "keep-original": lambda member: (-member.pixels, -member.size, member.mtime_ns, member.path),
    "keep-largest": lambda member: (-member.size, member.path),
    "keep-oldest": lambda member: (member.mtime_ns, member.path),
    "keep-first": lambda member: (member.path,),
}
