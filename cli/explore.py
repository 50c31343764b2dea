"""`dedup`, `clusters`, `outliers`, `quality`, `map`, `report` and `serve`: what the embeddings (and the
pictures) say."""

from __future__ import annotations

import json
from pathlib import Path

import click

from simsiam_embed.errors import UserError
from simsiam_embed.settings import CANDIDATE_THRESHOLD, DUPLICATE_NEIGHBOURS, GEOMETRY_THRESHOLD, MAP_MAX_POINTS, OUTLIER_NEIGHBOURS, PLANS, SMALL_PICTURE_SIDE, SMALL_PICTURE_THRESHOLD, UNCHECKED_THRESHOLD
from .options import FiniteFloatRange, echo_err, printable, workspace_at, workspace_option
from .lazy import library

explore_duplicates = library("explore.duplicates")
explore_stored = library("explore.stored")
explore_pages = library("explore.pages")
explore_decisions = library("explore.decisions")
files = library("files")
index_store = library("index.store")
explore_report = library("explore.report")


index_dir_option = click.option("--index-dir", "--index", "index_dir", type=click.Path(file_okay=False, path_type=Path),
                                help="The index folder.  [default: WORKSPACE/index]")
output_option = click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
                             help="Folder for the JSON, CSV and HTML files.  [default: WORKSPACE/explore]")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")



def _open(workspace: Path, index_dir: Path | None, output: Path | None) -> tuple[index_store.LoadedIndex, Path]:
    loaded = index_store.load_index(index_dir or workspace_at(workspace).default_index_dir, for_search=False)
    folder = output or workspace_at(workspace).root / "explore"
    files.ensure_writable_folder(folder)
    return loaded, folder


def _printed_as_json(result, written: list[Path], as_json: bool) -> bool:
    """Say which files were written (stderr), and print ``result`` as JSON when asked."""
    echo_err("wrote " + ", ".join(str(path) for path in written))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    return as_json


@click.command("dedup")
@workspace_option
@index_dir_option
@output_option
@click.option("--threshold", type=FiniteFloatRange(-1.0, 1.0),
              help="Centred cosine at or above which two mutual nearest neighbours are candidates, for "
                   f"every pair.  [default: calibrated (README): {GEOMETRY_THRESHOLD} for photos confirmed by local "
                   f"features (OpenCV), {CANDIDATE_THRESHOLD} for pictures checked by pixels, "
                   f"{SMALL_PICTURE_THRESHOLD} for pictures of {SMALL_PICTURE_SIDE} px or less, "
                   f"{UNCHECKED_THRESHOLD} with --no-pixel-check]")
@click.option("--plan", type=click.Choice(PLANS),
              help="Also write plan.json/plan.csv: which file of each group to keep, which to remove. "
                   "Nothing is ever deleted.")
@click.option("--neighbours", type=click.IntRange(min=1), default=DUPLICATE_NEIGHBOURS,
              help="Neighbours searched per image; byte-identical copies among them are skipped over to "
                   "find its nearest other image.")
@click.option("--no-pixel-check", is_flag=True,
              help="Group look-alikes the encoder pairs without looking at the pictures (by default a pair must "
                   "also be confirmed by local features, or for small or plain pictures agree pixel for pixel: "
                   "a copy, not a similar photo).")
@click.option("--not-duplicate", "not_duplicate", type=click.IntRange(min=1), multiple=True, metavar="GROUP",
              help="Say group GROUP (as numbered by this same command) is not duplicates: it is set aside, and "
                   "stays so for later runs, index updates and plans (stored by the files' digests in the index).")
@click.option("--is-duplicate", "is_duplicate", type=click.IntRange(min=1), multiple=True, metavar="GROUP",
              help="Take back --not-duplicate for group GROUP.")
@click.option("--keep", "keep", type=click.Path(path_type=Path), multiple=True, metavar="FILE",
              help="Keep FILE in whatever group it is in, whatever the plan (stored like --not-duplicate).")
@json_option
def dedup_command(workspace: Path, index_dir: Path | None, output: Path | None, threshold: float | None, plan: str | None,
                  neighbours: int, no_pixel_check: bool, not_duplicate: tuple[int, ...], is_duplicate: tuple[int, ...],
                  keep: tuple[Path, ...], as_json: bool) -> None:
    """Exact duplicates (same bytes) and near-duplicate groups among the indexed images."""
    loaded, folder = _open(workspace, index_dir, output)
    settings = {"threshold": threshold, "neighbours": neighbours, "plan": plan, "pixel_check": not no_pixel_check}
    result = explore_stored.analysis(loaded, "duplicates", echo_err, **settings)
    if not_duplicate or is_duplicate or keep:
        _record_decisions(loaded, result, not_duplicate, is_duplicate, keep)
        result = explore_stored.analysis(loaded, "duplicates", **settings)
    result, notes = explore_duplicates.confirm_plan(result)   # the files as they are now, not as indexed
    for note in notes:
        echo_err(f"warning: {note}")
    if result.set_aside:
        count = len(result.set_aside)
        echo_err(f"{count} group{'s' if count != 1 else ''} you said {'is' if count == 1 else 'are'} not a duplicate "
                 f"(in the web app), left out: {', '.join(str(g.number) for g in result.set_aside[:10])}"
                 f"{' ...' if count > 10 else ''}; undo it there")
    written = explore_pages.write_duplicates(result, loaded, folder)
    if _printed_as_json(result, written, as_json):
        return
    click.echo(f"{len(result.groups)} duplicate groups among {result.images} images ({result.rule.describe()}); "
               f"{result.duplicate_files} files beyond the first of each group")
    for group in result.groups[:10]:
        kind = "identical" if group.exact else f">= {group.min_score:.3f}"
        click.echo(f"  group {group.number} ({len(group.members)} images, {kind})")
        for member in group.members[:10]:
            action = (f"{member.action:<7}" if member.action else "") + ("(your choice) " if member.chosen else "")
            click.echo(f"    {action}{member.score:.4f}  {printable(member.path)}")
        if len(group.members) > 10:
            click.echo(f"    ... {len(group.members) - 10} more")
    if len(result.groups) > 10:
        click.echo(f"  ... {len(result.groups) - 10} more in {written[0]}")


def _record_decisions(loaded, result, not_duplicate: tuple[int, ...], is_duplicate: tuple[int, ...],
                      keep: tuple[Path, ...]) -> None:
    decisions = explore_decisions
    groups = {group.number: group for group in result.groups + result.set_aside}
    for number in (*not_duplicate, *is_duplicate):
        if number not in groups:
            raise UserError(f"there is no duplicate group {number} (this run found {len(result.groups)} and "
                            f"{len(result.set_aside)} set aside): run `dedup` with the same settings to see them")
    for number in not_duplicate:
        decisions.decide(loaded.folder, decisions.not_a_duplicate({m.digest for m in groups[number].members}))
        echo_err(f"group {number} set aside: not a duplicate")
    for number in is_duplicate:
        decisions.decide(loaded.folder, decisions.not_a_duplicate({m.digest for m in groups[number].members}, undo=True))
        echo_err(f"group {number} is duplicates again")
    for path in keep:
        wanted = str(path.resolve())
        found = [(group, member) for group in result.groups for member in group.members if member.path == wanted]
        if not found:
            raise UserError(f"{printable(str(path))} is in no duplicate group: run `dedup` to see the groups")
        group, member = found[0]
        decisions.decide(loaded.folder, decisions.keep_file(member.digest, member.path,
                                                            {m.digest for m in group.members}))
        echo_err(f"group {group.number}: keeping {printable(member.path)}")


@click.command("clusters")
@workspace_option
@index_dir_option
@output_option
@click.option("-k", "clusters", type=click.IntRange(min=1), help="Number of clusters.  [default: sqrt(n/2), 2..1000]")
@click.option("--examples", type=click.IntRange(min=1), default=8, help="Images shown per cluster, nearest its centre.")
@json_option
def clusters_command(workspace: Path, index_dir: Path | None, output: Path | None, clusters: int | None,
                     examples: int, as_json: bool) -> None:
    """Group the indexed images by k-means on their embeddings (FAISS)."""
    loaded, folder = _open(workspace, index_dir, output)
    result = explore_stored.analysis(loaded, "clusters", echo_err, k=clusters, examples=examples)
    if _printed_as_json(result, explore_pages.write_analysis(result, loaded, folder), as_json):
        return
    click.echo(f"{len(result.clusters)} clusters of {result.images} images (k = {result.k}: {result.k_reason})")
    for cluster in result.clusters[:20]:
        labels = ", ".join(f"{printable(label)} {count}" for label, count in list(cluster.labels.items())[:3])
        click.echo(f"  {cluster.number:>4}  {cluster.size:>6} images  cohesion {cluster.cohesion:.3f}"
                   f"  {printable(Path(cluster.nearest[0].path).name)}{'  (' + labels + ')' if labels else ''}")


@click.command("outliers")
@workspace_option
@index_dir_option
@output_option
@click.option("-n", "--count", type=click.IntRange(min=1), default=50, help="How many of the oddest images to list.")
@click.option("--neighbours", type=click.IntRange(min=1), default=OUTLIER_NEIGHBOURS,
              help="An image's score is its mean cosine to this many nearest neighbours.")
@json_option
def outliers_command(workspace: Path, index_dir: Path | None, output: Path | None, count: int, neighbours: int,
                     as_json: bool) -> None:
    """The indexed images least similar to their nearest neighbours, oddest first."""
    loaded, folder = _open(workspace, index_dir, output)
    result = explore_stored.analysis(loaded, "outliers", echo_err, count=count, neighbours=neighbours)
    if _printed_as_json(result, explore_pages.write_analysis(result, loaded, folder), as_json):
        return
    click.echo(f"the {len(result.outliers)} oddest of {result.images} images (mean cosine to {result.neighbours} "
               f"nearest; the typical image: {result.median_score:.3f})")
    for outlier in result.outliers:
        click.echo(f"  {outlier.rank:>4}  {outlier.score:.4f}  {printable(outlier.path)}")


@click.command("quality")
@workspace_option
@index_dir_option
@output_option
@click.option("-n", "--show", type=click.IntRange(min=0), default=10, help="Images listed per check (all are in quality.json).")
@json_option
def quality_command(workspace: Path, index_dir: Path | None, output: Path | None, show: int, as_json: bool) -> None:
    """Image-quality checks on the indexed images: blurry, too dark or bright, tiny, near-uniform, damaged."""
    loaded, folder = _open(workspace, index_dir, output)
    result = explore_stored.analysis(loaded, "quality", echo_err)
    if _printed_as_json(result, explore_pages.write_analysis(result, loaded, folder), as_json):
        return
    click.echo(f"{len(result.flagged)} of {result.images} images fail a check"
               + (f" ({result.unreadable} could not be read as indexed)" if result.unreadable else ""))
    for check, words in result.described()["checks"].items():
        failing = [image for image in result.flagged if check in image.checks]
        click.echo(f"  {check}: {len(failing)} ({words})")
        for image in failing[:show]:
            click.echo(f"    {image.measures[image.checks.index(check)]}  {printable(image.path)}")
        if len(failing) > show:
            click.echo(f"    ... {len(failing) - show} more")


@click.command("map")
@workspace_option
@index_dir_option
@output_option
@click.option("--method", type=click.Choice(["auto", "umap", "pca"]), default="auto",
              help="auto: UMAP when umap-learn is installed (the [map] extra), else PCA.")
@click.option("--max-points", type=click.IntRange(min=2), default=MAP_MAX_POINTS,
              help="Images drawn; a larger index is sampled evenly at random.")
@json_option
def map_command(workspace: Path, index_dir: Path | None, output: Path | None, method: str, max_points: int,
                as_json: bool) -> None:
    """A 2-D map of the indexed images: a page where each point shows its image on hover."""
    loaded, folder = _open(workspace, index_dir, output)
    result = explore_stored.analysis(loaded, "map", echo_err, method=method, max_points=max_points)
    written = explore_pages.write_analysis(result, loaded, folder)
    if _printed_as_json(result, written, as_json):
        return
    if result.note:
        echo_err(result.note)
    click.echo(f"{result.method} map of {len(result.points)} images: {written[-1]}")


@click.command("report")
@click.argument("run", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@workspace_option
@json_option
def report_command(run: Path | None, workspace: Path, as_json: bool) -> None:
    """Draw a pretraining run's curves (default: the latest run) as PNG files and report.html in its folder."""
    report = explore_report.write_run_report(run or workspace_at(workspace).latest_run_dir())
    if as_json:
        click.echo(json.dumps({"page": str(report.page), "charts": [str(path) for path in report.charts],
                               "steps": report.steps}, indent=2))
        return
    click.echo(f"{report.page} ({len(report.charts)} charts, {report.steps} steps)")


@click.command("serve")
@workspace_option
@index_dir_option
@click.option("--host", default="127.0.0.1", help="Address to listen on. Anything but loopback exposes your images.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, help="Port to listen on (0: any free port).")
@click.option("--max-upload-mb", type=FiniteFloatRange(0.01, 1024), default=20.0, help="Largest query image accepted.")
def serve_command(workspace: Path, index_dir: Path | None, host: str, port: int, max_upload_mb: float) -> None:
    """A local web app over the index: drop an image to search, browse duplicates, clusters, outliers,
    image quality, the map and the latest run's report. JSON API with OpenAPI docs at /docs."""
    try:
        from simsiam_embed.explore.serve import serve
    except ModuleNotFoundError as missing:
        if missing.name not in ("fastapi", "uvicorn", "starlette", "multipart", "python_multipart"):
            raise
        raise UserError("serve needs FastAPI and uvicorn: pip install 'simsiam-embed[serve]'") from None
    serve(index_dir or workspace_at(workspace).default_index_dir, workspace_at(workspace), host, port,
          int(max_upload_mb * 1024 * 1024), report=echo_err)
