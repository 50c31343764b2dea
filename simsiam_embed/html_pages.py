"""The HTML pages the commands write (dedup, clusters, outliers, map, search --html, the run
report): Jinja2 templates in ``simsiam_embed/templates``, rendered with autoescaping on, so a
file name or a label is always text, never markup.

    >>> html = render("sections.html", title="Clusters", summary="...", sections=[...])
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "templates"
#: A preview's side on the pages, in CSS pixels.
TILE_SIDE = 140


def script_json(value: Any) -> str:
    """JSON safe inside a <script> element: with every "<", ">" and "&" escaped, no file name
    ("<!--<script>", a label) can change how the browser parses the element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@lru_cache(maxsize=1)
def _environment():
    import jinja2   # a dependency of torch's too; imported here so that --help stays fast
    from markupsafe import Markup

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["script_json"] = lambda value: Markup(script_json(value))
    return environment


def tile(preview: bytes | None, caption: str, path: str, css_class: str = "") -> dict:
    """One preview for the templates' ``figure`` macro: the JPEG ``preview`` embedded as a data
    URI (None: the file cannot be read now), its caption, and its path shown on hover."""
    from simsiam_embed.index.thumbnails import data_uri

    return {"src": data_uri(preview) if preview is not None else None, "caption": caption, "path": path,
            "css": css_class}


def render(template: str, **context: Any) -> str:
    context.setdefault("tile", TILE_SIDE)
    context.setdefault("summary", "")
    context.setdefault("more", "")
    context.setdefault("pixelated", False)
    return _environment().get_template(template).render(**context)
