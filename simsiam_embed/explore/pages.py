"""What :mod:`.explore` found, written for people and for scripts: a self-contained HTML page,
JSON (everything), and CSV where rows suit (duplicate groups, the dedup plan).

Each page embeds its previews (from the index's thumbnail cache) as data URIs, so it can be
mailed or archived on its own. Pages show the first :data:`PAGE_MAX_ITEMS` groups, clusters or
outliers; the JSON and CSV outputs hold everything.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from simsiam_embed.explore.analyses import ClusterResult, DuplicateResult, MapResult, OutlierResult
from simsiam_embed.files import atomic_write, write_json_atomic
from simsiam_embed.index.store import LoadedIndex
from simsiam_embed.index.thumbnails import cached_thumbnail, data_uri

PAGE_MAX_ITEMS = 300
#: Members of one duplicate group shown on the page (a folder may hold thousands of one file).
PAGE_MAX_MEMBERS = 24
MAP_THUMBNAIL_SIDE = 96

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.05em; margin: 1.2em 0 .3em; }
.summary { color: #555; max-width: 60em; }
section { border-bottom: 1px solid #ddd; padding-bottom: .6em; }
.row { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 140px; }
figure img { max-width: 140px; max-height: 140px; display: block; }
figure.remove { opacity: .55; } figure.keep img { outline: 3px solid #2a2; }
figcaption { font-size: 11px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.missing { width: 140px; height: 60px; background: #eee; font-size: 11px; }
"""


def _figure(loaded: LoadedIndex, image_id: int, caption: str, css_class: str = "") -> str:
    entry = loaded.entries[image_id]
    preview = cached_thumbnail(loaded.folder, entry)
    picture = (f'<img src="{data_uri(preview)}" alt="">' if preview is not None
               else '<div class="missing">unreadable now</div>')
    return (f'<figure class="{css_class}">{picture}<figcaption title="{html.escape(entry.path)}">'
            f'{html.escape(caption)}</figcaption></figure>')


def _page(title: str, summary: str, body: str) -> str:
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>'
            f'<p class="summary">{html.escape(summary)}</p>{body}</body></html>\n')


def _more(shown: int, total: int, what: str, data_file: str) -> str:
    return f'<p class="summary">The first {shown} of {total} {what}; {data_file} lists them all.</p>' if total > shown else ""


def _write(path: Path, page: str) -> None:
    with atomic_write(path) as handle:
        handle.write(page)


def script_json(value) -> str:
    """JSON safe inside a <script> element: with every "<", ">" and "&" escaped, no file name
    ("<!--<script>", a label) can change how the browser parses the element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


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
        with atomic_write(written[-1], "w") as handle:
            handle.write(plan_csv(result))
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


def write_analysis(result: ClusterResult | OutlierResult | MapResult, loaded: LoadedIndex, folder: Path) -> list[Path]:
    """``<name>.json`` (everything) and ``<name>.html`` for clusters, outliers or a map."""
    name, write_page = {ClusterResult: ("clusters", write_clusters_page), OutlierResult: ("outliers", write_outliers_page),
                        MapResult: ("map", write_map_page)}[type(result)]
    written = [folder / f"{name}.json", folder / f"{name}.html"]
    write_json_atomic(written[0], result.to_json())
    write_page(result, loaded, written[1])
    return written


def write_duplicates_page(result: DuplicateResult, loaded: LoadedIndex, path: Path) -> None:
    sections = []
    for group in result.groups[:PAGE_MAX_ITEMS]:
        kind = "identical bytes" if group.exact else f"cosine >= {group.min_score:.3f}"
        figures = "".join(
            _figure(loaded, m.id, f"{m.action + ' ' if m.action else ''}{m.score:.3f} {Path(m.path).name}", m.action)
            for m in group.members[:PAGE_MAX_MEMBERS])
        hidden = len(group.members) - PAGE_MAX_MEMBERS
        more = f'<p class="summary">and {hidden} more (duplicates.csv lists them)</p>' if hidden > 0 else ""
        sections.append(f'<section><h2>group {group.number}: {len(group.members)} images, {kind}</h2>'
                        f'<div class="row">{figures}</div>{more}</section>')
    plan = f" Plan {result.plan}: the outlined image of each group is kept." if result.plan else ""
    summary = (f"{len(result.groups)} groups ({result.duplicate_files} files beyond the first of each) among "
               f"{result.images} images; copies are {result.rule.describe()}; {result.method}.{plan}")
    _write(path, _page("Duplicates", summary,
                       "".join(sections) + _more(PAGE_MAX_ITEMS, len(result.groups), "groups", "duplicates.json")))


def write_clusters_page(result: ClusterResult, loaded: LoadedIndex, path: Path) -> None:
    sections = []
    for cluster in result.clusters[:PAGE_MAX_ITEMS]:
        labels = ", ".join(f"{html.escape(label)} {count}" for label, count in list(cluster.labels.items())[:5])
        figures = "".join(_figure(loaded, image.id, f"{image.score:.3f} {Path(image.path).name}")
                          for image in cluster.nearest)
        sections.append(f'<section><h2>cluster {cluster.number}: {cluster.size} images, cohesion '
                        f'{cluster.cohesion:.3f}{" (" + labels + ")" if labels else ""}</h2>'
                        f'<div class="row">{figures}</div></section>')
    summary = (f"{len(result.clusters)} clusters of {result.images} images (k = {result.k}: {result.k_reason}); "
               "each row shows the images nearest the cluster's centre, with their cosine to it.")
    _write(path, _page("Clusters", summary,
                       "".join(sections) + _more(PAGE_MAX_ITEMS, len(result.clusters), "clusters", "clusters.json")))


def write_outliers_page(result: OutlierResult, loaded: LoadedIndex, path: Path) -> None:
    figures = "".join(_figure(loaded, o.id, f"{o.rank}. {o.score:.3f} {Path(o.path).name}")
                      for o in result.outliers[:PAGE_MAX_ITEMS])
    summary = (f"The {len(result.outliers)} images of {result.images} least similar to their {result.neighbours} "
               f"nearest neighbours (mean cosine; the typical image scores {result.median_score:.3f}); {result.method}.")
    _write(path, _page("Outliers", summary, f'<div class="row">{figures}</div>'))


def write_map_page(result: MapResult, loaded: LoadedIndex, path: Path) -> None:
    points = []
    for point in result.points:
        preview = cached_thumbnail(loaded.folder, loaded.entries[point.id], MAP_THUMBNAIL_SIDE)
        points.append({"x": point.x, "y": point.y, "label": point.label, "name": Path(point.path).name,
                       "src": data_uri(preview) if preview is not None else ""})
    summary = (f"{result.method} projection of {len(result.points)} images. {result.note} Hover a point to see "
               "it; wheel zooms, drag pans, shift-drag selects.")
    body = f"""<div id="legend" style="font-size:.9em;color:#555"></div>
<canvas id="map" width="900" height="700" style="border:1px solid #ccc"></canvas>
<div id="tip" style="position:fixed;display:none;background:#fff;border:1px solid #999;padding:4px;font-size:11px"></div>
<script>
const points = {script_json(points)};
{MAP_SCRIPT}
window.mapView = drawMap(document.getElementById("map"), document.getElementById("tip"), points, p => p.src,
                         {{legend: document.getElementById("legend")}});
</script>"""
    _write(path, _page("Map", summary, body))


#: The scatter plot (legend, zoom, pan, selection, hover previews): the web app draws with the same file.
MAP_SCRIPT = (Path(__file__).parent / "static" / "map.js").read_text()
