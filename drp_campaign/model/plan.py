"""The whole plan in memory, in one call: the pure reference for small campaigns and tests.

:mod:`drp_campaign.planner` computes the same thing chunk by chunk on Dask with files in between;
both call the same pure functions, so they agree row for row (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .assign import Assignment, assign_visits
from .focalplane import FocalPlane
from .overlaps import OverlapTable, compute_overlaps, patch_key
from .partition import SHARE_TOLERANCE, Partition, partition_patches
from .sky import RingsSkyMap
from .transfers import detector_needs, transfer_rows, visit_costs

__all__ = ["MemoryPlan", "plan_visits", "visit_tracts"]


@dataclass(frozen=True)
class MemoryPlan:
    """Everything a plan decides, as arrays aligned with ``visits`` (sorted by visit id)."""

    visits: pd.DataFrame
    overlaps: OverlapTable
    partition: Partition
    assignment: Assignment
    transfers: pd.DataFrame  # visit, detector, src_site, dst_site (site indices)


def plan_visits(
    sky: RingsSkyMap,
    plane: FocalPlane,
    visits: pd.DataFrame,
    shares: Mapping[str, float],
    policy: str = "dec-bands",
) -> MemoryPlan:
    """Plan a (small) campaign in memory.

    Parameters
    ----------
    sky : `RingsSkyMap`
        The sky map.
    plane : `FocalPlane`
        The instrument's focal plane.
    visits : `pandas.DataFrame`
        Columns ``visit, ra, dec, rotation`` (any order of rows).
    shares : mapping
        Site -> share, in spec order.
    policy : str
        Partition policy.

    Returns
    -------
    plan : `MemoryPlan`
    """
    vis = visits.sort_values("visit", kind="stable").reset_index(drop=True)
    vid = vis["visit"].to_numpy(dtype=np.int64)
    table = compute_overlaps(
        sky, plane, vid, vis["ra"].to_numpy(), vis["dec"].to_numpy(), vis["rotation"].to_numpy()
    )
    keys, counts = np.unique(patch_key(table.tract, table.patch), return_counts=True)
    part = partition_patches(sky, keys, counts, shares, policy)
    needs = detector_needs(table, part)
    cv, cc, co = visit_costs(needs, len(part.sites))
    cost = np.zeros((vid.size, len(part.sites)), dtype=np.int64)
    ovl = np.zeros_like(cost)
    pos = np.searchsorted(vid, cv)
    cost[pos] = cc
    ovl[pos] = co
    assignment = assign_visits(vid, cost, ovl, list(shares.values()), SHARE_TOLERANCE)
    v, d, s, t = transfer_rows(needs, assignment.home, vid)
    transfers = pd.DataFrame({"visit": v, "detector": d, "src_site": s, "dst_site": t})
    return MemoryPlan(vis, table, part, assignment, transfers)


def visit_tracts(skymap: RingsSkyMap, plane: FocalPlane, visits: pd.DataFrame) -> list[int]:
    """The tracts any detector of ``visits`` overlaps, ascending.

    Parameters
    ----------
    skymap : `RingsSkyMap`
        The sky map.
    plane : `FocalPlane`
        The instrument's focal plane.
    visits : `pandas.DataFrame`
        ``visit, ra, dec, rotation`` (degrees).

    Returns
    -------
    tracts : `list` [`int`]
    """
    table = compute_overlaps(
        skymap,
        plane,
        visits["visit"].to_numpy(),
        visits["ra"].to_numpy(),
        visits["dec"].to_numpy(),
        visits["rotation"].to_numpy(),
    )
    return [int(t) for t in np.unique(table.tract)]
