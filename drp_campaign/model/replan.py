"""Re-plan a campaign without a lost data facility (issue 13). Pure: no Butler, no I/O.

A DF can be lost for weeks in a 150-day campaign. Re-planning moves only what the loss forces:

- **patches**: the lost site's patches go to the remaining sites; every other patch keeps its
  owner, so nothing already done moves. They are handed out by growing the remaining sites'
  regions into the lost one, one tract at a time, always to the site furthest below its share
  (the shares renormalised over the remaining sites, counted in work: detector-patch
  overlaps, as the first plan counts them), and only to a site the tract touches. Each site's
  set therefore stays contiguous.
- **visits**: the lost site's visits are re-homed by the first plan's rule
  (`drp_campaign.model.assign.assign_visits`: the cheapest site under the new partition, within
  the shares), the shares being what each remaining site lacks of its renormalised share;
  every other visit keeps its home.
- **groups**: every remaining site keeps its groups, done or not. The lost site's groups whose
  products reached the hub are valid and kept as they are; the work of the others is cut into
  new groups at its new owners, named with the revision (``r1g000``), so their output runs carry
  it and no dataset is made twice.

Revision ``n``'s plan is written to ``plan-r{n}`` beside the first plan (``plan``).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .assign import assign_visits
from .groups import Group, site_groups, step_bounds
from .overlaps import split_patch_key
from .partition import touching_tracts, walk
from .sky import RingsSkyMap
from .spec import CampaignSpec

__all__ = [
    "ReplanError",
    "check_without",
    "plan_dirname",
    "reassign_patches",
    "rehome_visits",
    "revised_spec",
    "revision_groups",
]


class ReplanError(ValueError):
    """A re-plan that cannot be made; the message names the problem and the fix."""


def plan_dirname(revision: int) -> str:
    """The plan directory of a revision, relative to the work directory."""
    return "plan" if revision == 0 else f"plan-r{revision}"


def check_without(
    spec: CampaignSpec, lost: Collection[str], without: Sequence[str], *, spec_label: str = ""
) -> list[str]:
    """Check the sites to re-plan without; return them in spec order.

    Parameters
    ----------
    spec : `CampaignSpec`
        The operator's spec (every site, lost or not).
    lost : collection of `str`
        Sites earlier revisions re-planned away.
    without : sequence of `str`
        The sites to lose now.
    spec_label : `str`, optional
        The spec's path, for the messages.

    Raises
    ------
    ReplanError
        Naming the problem and the fix.
    """
    where = f" in {spec_label}" if spec_label else ""
    if not without:
        raise ReplanError("name the lost site: --without SITE (repeat it for several)")
    unknown = [s for s in without if s not in spec.sites]
    if unknown:
        raise ReplanError(
            f"the spec{where} has no site {', '.join(unknown)}; its sites are "
            f"{', '.join(spec.site_names)}: name one of them with --without"
        )
    again = [s for s in without if s in lost]
    if again:
        raise ReplanError(
            f"{', '.join(again)} was re-planned away already; the remaining sites are "
            f"{', '.join(s for s in spec.site_names if s not in lost)}"
        )
    remaining = [s for s in spec.site_names if s not in lost and s not in without]
    if not remaining:
        raise ReplanError(
            f"without {', '.join(without)} no site would be left to run the campaign; "
            "keep at least the hub"
        )
    if spec.hub in without:
        raise ReplanError(
            f"{spec.hub} is the hub: it holds every published product and runs the gathered "
            "steps, so the campaign cannot go on without it. Bring the hub back and rerun the "
            f"failed steps there, or re-plan without another site (one of "
            f"{', '.join(s for s in remaining)})"
        )
    return [s for s in spec.site_names if s in set(without)]


def revised_spec(spec: CampaignSpec, lost: Collection[str]) -> CampaignSpec:
    """The spec without the lost sites, the others' shares renormalised to sum to 1.

    What the engine runs after a re-plan: its sites are the remaining ones, everything else
    (steps, pipeline, inputs, hub) is the operator's spec unchanged.
    """
    if not lost:
        return spec
    remaining = [s for s in spec.site_names if s not in set(lost)]
    total = sum(spec.sites[s].share for s in remaining)
    sites = {
        s: spec.sites[s].model_copy(update={"share": spec.sites[s].share / total})
        for s in remaining
    }
    return spec.model_copy(update={"sites": sites})


@dataclass(frozen=True)
class PatchReassignment:
    """The new owner of every patch, and what changed.

    Attributes
    ----------
    owner : `numpy.ndarray`
        Site name of each patch key (aligned with the keys given).
    moved_tracts : `dict` [`int`, `tuple` [`str`, `str`]]
        Tract -> (old owner, new owner) for every tract with a re-assigned patch.
    work : `dict` [`str`, `int`]
        Work (detector-patch overlaps) per remaining site, after.
    note : `str`
        Empty, or why a site's region could not stay contiguous.
    """

    owner: np.ndarray
    moved_tracts: dict[int, tuple[str, str]]
    work: dict[str, int]
    note: str = ""


def reassign_patches(
    skymap: RingsSkyMap,
    keys: np.ndarray,
    owner: np.ndarray,
    work: np.ndarray,
    shares: Mapping[str, float],
) -> PatchReassignment:
    """Give the patches of every site not in ``shares`` to the sites that are.

    Parameters
    ----------
    skymap : `RingsSkyMap`
        The sky map (which tracts touch).
    keys : `numpy.ndarray`
        Patch keys (`drp_campaign.model.overlaps.patch_key`).
    owner : `numpy.ndarray`
        Site name of each key in the current plan.
    work : `numpy.ndarray`
        Detector-patch overlaps of each key.
    shares : mapping of `str` to `float`
        The remaining sites (spec order) and their renormalised shares.

    Returns
    -------
    reassignment : `PatchReassignment`
        Patches of remaining sites keep their owner; the lost ones' go, a tract's worth at a
        time, to a site they touch, the one furthest below its share first. Deterministic.
    """
    keys = np.asarray(keys, dtype=np.int64)
    owner = np.asarray(owner).astype(str)
    work = np.asarray(work, dtype=np.int64)
    sites = list(shares)
    tract, _ = split_patch_key(keys)
    lost_mask = ~np.isin(owner, sites)
    new_owner = owner.copy()
    total = float(work.sum())
    site_work = {s: int(work[owner == s].sum()) for s in sites}
    lost_tracts = sorted({int(t) for t in tract[lost_mask]})
    if not lost_tracts:
        return PatchReassignment(new_owner, {}, site_work)
    all_tracts = sorted({int(t) for t in tract})
    neighbours = touching_tracts(skymap, all_tracts)
    rank = {t: i for i, t in enumerate(walk(skymap, all_tracts))}
    unit_work = {
        t: int(w) for t, w in pd.Series(work[lost_mask]).groupby(tract[lost_mask]).sum().items()
    }
    # A site holding part of a lost tract (patch-bands) touches it.
    region = {s: {int(t) for t in tract[owner == s]} for s in sites}
    pending = set(lost_tracts)
    frontier: dict[str, list[tuple[int, int]]] = {s: [] for s in sites}
    for s in sites:
        near = {n for t in region[s] for n in neighbours[t]} | region[s]
        for t in sorted(near & pending):
            heapq.heappush(frontier[s], (rank[t], t))
    goal = {s: shares[s] * total for s in sites}
    given: dict[int, str] = {}
    note = ""

    def lack(s: str) -> tuple[float, int]:
        # Furthest below its share first (relative), then spec order.
        return (-(goal[s] - site_work[s]) / goal[s] if goal[s] else 0.0, sites.index(s))

    while pending:
        for s in sites:  # drop what other sites took
            while frontier[s] and frontier[s][0][1] not in pending:
                heapq.heappop(frontier[s])
        open_sites = [s for s in sites if frontier[s]]
        if open_sites:
            s = min(open_sites, key=lack)
            _, t = heapq.heappop(frontier[s])
        else:
            # The lost region touches no remaining site (a footprint with gaps): the rest goes
            # to the site furthest below its share, which then holds two regions.
            s = min(sites, key=lack)
            t = min(pending, key=rank.__getitem__)
            note = (
                f"tract {t} touches no remaining site's region: {s} takes it as a region of its own"
            )
        pending.discard(t)
        given[t] = s
        region[s].add(t)
        site_work[s] += unit_work.get(t, 0)
        for n in neighbours[t]:
            if n in pending:
                heapq.heappush(frontier[s], (rank[n], n))
    moved: dict[int, tuple[str, str]] = {}
    for i in np.flatnonzero(lost_mask):
        t = int(tract[i])
        moved.setdefault(t, (str(owner[i]), given[t]))
        new_owner[i] = given[t]
    return PatchReassignment(new_owner, dict(sorted(moved.items())), site_work, note)


def rehome_visits(
    visit: np.ndarray,
    home: np.ndarray,
    cost: np.ndarray,
    overlaps: np.ndarray,
    shares: Mapping[str, float],
    tolerance: float = 0.05,
) -> np.ndarray:
    """Re-home the visits of sites not in ``shares``; every other visit keeps its home.

    Parameters
    ----------
    visit : `numpy.ndarray`
        Visit ids.
    home : `numpy.ndarray`
        Site name of each visit's home in the current plan.
    cost, overlaps : `numpy.ndarray`
        (n, len(shares)) PVIs each visit would send away if homed at each remaining site, and
        its detector-patch overlaps there, under the new partition (rows of visits that keep
        their home are not read).
    shares : mapping of `str` to `float`
        The remaining sites (in the columns' order) and their renormalised shares.
    tolerance : `float`, optional
        Relative tolerance on each share.

    Returns
    -------
    home : `numpy.ndarray`
        The new home of each visit (site names).
    """
    sites = list(shares)
    home = np.asarray(home).astype(object)
    moving = ~np.isin(home.astype(str), sites)
    if not moving.any():
        return home
    n = visit.size
    held = np.array([int(np.sum(home == s)) for s in sites], dtype=np.float64)
    # What each site lacks of its share, among the moving visits (the first plan's rule, on
    # the shares that are left to fill).
    lacking = np.maximum(np.array([shares[s] for s in sites]) * n - held, 0.0)
    targets = lacking / lacking.sum() if lacking.sum() > 0 else np.array(list(shares.values()))
    chosen = assign_visits(
        np.asarray(visit)[moving],
        np.asarray(cost)[moving],
        np.asarray(overlaps)[moving],
        [float(t) for t in targets],
        tolerance,
    )
    out = home.copy()
    out[moving] = np.asarray(sites, dtype=object)[chosen.home.astype(np.int64)]
    return out


def revision_groups(
    spec: CampaignSpec,
    groups: Mapping[str, Sequence[Group]],
    finished: Collection[tuple[str, str, str]],
    visits: pd.DataFrame,
    patches: pd.DataFrame,
    lost: Collection[str],
    revision: int,
) -> dict[str, list[Group]]:
    """Every site-step's groups in the new revision.

    Parameters
    ----------
    spec : `CampaignSpec`
        The revised spec (`revised_spec`: its sites are the remaining ones).
    groups : mapping of `str` to sequence of `Group`
        The current revision's groups, ``step@site`` -> groups, the lost sites' included.
    finished : collection of (step, site, group)
        The groups whose products reached the hub, or that had nothing to do.
    visits : `pandas.DataFrame`
        The new plan's visits (``visit, ra, dec, site``).
    patches : `pandas.DataFrame`
        The new plan's patches (``tract, patch, site``).
    lost : collection of `str`
        The sites lost in this revision.
    revision : `int`
        The new revision's number (its new groups carry it).

    Returns
    -------
    groups : `dict` [`str`, `list` [`Group`]]
        The remaining sites' groups, unchanged, followed at each site by its new groups: the
        lost sites' unfinished work in the sites' new visits and patches.
    """
    done = set(finished)
    out: dict[str, list[Group]] = {}
    for step in spec.steps:
        gathered = step.placement == "gather" or step.shard == "none"
        redo_visits: set[int] = set()
        redo_patches: set[tuple[int, int]] = set()
        for site in lost:
            for group in groups.get(f"{step.name}@{site}", []):
                if (step.name, site, group.name) in done:
                    continue
                redo_visits.update(group.visits or ())
                redo_patches.update(group.patches or ())
        for site in [spec.hub] if gathered else spec.site_names:
            key = f"{step.name}@{site}"
            kept = list(groups.get(key, []))
            new: list[Group] = []
            if not gathered and (redo_visits or redo_patches):
                mine_v = visits.loc[(visits["site"] == site) & visits["visit"].isin(redo_visits)]
                pairs = pd.MultiIndex.from_frame(patches[["tract", "patch"]].astype("int64"))
                wanted = (
                    pairs.isin(list(redo_patches)) if redo_patches else np.zeros(len(pairs), bool)
                )
                mine_p = patches.loc[(patches["site"] == site).to_numpy() & wanted]
                new = site_groups(
                    step.name,
                    site,
                    step.shard,
                    visits=mine_v,
                    patches=mine_p,
                    bounds=step_bounds(step.group),
                    revision=revision,
                )
            out[key] = kept + new
    return out
