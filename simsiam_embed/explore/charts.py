"""Line charts drawn with Pillow (already a dependency), for run reports: no plotting library needed.

    >>> png = line_chart([Series("loss", steps, losses)], title="loss", y_label="loss").png()
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 760, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 20, 58, 48
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


@dataclass
class Chart:
    image: Image.Image

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)   # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, wanted: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, wanted - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def line_chart(series: list[Series], title: str, y_label: str, x_label: str = "step",
               references: list[ReferenceLine] | None = None) -> Chart:
    """The series as lines on shared axes, reference lines dashed, the legend in a row above."""
    references = references or []
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    small, large = _font(12), _font(15)
    draw.text((MARGIN_LEFT, 8), title, fill="#222222", font=large)

    finite = [(x, y) for s in series for x, y in zip(s.x, s.y) if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        draw.text((MARGIN_LEFT, HEIGHT // 2), "no data yet", fill="#888888", font=small)
        return Chart(image)
    xs = [x for x, _ in finite]
    ys = [y for _, y in finite] + [line.y for line in references if math.isfinite(line.y)]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / ((x1 - x0) or 1) * (right - left),
                bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top))

    for tick in y_ticks:
        _, y = at(x0, tick)
        draw.line([(left, y), (right, y)], fill="#eeeeee")
        draw.text((left - 6, y), _label(tick), fill="#444444", font=small, anchor="rm")
    for tick in x_ticks:
        x, _ = at(tick, y0)
        draw.line([(x, bottom), (x, bottom + 4)], fill="#444444")
        draw.text((x, bottom + 6), _label(tick), fill="#444444", font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="#444444")
    draw.text(((left + right) / 2, HEIGHT - 14), x_label, fill="#444444", font=small, anchor="mm")
    draw.text((8, top - 10), y_label, fill="#444444", font=small, anchor="lm")

    legend: list[tuple[str, str]] = []
    for line in references:
        if not math.isfinite(line.y):
            continue
        _, y = at(x0, line.y)
        for start in range(int(left), int(right), 12 if line.dashed else int(right - left)):
            draw.line([(start, y), (min(start + (6 if line.dashed else right - left), right), y)],
                      fill=line.colour, width=2)
        legend.append((line.name, line.colour))
    for number, item in enumerate(series):
        colour = item.colour or PALETTE[number % len(PALETTE)]
        points = [at(x, y) for x, y in zip(item.x, item.y) if math.isfinite(x) and math.isfinite(y)]
        if len(points) == 1:
            px, py = points[0]
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        elif points:
            draw.line(points, fill=colour, width=2, joint="curve")
        legend.append((item.name, colour))
    x = left
    for name, colour in legend:   # one row between the title and the plot, never over the data
        draw.line([(x, 33), (x + 20, 33)], fill=colour, width=3)
        draw.text((x + 26, 33), name, fill="#222222", font=small, anchor="lm")
        x += 40 + draw.textlength(name, font=small)
    return Chart(image)
