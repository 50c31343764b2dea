"""Each analysis computed once per index generation, whoever asks first: the explore commands
and serve read the same stored result, in the same shape (``AnalysisResult.to_json``).

A generation's vectors never change, so its results are stored beside them in
``<generation>/analyses/<kind>-<settings digest>.json`` and dropped with the generation. A
stored result is data from a folder that may have been received: it is rebuilt field by field
(:mod:`simsiam_embed.typed_json`), every image it names must be in the generation's catalogue
under the same path, and anything else is computed afresh. An index folder the user cannot
write to is analysed without storing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Callable

from simsiam_embed import __version__
from simsiam_embed.explore.clusters import ClusterResult, find_clusters
from simsiam_embed.explore.duplicates import DuplicateResult, find_duplicates, with_decisions, with_plan
from simsiam_embed.explore.outliers import OutlierResult, find_outliers
from simsiam_embed.explore.projection import MapResult, project_to_map
from simsiam_embed.explore.results import AnalysisResult
from simsiam_embed.explore.decisions import read_decisions
from simsiam_embed.explore.quality import QualityResult, check_quality
from simsiam_embed.errors import Report, UserError
from simsiam_embed.files import write_json_atomic
from simsiam_embed.index.store import LoadedIndex
from simsiam_embed.typed_json import JsonShapeError, from_json

STORE_FOLDER = "analyses"
#: Bumped when an analysis changes what it finds for the same settings: older results are recomputed.
STORE_FORMAT = 5

ANALYSES: dict[str, tuple[Callable[..., AnalysisResult], type]] = {
    "duplicates": (find_duplicates, DuplicateResult),
    "clusters": (find_clusters, ClusterResult),
    "outliers": (find_outliers, OutlierResult),
    "map": (project_to_map, MapResult),
    "quality": (check_quality, QualityResult),
}


def analysis(loaded: LoadedIndex, kind: str, report: Report | None = None, store: bool = True,
             with_user_decisions: bool = True, **settings: Any) -> AnalysisResult:
    """``kind``'s result for ``loaded``'s generation with these ``settings``: the stored one if any,
    else computed now (``report`` hears its progress) and, if ``store``, stored. A dedup plan is
    not a setting of what is found, only of its order: the groups are stored once, whatever the
    plan, and ordered for the one asked. Duplicates come with the user's decisions unless
    ``with_user_decisions`` is off (:func:`decided` applies them later)."""
    settings, plan = _without_order(kind, settings)
    result = _stored_or_computed(loaded, kind, report, store, settings)
    if kind != "duplicates":
        return result
    # The user's decisions are applied on every read, not stored in the result: they change
    # without the index changing, and must hold for every generation after.
    result = with_plan(loaded, result, plan) if plan is not None else result
    return decided(loaded, result) if with_user_decisions else result


def decided(loaded: LoadedIndex, result: DuplicateResult) -> DuplicateResult:
    """``result`` with the decisions the user has stored for this index (read now)."""
    return with_decisions(result, read_decisions(loaded.folder))


def _stored_or_computed(loaded: LoadedIndex, kind: str, report: Report | None, store: bool,
                        settings: dict[str, Any]) -> AnalysisResult:
    compute, result_type = ANALYSES[kind]
    settings = _complete(compute, settings)
    path = stored_path(loaded, kind, settings)
    stored = _read(path, result_type, loaded, settings)
    if stored is not None:
        if report is not None:
            report(f"{kind}: as computed before for this index generation ({path})")
        return stored
    result = compute(loaded, **settings, report=report)
    if store and not path.parent.is_symlink():   # a received folder's link must not carry the write elsewhere
        try:
            path.parent.mkdir(exist_ok=True)
            write_json_atomic(path, {"format": STORE_FORMAT, "version": __version__, "settings": settings,
                                     "result": dataclasses.asdict(result)})
        except (OSError, UserError):
            pass   # a read-only index (a received one, a shared mount) or a full disk: computed, not stored
    return result


def asks_for_defaults(kind: str, settings: dict[str, Any]) -> bool:
    """Whether ``settings`` are ``kind``'s own defaults (the result its explore command stores),
    a dedup plan aside (:func:`analysis`)."""
    compute, _ = ANALYSES[kind]
    return _complete(compute, _without_order(kind, settings)[0]) == _complete(compute, {})


def _without_order(kind: str, settings: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the settings of what is found, the dedup plan): a plan only orders the groups."""
    if kind != "duplicates":
        return settings, None
    return {name: value for name, value in settings.items() if name != "plan"}, settings.get("plan")


def _complete(compute: Callable[..., AnalysisResult], settings: dict[str, Any]) -> dict[str, Any]:
    """The settings with the analysis's own defaults filled in: `dedup` and serve's duplicates view
    ask the same question in different words, and must find the same stored answer."""
    bound = inspect.signature(compute).bind(None, **settings)
    bound.apply_defaults()
    complete = {name: value for name, value in list(bound.arguments.items())[1:] if name != "report"}
    if complete.get("geometry", False) is None:   # duplicates: whether this machine can verify geometrically
        from simsiam_embed.explore.verify import opencv_available

        complete["geometry"] = opencv_available() and complete.get("pixel_check", True)
    return complete


def stored_path(loaded: LoadedIndex, kind: str, settings: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return loaded.generation / STORE_FOLDER / f"{kind}-{key}.json"


def _read(path: Path, result_type: type, loaded: LoadedIndex, settings: dict[str, Any]) -> AnalysisResult | None:
    if path.parent.is_symlink() or path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT or data.get("settings") != settings:
            return None
        result = from_json(result_type, data.get("result"), path.name)
        _check_images(result, loaded)
    except (OSError, ValueError, TypeError, UnicodeDecodeError):   # JsonShapeError is a ValueError
        return None
    return result


def _check_images(value: Any, loaded: LoadedIndex) -> None:
    """Every (id, path) in a stored result names that image of this generation's catalogue."""
    if isinstance(value, list):
        for item in value:
            _check_images(item, loaded)
        return
    if not dataclasses.is_dataclass(value):
        return
    for id_field, path_field in (("id", "path"), ("nearest_id", "nearest_path")):
        if hasattr(value, id_field):
            image_id, image_path = getattr(value, id_field), getattr(value, path_field)
            entry = loaded.entries.get(image_id)
            if (entry is None or entry.path != image_path) and not (id_field == "nearest_id" and image_id == -1):
                raise JsonShapeError(f"image {image_id} is not in the index as {image_path!r:.60}")
    if hasattr(value, "mtime_ns"):
        # A duplicate's evidence read its file (the pixel check): a file changed since is checked again.
        try:
            stat = Path(value.path).stat()
        except OSError:
            raise JsonShapeError(f"{value.path!r:.60} is gone") from None
        if (stat.st_size, stat.st_mtime_ns) != (value.size, value.mtime_ns):
            raise JsonShapeError(f"{value.path!r:.60} changed since")
    member_ids = getattr(value, "member_ids", [])
    if any(member_id not in loaded.entries for member_id in member_ids):
        raise JsonShapeError("a cluster member is not in the index")
    for field in dataclasses.fields(value):
        _check_images(getattr(value, field.name), loaded)
