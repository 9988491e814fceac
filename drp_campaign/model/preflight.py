"""Preflight results and the arithmetic behind them (pure: no Butler, Prefect or service client).

A preflight is a list of `Check` rows, one per (site, check): PASS, FAIL or SKIP, the measured
value and, for a FAIL, the fix. `drp_campaign.preflight.preflight_sites` measures them;
this module holds the row type, the verdict, the bytes a site must have room for and the token
margin, so they are tested without any service.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

__all__ = [
    "CAMPAIGN_ROW",
    "Check",
    "PreflightReport",
    "Status",
    "bytes_into_sites",
    "human_bytes",
    "token_check",
]

#: The ``site`` of a row about the whole campaign (pipeline, visits, Dask).
CAMPAIGN_ROW = "campaign"


class Status(enum.StrEnum):
    """Outcome of one check."""

    PASS = "PASS"
    FAIL = "FAIL"
    #: Not measured: what it needs failed in another row, or it does not apply to this site.
    SKIP = "SKIP"


@dataclass(frozen=True)
class Check:
    """One preflight row.

    Parameters
    ----------
    site : `str`
        Site name, or `CAMPAIGN_ROW`.
    check : `str`
        What was checked (``block``, ``butler``, ``rse:<RSE>``...).
    status : `Status`
        The outcome.
    value : `str`
        What was measured (never a secret).
    fix : `str`
        For a FAIL, what the operator should change; else empty.
    """

    site: str
    check: str
    status: Status
    value: str
    fix: str = ""

    def row(self) -> dict[str, str]:
        """The row as plain strings (a table artifact's row, a JSON line)."""
        out = asdict(self)
        out["status"] = str(self.status)
        return out


@dataclass(frozen=True)
class PreflightReport:
    """Every row of one preflight, in the order they were checked."""

    checks: tuple[Check, ...]

    @property
    def failed(self) -> list[Check]:
        """The FAIL rows."""
        return [c for c in self.checks if c.status is Status.FAIL]

    @property
    def passed(self) -> bool:
        """Whether nothing failed (SKIP rows do not fail a preflight)."""
        return not self.failed

    def rows(self) -> list[dict[str, str]]:
        """All rows as plain dicts (`Check.row`)."""
        return [c.row() for c in self.checks]

    def summary(self) -> str:
        """One line: counts per status and the failed (site, check) pairs."""
        counts = {s: sum(c.status is s for c in self.checks) for s in Status}
        text = ", ".join(f"{n} {s}" for s, n in counts.items())
        if self.failed:
            text += "; failed: " + ", ".join(f"{c.site}/{c.check}" for c in self.failed)
        return text


def human_bytes(n: float) -> str:
    """``1.5 GB``-style decimal units (as the plan's nominal sizes are decimal)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def bytes_into_sites(
    sites: Sequence[str],
    hub: str,
    raw_visit_bytes: int,
    visits_per_site: Mapping[str, int],
    links: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Bytes the campaign's transfers put at each site, from a plan (or an estimate of one).

    A site other than the hub receives the raws of its visits; every site receives the PVIs
    its neighbours send it (the plan's ``"A->B"`` links). Products a site writes itself are
    not counted: this is the room the transfers need, the lower bound an operator must have.

    Parameters
    ----------
    sites : sequence of `str`
        The campaign's sites.
    hub : `str`
        The site that already holds the raws.
    raw_visit_bytes : `int`
        Nominal bytes of one raw visit (every detector).
    visits_per_site : mapping
        Site -> visits it processes (the plan's ``counts.visits_per_site``, or shares times
        the visit count before there is a plan).
    links : mapping, optional
        ``"A->B"`` -> PVI bytes (the plan's ``bytes.links``); none before there is a plan.

    Returns
    -------
    needed : `dict` [`str`, `int`]
        Site -> bytes.
    """
    needed = {
        s: (0 if s == hub else int(visits_per_site.get(s, 0)) * raw_visit_bytes) for s in sites
    }
    for link, n in (links or {}).items():
        _, _, dst = link.partition("->")
        if dst in needed:
            needed[dst] += int(n)
    return needed


def token_check(
    site: str, expiry: datetime | None, now: datetime, margin: timedelta, fix: str
) -> Check:
    """The ``panda-token`` row: PASS when the token outlives ``now + margin``.

    Parameters
    ----------
    site : `str`
        Site name.
    expiry : `datetime.datetime` or `None`
        The token's JWT ``exp`` (`None`: not a JWT, its lifetime cannot be read).
    now : `datetime.datetime`
        The time to measure from (timezone-aware, like ``expiry``).
    margin : `datetime.timedelta`
        How long the token must still be valid.
    fix : `str`
        What to do when it is not (where to put a new token).

    Returns
    -------
    check : `Check`
    """
    if expiry is None:
        return Check(site, "panda-token", Status.SKIP, "not a JWT: its expiry cannot be read")
    left = expiry - now
    hours = left.total_seconds() / 3600
    value = f"expires {expiry:%Y-%m-%d %H:%M} UTC ({hours:.1f} h left, margin {margin})"
    if left <= margin:
        return Check(site, "panda-token", Status.FAIL, value, fix)
    return Check(site, "panda-token", Status.PASS, value)
