"""Where runs, exported models and indexes live, and what "latest" means.

A workspace is a folder (the current one by default): ``runs/<name>/`` for each pretraining run,
``runs/LATEST`` naming the newest, and ``index/`` for the search index. So the user's flow
``pretrain ./images; index; search q.jpg`` needs no paths after the first command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from simsiam_embed.errors import UserError
from simsiam_embed.files import atomic_write

RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def default_index_dir(self) -> Path:
        return self.root / "index"

    @property
    def engine_cache_dir(self) -> Path:
        """TensorRT's engines, one folder per encoder (named by its content): shared by a run's
        encoder and every index generation's copy of it, and written by this tool only."""
        return self.root / ".tensorrt-cache"

    def run_dir(self, name: str) -> Path:
        """``runs/<name>``; a name that is not one plain folder name (``../x``, ``a/b``) is refused."""
        if not RUN_NAME.fullmatch(name) or name in (".", ".."):
            raise UserError(f"run name {name!r} is not a plain folder name: use letters, digits, '.', '_' and '-' "
                            "(not starting with '.')")
        return self.runs_dir / name

    def mark_latest(self, name: str) -> None:
        """Called once a run has a checkpoint, so LATEST never names a run that failed to start."""
        from simsiam_embed.artefacts import LATEST_MARKER   # not at import: the CLI's --help loads this module

        with atomic_write(self.runs_dir / LATEST_MARKER) as handle:
            handle.write(name + "\n")

    def latest_run_dir(self) -> Path:
        """The newest run here that has a checkpoint; a clear error if there is none."""
        from simsiam_embed.artefacts import LATEST_MARKER, RunFolder

        marker = self.runs_dir / LATEST_MARKER
        if marker.is_file():
            try:
                run = self.run_dir(marker.read_text().strip())
            except (UserError, UnicodeDecodeError):
                raise UserError(f"{marker} is damaged (it must hold one run name): delete it, or name the run "
                                "folder or checkpoint") from None
            if RunFolder(run).has_checkpoint():
                return run
        raise UserError(
            f"no pretraining run in {self.root}: run `simsiam-embed pretrain IMAGE_FOLDER` first, "
            "or name a run folder or checkpoint"
        )


def run_name_for(data_dir: Path) -> str:
    """A run's default name: its image folder's name, made safe for a path."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", data_dir.resolve().name).strip(".-")
    return name or "run"
