"""The optional packages (the extras): one way to ask whether one is installed, and one way to
say, before any work starts, which extra a feature needs."""

from __future__ import annotations

import importlib

from simsiam_embed.errors import UserError


def installed(module: str, attribute: str | None = None) -> bool:
    """Whether ``module`` imports (and has ``attribute``): an import, not a look-up of the name,
    since a half-uninstalled package leaves an importable empty folder behind."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        return False
    return attribute is None or hasattr(imported, attribute)


def require(module: str, feature: str, extra: str, package: str | None = None) -> None:
    """Refuse ``feature`` in one line, naming the extra to install, unless ``module`` imports."""
    if not installed(module):
        raise UserError(f"{feature} needs {package or module.partition('.')[0]}: "
                        f"pip install 'simsiam-embed[{extra}]'")
