"""Groups: a site-step's work cut into units of bounded size (issue 12).

One QuantumGraph and one submission per (step, site) does not scale: a DR1 site's step1 would
be millions of quanta in one graph and one final job. As Rubin's campaign manager does, each
site-step's data is cut into equal-count ranges of one dimension, each range a *group*:

- visit-sharded steps: the site's visits in sky order (declination strips of `STRIP_DEG`,
  right ascension back and forth along them, so consecutive visits are neighbours on the sky),
  at most ``visits`` per group (default `DEFAULT_GROUP_VISITS`);
- tract-sharded steps: the site's tracts in id order (rings from the south, right ascension
  within a ring), at most ``tracts`` per group (default `DEFAULT_GROUP_TRACTS`), each tract
  with the patches the site owns of it; or, with ``patches``, the site's patches in (tract,
  patch) order, at most that many per group;
- a gathered step (or one run at one site) is one group holding everything.

The groups use as few groups as the bound allows, with sizes differing by at most one, so the
same plan gives the same groups, byte for byte. This module is pure: no Butler, no Prefect.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from .spec import CampaignSpec, GroupSpec

__all__ = [
    "Bounds",
    "DEFAULT_GROUP_TRACTS",
    "DEFAULT_GROUP_VISITS",
    "STRIP_DEG",
    "Group",
    "equal_ranges",
    "groups_document",
    "groups_from_document",
    "plan_groups",
    "site_groups",
    "sky_order",
    "step_bounds",
]

#: Visits per group of a visit-sharded step unless the spec says otherwise (HSC PDR2's bound).
DEFAULT_GROUP_VISITS = 500
#: Tracts per group of a tract-sharded step unless the spec says otherwise (HSC PDR2's bound).
DEFAULT_GROUP_TRACTS = 10
#: Height of the declination strips that order visits on the sky (about one LSSTCam field).
STRIP_DEG = 3.5
#: A group's name: ``g<index>``, or ``r<revision>g<index>`` for a re-plan's group.
_GROUP_NAME = re.compile(r"(?:r(?P<revision>[1-9][0-9]*))?g(?P<index>[0-9]+)")


@dataclass(frozen=True)
class Bounds:
    """The most a group holds: visits (visit-sharded), tracts or, if set, patches (tract)."""

    visits: int = DEFAULT_GROUP_VISITS
    tracts: int = DEFAULT_GROUP_TRACTS
    patches: int | None = None


@dataclass(frozen=True)
class Group:
    """One group of a site-step: the visits or patches it processes.

    Attributes
    ----------
    step, site : `str`
        The site-step.
    index : `int`
        Position among the site-step's groups, from 0.
    visits : `tuple` [`int`] or `None`
        The visits of a visit-sharded group, in sky order; `None` otherwise.
    patches : `tuple` [`tuple` [`int`, `int`]] or `None`
        The (tract, patch) pairs of a tract-sharded group, sorted; `None` otherwise.
    revision : `int`
        The plan revision that made the group: 0 for the first plan, ``n`` for the work a
        re-plan without a lost site moved here (`drp_campaign.model.replan`).
    """

    step: str
    site: str
    index: int
    visits: tuple[int, ...] | None = None
    patches: tuple[tuple[int, int], ...] | None = None
    revision: int = 0

    @property
    def name(self) -> str:
        """The group's name within its site-step: ``g000``, ``g001``, ...; ``r1g000`` for
        a group of plan revision 1 (so its output run, graph and BPS file carry the revision)."""
        prefix = f"r{self.revision}" if self.revision else ""
        return f"{prefix}g{self.index:03d}"

    @property
    def label(self) -> str:
        """How a person reads it: ``step1@FrDF#003`` (``step1@FrDF#r1-003`` in revision 1)."""
        prefix = f"r{self.revision}-" if self.revision else ""
        return f"{self.step}@{self.site}#{prefix}{self.index:03d}"

    @property
    def tracts(self) -> tuple[int, ...]:
        """The tracts of a tract-sharded group, ascending (empty otherwise)."""
        if self.patches is None:
            return ()
        return tuple(sorted({tract for tract, _ in self.patches}))

    @property
    def everything(self) -> bool:
        """Whether the group is the whole site-step's data (a gathered or unsplit step)."""
        return self.visits is None and self.patches is None


def equal_ranges(n: int, max_size: int) -> list[tuple[int, int]]:
    """Cut ``n`` ordered items into the fewest ranges of at most ``max_size``, of equal counts.

    Parameters
    ----------
    n : `int`
        Number of items (0 gives no range).
    max_size : `int`
        Largest range, at least 1.

    Returns
    -------
    ranges : `list` [`tuple` [`int`, `int`]]
        ``(start, stop)`` of each range, covering ``0..n`` in order; sizes differ by at most one,
        the larger ones first.
    """
    if max_size < 1:
        raise ValueError(f"a group holds at least one item, not {max_size}")
    if n <= 0:
        return []
    k = math.ceil(n / max_size)
    base, extra = divmod(n, k)
    bounds = np.cumsum([0] + [base + (1 if i < extra else 0) for i in range(k)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def sky_order(
    visit: npt.ArrayLike, ra: npt.ArrayLike, dec: npt.ArrayLike, strip_deg: float = STRIP_DEG
) -> np.ndarray:
    """Visit ids ordered along the sky: declination strips, right ascension back and forth.

    Consecutive visits are neighbours, so a range of them covers a compact patch of sky and a
    group's graph touches few tracts. Ties are broken by visit id, so the order is total.

    Parameters
    ----------
    visit, ra, dec : array_like
        One entry per visit: id and position (degrees).
    strip_deg : `float`, optional
        Height of the strips.

    Returns
    -------
    visits : `numpy.ndarray`
        The ids in sky order.
    """
    ids = np.asarray(visit, dtype=np.int64)
    ra_v = np.mod(np.asarray(ra, dtype=np.float64), 360.0)
    strip = np.floor((np.asarray(dec, dtype=np.float64) + 90.0) / strip_deg).astype(np.int64)
    # Odd strips run westwards, so the last visit of a strip is close to the first of the next.
    along = np.where(strip % 2 == 0, ra_v, -ra_v)
    return ids[np.lexsort((ids, along, strip))]


def site_groups(
    step: str,
    site: str,
    shard: str,
    *,
    visits: pd.DataFrame | None = None,
    patches: pd.DataFrame | None = None,
    bounds: Bounds | None = None,
    whole: bool = False,
    revision: int = 0,
) -> list[Group]:
    """The groups of one site-step.

    Parameters
    ----------
    step, site : `str`
        The site-step.
    shard : {``"visit"``, ``"tract"``, ``"none"``}
        The step's sharding dimension.
    visits : `pandas.DataFrame`, optional
        The site's visits (``visit, ra, dec``); required for ``shard="visit"``.
    patches : `pandas.DataFrame`, optional
        The site's patches (``tract, patch``); required for ``shard="tract"``.
    bounds : `Bounds`, optional
        The most visits, tracts or patches a group holds (default: `Bounds()`).
    whole : `bool`, optional
        One group holding everything (a gathered step, or a step run at one site).
    revision : `int`, optional
        The plan revision the groups belong to (their names carry it when not 0).

    Returns
    -------
    groups : `list` [`Group`]
        In order; empty if the site has nothing to do for a sharded step.
    """
    bounds = bounds or Bounds()
    if whole or shard == "none":
        return [Group(step, site, 0, revision=revision)]
    if shard == "visit":
        if visits is None:
            raise ValueError(f"{step}@{site}: a visit-sharded step needs the site's visits")
        order = sky_order(visits["visit"], visits["ra"], visits["dec"])
        return [
            Group(step, site, i, visits=tuple(int(v) for v in order[a:b]), revision=revision)
            for i, (a, b) in enumerate(equal_ranges(order.size, bounds.visits))
        ]
    if shard != "tract":
        raise ValueError(f"{step}@{site}: unknown shard {shard!r}")
    if patches is None:
        raise ValueError(f"{step}@{site}: a tract-sharded step needs the site's patches")
    pairs = sorted(
        {(int(t), int(p)) for t, p in zip(patches["tract"], patches["patch"], strict=True)}
    )
    if bounds.patches is not None:
        return [
            Group(step, site, i, patches=tuple(pairs[a:b]), revision=revision)
            for i, (a, b) in enumerate(equal_ranges(len(pairs), bounds.patches))
        ]
    tracts = sorted({t for t, _ in pairs})
    groups = []
    for i, (a, b) in enumerate(equal_ranges(len(tracts), bounds.tracts)):
        chosen = set(tracts[a:b])
        groups.append(
            Group(
                step,
                site,
                i,
                patches=tuple(p for p in pairs if p[0] in chosen),
                revision=revision,
            )
        )
    return groups


def step_bounds(group: GroupSpec | None) -> Bounds:
    """The bounds a step's ``group`` spec gives (the defaults where it says none)."""
    if group is None:
        return Bounds()
    return Bounds(
        visits=group.visits or DEFAULT_GROUP_VISITS,
        tracts=group.tracts or DEFAULT_GROUP_TRACTS,
        patches=group.patches,
    )


def plan_groups(
    spec: CampaignSpec, visits: pd.DataFrame, patches: pd.DataFrame
) -> dict[str, list[Group]]:
    """Every site-step's groups, from a plan.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign (its steps, sites and hub).
    visits : `pandas.DataFrame`
        The plan's visits (``visit, ra, dec, site``).
    patches : `pandas.DataFrame`
        The plan's patches (``tract, patch, site``).

    Returns
    -------
    groups : `dict` [`str`, `list` [`Group`]]
        ``step@site`` -> its groups, steps in spec order and sites in spec order; a gathered
        step appears at the hub only.
    """
    out: dict[str, list[Group]] = {}
    for step in spec.steps:
        gathered = step.placement == "gather" or step.shard == "none"
        sites = [spec.hub] if gathered else spec.site_names
        for site in sites:
            out[f"{step.name}@{site}"] = site_groups(
                step.name,
                site,
                step.shard,
                visits=visits.loc[visits["site"] == site],
                patches=patches.loc[patches["site"] == site],
                whole=gathered or len(sites) == 1,
                bounds=step_bounds(step.group),
            )
    return out


def groups_document(groups: dict[str, list[Group]]) -> dict[str, list[dict[str, object]]]:
    """The groups as JSON-ready data: ``step@site`` -> ``[{group, visits | tracts, patches}]``."""
    doc: dict[str, list[dict[str, object]]] = {}
    for key, site_step in groups.items():
        rows: list[dict[str, object]] = []
        for group in site_step:
            row: dict[str, object] = {"group": group.name}
            if group.visits is not None:
                row["visits"] = list(group.visits)
            if group.patches is not None:
                row["tracts"] = list(group.tracts)
                row["patches"] = [list(p) for p in group.patches]
            rows.append(row)
        doc[key] = rows
    return doc


def groups_from_document(doc: dict[str, list[dict[str, object]]]) -> dict[str, list[Group]]:
    """The groups of a `groups_document` (``plan/groups.json``), as `Group` values again.

    Raises
    ------
    ValueError
        If a key is not ``step@site`` or a group's name is not ``g<index>`` (or
        ``r<revision>g<index>``).
    """
    out: dict[str, list[Group]] = {}
    for key, rows in doc.items():
        step, sep, site = key.partition("@")
        if not sep or not step or not site:
            raise ValueError(f"groups.json: {key!r} is not 'step@site'")
        groups = []
        for row in rows:
            name = str(row["group"])
            parsed = _GROUP_NAME.fullmatch(name)
            if parsed is None:
                raise ValueError(
                    f"groups.json: {key}: {name!r} is not a group name (g000, or r1g000)"
                )
            visits = row.get("visits")
            patches = row.get("patches")
            groups.append(
                Group(
                    step,
                    site,
                    int(parsed["index"]),
                    visits=None if visits is None else tuple(int(v) for v in visits),  # type: ignore[attr-defined]
                    patches=(
                        None if patches is None else tuple((int(t), int(p)) for t, p in patches)  # type: ignore[attr-defined]
                    ),
                    revision=int(parsed["revision"] or 0),
                )
            )
        out[key] = groups
    return out
