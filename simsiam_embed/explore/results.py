"""The one JSON shape of every explore analysis's result (no FAISS, no torch: worker processes
that measure pictures import it too)."""

from __future__ import annotations

from dataclasses import asdict


class AnalysisResult:
    """What an analysis returns; ``to_json`` is its one shape, for the explore commands' files and
    ``--json``, the stored copy of each index generation, and serve's API alike."""

    #: The field that lists what was found (groups, clusters, ...): long, so it may be cut.
    listed = ""

    def to_json(self, limit: int | None = None) -> dict:
        data = asdict(self)
        found = data[self.listed]
        data[self.listed] = found[:limit]
        return {**data, f"total_{self.listed}": len(found), **self.described()}

    def described(self) -> dict:
        """Fields for people that the data alone does not spell out."""
        return {}
