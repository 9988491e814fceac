"""What a stage raises besides an error: nothing to do (`Skip`), or a group that failed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..model.units import WorkUnit

__all__ = ["GroupFailure", "Skip"]


class Skip(Exception):
    """A stage found nothing to do (recorded as SKIPPED, not an error)."""


class GroupFailure(RuntimeError):
    """One group failed in one stage; the message names the group, the stage and the cause."""

    def __init__(self, unit: WorkUnit, stage: str, cause: str) -> None:
        self.unit, self.stage, self.cause = unit, stage, cause
        super().__init__(f"{unit.label} failed in stage '{stage}': {cause}")
