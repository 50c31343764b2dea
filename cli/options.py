"""Options that several commands share."""

from __future__ import annotations

import math
import os
from pathlib import Path

import click
from .lazy import library

workspace = library("workspace")



workspace_option = click.option(
    "--workspace",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    envvar="SIMSIAM_EMBED_WORKSPACE",
    help="Folder that holds runs/ and index/ (env SIMSIAM_EMBED_WORKSPACE).",
)


def workspace_at(path: Path) -> workspace.Workspace:
    return workspace.Workspace(path.resolve())


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets ``nan`` through (every comparison with it is False), minus
    nan and infinity: a learning rate of nan trains to NaN weights without a word."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (newlines, escape sequences) shown as
    escapes, so a file name cannot forge output lines or recolour the screen."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK, as torchrun sets it), or a single process: the one that says
    what a command did. Each of 8 ranks printing its own `done:` line said it 8 times, with 8
    different rates. (Read from the environment: --help must not import torch.distributed.)"""
    return int(os.environ.get("RANK", "0")) == 0


def echo_err(message: str) -> None:
    """A library's progress and notes, on stderr: stdout carries only what a script consumes."""
    click.echo(message, err=True)
