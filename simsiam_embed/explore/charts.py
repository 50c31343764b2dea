"""Line charts for run reports and the web app, drawn with matplotlib to PNG.

    >>> png = line_chart([Series("loss", steps, losses)], title="loss", y_label="loss")   # PNG bytes

matplotlib's object API with its Agg canvas, not pyplot: no global figure state, so the web
app's worker threads can draw at once, and no display is ever looked for.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

WIDTH, HEIGHT, DPI = 760, 360, 100
PALETTE = ("#1f5fbf", "#d0582a", "#2a9d3a", "#7a3fb0")


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]
    colour: str = ""


@dataclass
class ReferenceLine:
    """A horizontal line with its meaning, e.g. the collapse level of the z-std chart."""

    name: str
    y: float
    colour: str = "#888888"
    dashed: bool = True


def line_chart(series: list[Series], title: str, y_label: str, x_label: str = "step",
               references: list[ReferenceLine] | None = None) -> bytes:
    """The chart as PNG bytes: the series as lines on shared axes (a lone point as a dot), reference lines dashed, the
    legend in a row between the title and the plot, never over the data. Non-finite values are
    left out; callers draw a chart only for values a run logged (report.available_charts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for number, item in enumerate(series):
        points = [(x, y) for x, y in zip(item.x, item.y) if math.isfinite(x) and math.isfinite(y)]
        if not points:
            continue
        xs, ys = zip(*points)
        axes.plot(xs, ys, color=item.colour or PALETTE[number % len(PALETTE)], linewidth=2,
                  marker="o" if len(points) == 1 else None, markersize=6, label=item.name)
    for line in references or []:
        if math.isfinite(line.y):
            axes.axhline(line.y, color=line.colour, linewidth=2, linestyle="--" if line.dashed else "-", label=line.name)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(True, color="#eeeeee")
    axes.set_axisbelow(True)
    figure.suptitle(title, x=0.01, ha="left", fontsize=11)
    handles, labels = axes.get_legend_handles_labels()
    if handles:   # one row when the names fit the width, else two
        columns = len(labels) if sum(len(label) + 6 for label in labels) <= 90 else math.ceil(len(labels) / 2)
        axes.legend(handles, labels, loc="lower left", bbox_to_anchor=(0, 1.01), ncols=columns, frameon=False,
                    fontsize=9, handlelength=1.5, borderaxespad=0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
