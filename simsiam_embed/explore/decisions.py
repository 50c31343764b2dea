"""What the user decided about duplicate groups, kept by content digest so it outlives the run.

Two kinds of decision, made in the web app or with ``dedup --not-duplicate GROUP / --keep FILE``:

- *not a duplicate*: these files are not copies of one another. A group whose files are all
  among one such set is set aside: listed apart, never in a plan. A group that gains a file the
  user has not seen is shown again.
- *keep this*: in whatever group this file lands, it is the one kept (among byte-identical
  files, the one at the path chosen).

Digests, not ids or paths: a re-run of ``dedup``, an index update (ids change) or a file moved
to another folder keeps every decision; a file whose bytes change is a new file. The decisions
live in ``<index>/dedup-decisions.json``, beside the generations and outliving them; they are
data from a folder that may have been received, so the file is validated field by field and a
damaged one is an error that says what to do, never silently dropped (it holds the user's work).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from simsiam_embed.errors import UserError
from simsiam_embed.files import folder_lock, write_json_atomic
from simsiam_embed.typed_json import from_json

if TYPE_CHECKING:   # duplicates imports this module
    from simsiam_embed.explore.duplicates import DuplicateMember

DECISIONS_FILE = "dedup-decisions.json"
DECISIONS_FORMAT = 1
_DIGEST = re.compile(r"[0-9a-f]{64}")
_in_process = threading.Lock()   # the app's request threads; folder_lock covers other processes


@dataclass(frozen=True, order=True)
class Keeper:
    digest: str
    path: str   # where it was: among byte-identical files, the one the user chose


@dataclass
class Decisions:
    not_duplicates: list[list[str]] = field(default_factory=list)   # sets of digests, each sorted
    keepers: list[Keeper] = field(default_factory=list)

    def set_aside(self, digests: set[str]) -> bool:
        """Whether a group of these files is one the user said is not a duplicate."""
        return any(digests <= set(judged) for judged in self.not_duplicates)

    def keeper_among(self, members: list[DuplicateMember]) -> DuplicateMember | None:
        """The member (with .digest and .path) the user chose to keep: the very file, else a file
        with its bytes (moved or renamed since); None if they chose none of these."""
        chosen = {(keeper.digest, keeper.path) for keeper in self.keepers}
        digests = {keeper.digest for keeper in self.keepers}
        return (next((m for m in members if (m.digest, m.path) in chosen), None)
                or next((m for m in members if m.digest in digests), None))


def read_decisions(index_folder: Path) -> Decisions:
    path = index_folder / DECISIONS_FILE
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link, not the decisions file: delete it, then run again")
    if not path.is_file():
        return Decisions()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != DECISIONS_FORMAT:
            raise ValueError(f"format is not {DECISIONS_FORMAT}")
        decisions = from_json(Decisions, data.get("decisions"), DECISIONS_FILE)
        digests = [d for judged in decisions.not_duplicates for d in judged] + [k.digest for k in decisions.keepers]
        if not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in digests):
            raise ValueError("a digest is not a SHA-256")
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is damaged ({str(error)[:100]}): it holds your dedup decisions, so fix it, or "
                        "delete it to start them over") from None
    return decisions


Change = Callable[[Decisions], Decisions]


def decide(index_folder: Path, change: Change) -> Decisions:
    """Apply ``change`` to the stored decisions, atomically:
    two requests, or two processes, never lose each other's decision."""
    # Its own lock, not the index writer's: a decision must not wait for an `index` run to end.
    with _in_process, folder_lock(index_folder, "a dedup decision", lambda _message: None, name=".decisions.lock"):
        changed = change(read_decisions(index_folder))
        judged_sets = {frozenset(judged) for judged in changed.not_duplicates if judged}
        decisions = Decisions(sorted(sorted(judged) for judged in judged_sets), sorted(set(changed.keepers)))
        write_json_atomic(index_folder / DECISIONS_FILE,
                          {"format": DECISIONS_FORMAT, "decisions": dataclasses.asdict(decisions)})
    return decisions


def not_a_duplicate(digests: set[str], undo: bool = False) -> Change:
    """The change that says these files are not copies (or, ``undo``, takes it back)."""
    def change(decisions: Decisions) -> Decisions:
        if undo:
            kept = [judged for judged in decisions.not_duplicates if not digests <= set(judged)]
            return dataclasses.replace(decisions, not_duplicates=kept)
        return dataclasses.replace(decisions, not_duplicates=decisions.not_duplicates + [sorted(digests)])
    return change


def keep_file(digest: str, path: str, group_digests: set[str]) -> Change:
    """The change that keeps this file in its group: the group's other choices are forgotten."""
    def change(decisions: Decisions) -> Decisions:
        kept = [keeper for keeper in decisions.keepers if keeper.digest not in group_digests]
        return dataclasses.replace(decisions, keepers=kept + [Keeper(digest, path)])
    return change
