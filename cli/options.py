"""Options that several commands share."""

from __future__ import annotations

from pathlib import Path

import click

from ..workspace import Workspace

workspace_option = click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    envvar="SIMSIAM_EMBED_WORKSPACE",
    help="Folder that holds runs/ and index/ (env SIMSIAM_EMBED_WORKSPACE).",
)


def workspace_at(path: Path) -> Workspace:
    return Workspace(path.resolve())
