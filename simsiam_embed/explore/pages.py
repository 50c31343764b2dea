"""What :mod:`.explore` found, written for people and for scripts: a self-contained HTML page,
JSON (everything), and CSV where rows suit (duplicate groups, the dedup plan).

Each page embeds its previews (from the index's thumbnail cache) as data URIs, so it can be
mailed or archived on its own. Pages show the first :data:`PAGE_MAX_ITEMS` groups, clusters or
outliers; the JSON and CSV outputs hold everything.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from simsiam_embed.explore.clusters import ClusterResult
from simsiam_embed.explore.duplicates import DuplicateResult
from simsiam_embed.explore.outliers import OutlierResult
from simsiam_embed.explore.projection import MapResult
from simsiam_embed.explore.quality import CHECKS, QualityResult
from simsiam_embed.files import atomic_write, write_json_atomic
from simsiam_embed.html_pages import render, tile
from simsiam_embed.index.store import LoadedIndex
from simsiam_embed.index.thumbnails import cached_thumbnail, data_uri

PAGE_MAX_ITEMS = 300
#: Members of one duplicate group shown on the page (a folder may hold thousands of one file).
PAGE_MAX_MEMBERS = 24
MAP_THUMBNAIL_SIDE = 96

def _tile(loaded: LoadedIndex, image_id: int, caption: str, css_class: str = "") -> dict:
    entry = loaded.entries[image_id]
    return tile(cached_thumbnail(loaded.folder, entry), caption, entry.path, css_class)


def _more(shown: int, total: int, what: str, data_file: str) -> str:
    return f"The first {shown} of {total} {what}; {data_file} lists them all." if total > shown else ""


def _write(path: Path, page: str) -> None:
    with atomic_write(path) as handle:
        handle.write(page)


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(_csv_text(header, rows))


def write_duplicates(result: DuplicateResult, loaded: LoadedIndex, folder: Path) -> list[Path]:
    """duplicates.json, duplicates.csv, duplicates.html, and with a plan plan.json + plan.csv:
    which file of each group to keep and which to remove. Nothing is ever deleted here."""
    written = [folder / "duplicates.json", folder / "duplicates.csv", folder / "duplicates.html"]
    write_json_atomic(written[0], result.to_json())
    _write_csv(written[1], ["group", "exact", "id", "path", "size", "mtime_ns", "score", "action"],
               [[g.number, g.exact, m.id, m.path, m.size, m.mtime_ns, m.score, m.action]
                for g in result.groups for m in g.members])
    write_duplicates_page(result, loaded, written[2])
    if result.plan:
        written += [folder / "plan.json", folder / "plan.csv"]
        write_json_atomic(written[-2], plan_json(result))
        _write(written[-1], plan_csv(result))
    return written


PLAN_CSV_COLUMNS = ["action", "path", "group", "duplicate_of"]


def plan_json(result: DuplicateResult) -> dict:
    """plan.json: the file each group keeps, and each one it would remove (with its keeper). The
    one shape for `dedup --plan` and the web app's export; nothing is ever deleted here."""
    keep = [g.members[0].path for g in result.groups]
    remove = [{"path": m.path, "duplicate_of": g.members[0].path, "group": g.number, "score": m.score}
              for g in result.groups for m in g.members[1:]]
    return {"plan": result.plan, "keep": keep, "remove": remove}


def plan_csv(result: DuplicateResult) -> str:
    """plan.csv: plan.json as rows (keep rows first)."""
    rows = [["keep", g.members[0].path, g.number, ""] for g in result.groups]
    rows += [["remove", m.path, g.number, g.members[0].path] for g in result.groups for m in g.members[1:]]
    return _csv_text(PLAN_CSV_COLUMNS, rows)


def write_analysis(result: ClusterResult | OutlierResult | MapResult | QualityResult, loaded: LoadedIndex,
                   folder: Path) -> list[Path]:
    """``<name>.json`` (everything) and ``<name>.html`` for clusters, outliers, a map or the quality checks."""
    name, write_page = {ClusterResult: ("clusters", write_clusters_page), OutlierResult: ("outliers", write_outliers_page),
                        MapResult: ("map", write_map_page), QualityResult: ("quality", write_quality_page)}[type(result)]
    written = [folder / f"{name}.json", folder / f"{name}.html"]
    write_json_atomic(written[0], result.to_json())
    write_page(result, loaded, written[1])
    return written


def write_duplicates_page(result: DuplicateResult, loaded: LoadedIndex, path: Path) -> None:
    sections = []
    for group in result.groups[:PAGE_MAX_ITEMS]:
        kind = "identical bytes" if group.exact else f"cosine >= {group.min_score:.3f}"
        tiles = [_tile(loaded, m.id, f"{m.action + ' ' if m.action else ''}{m.score:.3f} {Path(m.path).name}", m.action)
                 for m in group.members[:PAGE_MAX_MEMBERS]]
        hidden = len(group.members) - PAGE_MAX_MEMBERS
        sections.append({"heading": f"group {group.number}: {len(group.members)} images, {kind}", "tiles": tiles,
                         "note": f"and {hidden} more (duplicates.csv lists them)" if hidden > 0 else ""})
    plan = f" Plan {result.plan}: the outlined image of each group is kept." if result.plan else ""
    summary = (f"{len(result.groups)} groups ({result.duplicate_files} files beyond the first of each) among "
               f"{result.images} images; copies are {result.rule.describe()}; {result.method}.{plan}")
    _write(path, render("sections.html", title="Duplicates", summary=summary, sections=sections,
                        more=_more(PAGE_MAX_ITEMS, len(result.groups), "groups", "duplicates.json")))


def write_clusters_page(result: ClusterResult, loaded: LoadedIndex, path: Path) -> None:
    sections = []
    for cluster in result.clusters[:PAGE_MAX_ITEMS]:
        labels = ", ".join(f"{label} {count}" for label, count in list(cluster.labels.items())[:5])
        sections.append({"heading": f"cluster {cluster.number}: {cluster.size} images, cohesion {cluster.cohesion:.3f}"
                                    + (f" ({labels})" if labels else ""),
                         "tiles": [_tile(loaded, image.id, f"{image.score:.3f} {Path(image.path).name}")
                                   for image in cluster.nearest], "note": ""})
    summary = (f"{len(result.clusters)} clusters of {result.images} images (k = {result.k}: {result.k_reason}); "
               "each row shows the images nearest the cluster's centre, with their cosine to it; clusters.json "
               "lists every member.")
    _write(path, render("sections.html", title="Clusters", summary=summary, sections=sections,
                        more=_more(PAGE_MAX_ITEMS, len(result.clusters), "clusters", "clusters.json")))


def write_outliers_page(result: OutlierResult, loaded: LoadedIndex, path: Path) -> None:
    tiles = [_tile(loaded, o.id, f"{o.rank}. {o.score:.3f} {Path(o.path).name}") for o in result.outliers[:PAGE_MAX_ITEMS]]
    summary = (f"The {len(result.outliers)} images of {result.images} least similar to their {result.neighbours} "
               f"nearest neighbours (mean cosine; the typical image scores {result.median_score:.3f}); {result.method}.")
    _write(path, render("sections.html", title="Outliers", summary=summary,
                        sections=[{"heading": "", "tiles": tiles, "note": ""}]))


def write_quality_page(result: QualityResult, loaded: LoadedIndex, path: Path) -> None:
    sections = []
    for check, words in CHECKS.items():
        failing = [image for image in result.flagged if check in image.checks]
        tiles = [_tile(loaded, image.id, f"{image.measures[image.checks.index(check)]} {Path(image.path).name}")
                 for image in failing[:PAGE_MAX_ITEMS]]
        sections.append({"heading": f"{check}: {len(failing)} images ({words})", "tiles": tiles,
                         "note": _more(len(tiles), len(failing), "images", "quality.json")})
    summary = (f"{len(result.flagged)} of {result.images} images fail a check"
               + (f"; {result.unreadable} could not be read as indexed" if result.unreadable else "") + ".")
    _write(path, render("sections.html", title="Image quality", summary=summary, sections=sections))


def write_map_page(result: MapResult, loaded: LoadedIndex, path: Path) -> None:
    points = []
    for point in result.points:
        preview = cached_thumbnail(loaded.folder, loaded.entries[point.id], MAP_THUMBNAIL_SIDE)
        points.append({"x": point.x, "y": point.y, "label": point.label, "name": Path(point.path).name,
                       "src": data_uri(preview) if preview is not None else ""})
    summary = (f"{result.method} projection of {len(result.points)} images. {result.note} Hover a point to see "
               "it; wheel zooms, drag pans, shift-drag selects.")
    # The scatter plot (legend, zoom, pan, selection, hover previews): the web app draws with the same file.
    map_script = (Path(__file__).parent / "static" / "map.js").read_text()
    _write(path, render("map.html", title="Map", summary=summary, points=points, map_script=map_script))
