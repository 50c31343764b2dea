"""A pretraining run's report: its curves as PNG files and one HTML page, in the run folder.

Read from ``metrics.jsonl`` (and ``config.json`` for the names): loss, learning rate, the
collapse monitor (z-std against 1/sqrt(dim), with the level below which the run is collapsing)
and the kNN accuracy when the run had ``--val-dir``. ``pretrain`` writes it when a run ends or
stops; ``simsiam-embed report`` writes it for any run, also while one trains.

    >>> report = write_run_report(Path("runs/images"))
    >>> report.page   # runs/images/report.html
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simsiam_embed.explore.charts import ReferenceLine, Series, line_chart
from simsiam_embed.artefacts import MetricsRecord, RunFolder, read_metrics
from simsiam_embed.errors import UserError
from simsiam_embed.files import atomic_write
from simsiam_embed.html_pages import render

#: Below this fraction of 1/sqrt(dim), z-std means collapse (the paper's Figure 2); the same
#: level as the training loop's warning.
COLLAPSE_FRACTION = 0.25
CHART_NAMES = ("loss", "lr", "z_std", "knn")


@dataclass
class RunReport:
    run_dir: Path
    page: Path
    charts: list[Path]
    steps: int


def read_run_metrics(run_dir: Path) -> list[MetricsRecord]:
    """The run's metrics records (see :func:`~simsiam_embed.artefacts.read_metrics` for what is left out)."""
    run = RunFolder(run_dir)
    if not run.metrics.is_file():
        raise UserError(f"{run_dir} has no {run.metrics.name}: name a pretraining run folder (runs/NAME)")
    return read_metrics(run.metrics)


def _series(records: list[MetricsRecord], key: str, name: str, where: str | None = None) -> Series:
    x, y = [], []
    for record in records:
        if where is not None and not record.has(where):
            continue
        value = record.get(key)
        if value is not None:
            x.append(float(record.step))
            y.append(value)
    return Series(name, x, y)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json as a dict; empty when missing or not a JSON object (the report is
    drawn all the same, without the names and the dimension it would take from it)."""
    return RunFolder(run_dir).read_config()


def run_dimension(config: dict[str, Any]) -> int | None:
    dim = config.get("dim")
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


#: The value each chart draws: a chart is drawn only when the run has logged it, so a report
#: never shows an empty frame beside a summary that quotes a number.
CHART_VALUES = {"loss": "loss", "lr": "lr", "z_std": "z_std", "knn": "knn_top1"}


def available_charts(records: list[MetricsRecord]) -> list[str]:
    """The charts a run has data for (kNN needs a run with --val-dir)."""
    def drawable(value: float | None) -> bool:
        return value is not None and math.isfinite(value)

    return [name for name in CHART_NAMES
            if any(drawable(record.get(CHART_VALUES[name])) for record in records)]


def build_chart(records: list[MetricsRecord], name: str, dim: int | None) -> bytes | None:
    """One of :data:`CHART_NAMES` as PNG bytes; None when the run has no data for it (kNN without --val-dir)."""
    steps = [r for r in records if not r.has("epoch_end") and not r.has("replanned_total_steps")]
    if name == "loss":
        return line_chart([_series(steps, "loss", "loss (logged steps)"),
                           _series(records, "loss", "epoch mean", where="epoch_end")],
                          "Loss: negative cosine (-1 is perfect agreement of the two views)", "loss")
    if name == "lr":
        return line_chart([_series(steps, "lr", "learning rate")], "Learning rate (cosine schedule)", "lr")
    if name == "z_std":
        references = []
        if dim:
            references = [ReferenceLine(f"1/sqrt(dim) = {dim ** -0.5:.4f}", dim ** -0.5, "#2a9d3a"),
                          ReferenceLine(f"collapse below {COLLAPSE_FRACTION * dim ** -0.5:.4f}",
                                        COLLAPSE_FRACTION * dim ** -0.5, "#c0392b")]
        return line_chart([_series(steps, "z_std", "z-std (logged steps)"),
                           _series(records, "z_std", "epoch mean", where="epoch_end")],
                          "Collapse monitor: std of the l2-normalised outputs", "z-std", references=references)
    if name == "knn":
        knn = _series(records, "knn_top1", "kNN top-1")
        if not knn.x:
            return None
        references = []   # the network's score before its first step: the bar to clear
        for key, label in (("knn_top1_random_init", "random init"), ("knn_top1_warm_start", "warm start")):
            start = next((r.get(key) for r in records if r.has(key)), None)
            if start is not None:
                references = [ReferenceLine(f"{label} {start:.3f}", start)]
        return line_chart([knn], "kNN accuracy on --val-dir", "top-1", references=references)
    raise ValueError(f"unknown chart {name!r}")


def write_run_report(run_dir: Path) -> RunReport:
    """Write ``report-<chart>.png`` for each chart with data, and ``report.html`` showing them."""
    records = read_run_metrics(run_dir)
    config = read_run_config(run_dir)
    dim = run_dimension(config)
    written = []
    for name in available_charts(records):
        chart = build_chart(records, name, dim)
        path = run_dir / f"report-{name}.png"
        with atomic_write(path, "wb") as handle:
            handle.write(chart)
        written.append(path)
    steps = max((r.step for r in records), default=0)
    page = RunFolder(run_dir).report_page
    with atomic_write(page) as handle:
        handle.write(_page(run_dir, config, records, steps, [path.name for path in written]))
    return RunReport(run_dir, page, written, steps)


def run_summary(config: dict[str, Any], records: list[MetricsRecord]) -> str:
    """One paragraph: the run's main settings and where its collapse monitor ended."""
    parts = [f"{key} {config[key]}" for key in ("backbone", "batch_size", "crop_size", "base_lr", "total_steps")
             if isinstance(config.get(key), (int, float, str)) and not isinstance(config.get(key), bool)]
    last = next((z for z in (r.get("z_std") for r in reversed(records)) if z is not None), None)
    dim = run_dimension(config)
    if last is not None and dim:
        ratio = last * math.sqrt(dim)
        verdict = ("collapsing" if ratio < COLLAPSE_FRACTION else "healthy")
        parts.append(f"last z-std {last:.4f} = {ratio:.2f} x 1/sqrt(dim): {verdict}")
    warnings = sum(1 for r in records if r.values.get("collapse_warning") is True)
    if warnings:
        parts.append(f"{warnings} epochs warned of collapse")
    return "; ".join(parts)


def _page(run_dir: Path, config: dict[str, Any], records: list[MetricsRecord], steps: int, charts: list[str]) -> str:
    return render("run_report.html", title=f"simsiam-embed run {run_dir.name}",
                  summary=f"{steps} steps logged. {run_summary(config, records)}", charts=charts)
