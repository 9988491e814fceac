"""Partition the sky's patches among data facilities.

Policies (DESIGN.md section 4):

``dec-bands`` (default)
    Whole tracts. Tracts are walked in declination bands: ring by ring from south to north, in a
    serpentine (boustrophedon) order, east-bound in even rings and west-bound in odd ones, so that
    the last tract of one ring sits beside the first tract of the next. The walk is cut into one
    run per site, in spec order, where the cumulative work is closest to the cumulative shares.
    Each site therefore holds one band of rings plus partial rings at its two ends: a contiguous
    region, kept fixed for the survey so coadds keep all years at one DF (RTN-100).
``patch-bands``
    The same walk, cut between whole-height columns of patches instead of whole tracts, for
    footprints with too few tracts to hold the shares with whole tracts (a test field of two tracts
    shared by three sites). Tract-level outputs of a split tract then need its patches gathered.

Work is measured in detector-patch overlaps (the coadd inputs), not area.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .overlaps import patch_key, split_patch_key
from .sky import RingsSkyMap

__all__ = ["POLICIES", "Partition", "partition_patches"]

POLICIES = ("dec-bands", "patch-bands")

#: Relative tolerance on each site's work share (|actual / target - 1|).
SHARE_TOLERANCE = 0.05


@dataclass(frozen=True)
class Partition:
    """Ownership of every patch that carries work.

    Attributes
    ----------
    sites : tuple of str
        Site names in spec order; ``owner`` holds indices into it.
    keys : numpy.ndarray
        Sorted patch keys (:func:`~drp_campaign.model.overlaps.patch_key`).
    owner : numpy.ndarray
        Site index (int8) of each key.
    work : numpy.ndarray
        Detector-patch overlaps of each key.
    shares : dict
        Achieved work share per site.
    targets : dict
        Requested share per site.
    note : str
        Empty when every share is within tolerance, else why not.
    """

    policy: str
    sites: tuple[str, ...]
    keys: np.ndarray
    owner: np.ndarray
    work: np.ndarray
    shares: dict[str, float]
    targets: dict[str, float]
    note: str = ""
    tracts_by_site: dict[str, list[int]] = field(default_factory=dict)

    def owner_of(self, tract: np.ndarray, patch: np.ndarray) -> np.ndarray:
        """Site index owning each (tract, patch); raises KeyError for a patch outside the plan."""
        keys = patch_key(tract, patch)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, self.keys.size - 1)
        if self.keys.size == 0 or not np.array_equal(self.keys[pos], keys):
            raise KeyError("patch not in the partition (the plan and the overlaps disagree)")
        return self.owner[pos]

    @property
    def max_deviation(self) -> float:
        """Largest relative deviation of a site's share from its target."""
        return max(abs(self.shares[s] / self.targets[s] - 1.0) for s in self.sites)

    def patches_of(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        """(tract, patch) arrays of one site's patches."""
        i = self.sites.index(site)
        return split_patch_key(self.keys[self.owner == i])


def _walk(skymap: RingsSkyMap, tracts: Sequence[int]) -> list[int]:
    """Order tracts ring by ring (south to north), serpentine in RA within rings."""
    by_ring: dict[int, list[tuple[float, int]]] = {}
    for t in tracts:
        info = skymap[t]
        by_ring.setdefault(info.ring, []).append((info.ctr_ra_deg, t))
    order: list[int] = []
    for n, ring in enumerate(sorted(by_ring)):
        row = sorted(by_ring[ring])
        if len(row) > 1:
            # Start after the widest empty stretch of RA, so a field across RA 0 stays in one run.
            ras = np.array([r for r, _ in row])
            gaps = np.diff(np.concatenate([ras, [ras[0] + 360.0]]))
            start = (int(np.argmax(gaps)) + 1) % len(row)
            row = row[start:] + row[:start]
        if n % 2:
            row.reverse()
        order.extend(t for _, t in row)
    return order


def _column_walk(skymap: RingsSkyMap, tract: int, eastward: bool) -> list[list[int]]:
    """The tract's patch columns (each full height) in the walking direction.

    Pixel x grows westward (CD1_1 < 0), so walking east means walking x downward. Whole columns
    keep every run as contiguous as whole tracts: each touches both rings beside it.
    """
    nx, ny = skymap[tract].num_patches
    xs = range(nx - 1, -1, -1) if eastward else range(nx)
    return [[y * nx + x for y in range(ny)] for x in xs]


def _cut(work: np.ndarray, targets: Sequence[float]) -> list[int]:
    """Cut a sequence of unit works into len(targets) runs with cumulative work near the targets.

    Each boundary is put where the cumulative work is closest to the cumulative target, never
    before the previous boundary, leaving every site at least one unit when there are enough.
    Returns the run start indices (first is 0).
    """
    n = work.size
    cum = np.concatenate([[0.0], np.cumsum(work, dtype=np.float64)])
    total = cum[-1]
    starts = [0]
    goal = 0.0
    for k, share in enumerate(targets[:-1]):
        goal += share * total
        remaining_sites = len(targets) - k - 1
        lo = starts[-1] + 1 if n - starts[-1] > remaining_sites else starts[-1]
        hi = max(lo, n - remaining_sites)
        cand = np.arange(lo, hi + 1)
        best = int(cand[np.argmin(np.abs(cum[cand] - goal))]) if cand.size else lo
        starts.append(best)
    return starts


def partition_patches(
    skymap: RingsSkyMap,
    work_keys: np.ndarray,
    work_counts: np.ndarray,
    shares: Mapping[str, float],
    policy: str = "dec-bands",
) -> Partition:
    """Give each patch with work to exactly one site, in contiguous runs sized by the shares.

    Parameters
    ----------
    skymap : `RingsSkyMap`
        The sky map.
    work_keys, work_counts : numpy.ndarray
        Patch keys and their detector-patch overlap counts (any order, keys unique).
    shares : mapping of str to float
        Target share per site, in spec order.
    policy : str
        ``dec-bands`` (whole tracts) or ``patch-bands``.

    Returns
    -------
    partition : `Partition`
        Every patch of every tract with work (``dec-bands``: all its patches, so tracts stay whole;
        ``patch-bands``: the same set) owned by exactly one site.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown partition policy {policy!r}; known: {', '.join(POLICIES)}")
    sites = tuple(shares)
    targets = [float(shares[s]) for s in sites]
    wk = np.asarray(work_keys, dtype=np.int64)
    wc = np.asarray(work_counts, dtype=np.int64)
    tr, _ = split_patch_key(wk)
    tracts = sorted({int(t) for t in np.unique(tr)})
    walk = _walk(skymap, tracts)
    work_of = dict(zip(wk.tolist(), wc.tolist(), strict=True))
    # The units walked: whole tracts, or single patches in walking order.
    units: list[list[int]] = []
    ring_rank = {r: n for n, r in enumerate(sorted({skymap[t].ring for t in tracts}))}
    for t in walk:
        nx, ny = skymap[t].num_patches
        if policy == "dec-bands":
            units.append([int(k) for k in patch_key(np.full(nx * ny, t), np.arange(nx * ny))])
        else:
            eastward = ring_rank[skymap[t].ring] % 2 == 0
            units.extend(
                [int(k) for k in patch_key(np.full(len(col), t), col)]
                for col in _column_walk(skymap, t, eastward)
            )
    unit_work = np.array([sum(work_of.get(k, 0) for k in u) for u in units], dtype=np.float64)
    starts = _cut(unit_work, targets) + [len(units)]
    keys: list[int] = []
    owner: list[int] = []
    site_work = np.zeros(len(sites))
    tracts_by_site: dict[str, list[int]] = {s: [] for s in sites}
    for s in range(len(sites)):
        for u in range(starts[s], starts[s + 1]):
            keys.extend(units[u])
            owner.extend([s] * len(units[u]))
            site_work[s] += unit_work[u]
            for t in {int(k) // 1024 for k in units[u]}:
                if t not in tracts_by_site[sites[s]]:
                    tracts_by_site[sites[s]].append(t)
    keys_arr = np.asarray(keys, dtype=np.int64)
    owner_arr = np.asarray(owner, dtype=np.int8)
    order = np.argsort(keys_arr, kind="stable")
    keys_arr, owner_arr = keys_arr[order], owner_arr[order]
    work_arr = np.array([work_of.get(int(k), 0) for k in keys_arr], dtype=np.int64)
    total = float(site_work.sum()) or 1.0
    achieved = {s: float(site_work[i] / total) for i, s in enumerate(sites)}
    part = Partition(
        policy=policy,
        sites=sites,
        keys=keys_arr,
        owner=owner_arr,
        work=work_arr,
        shares=achieved,
        targets=dict(zip(sites, targets, strict=True)),
        tracts_by_site={s: sorted(v) for s, v in tracts_by_site.items()},
    )
    dev = part.max_deviation
    if dev > SHARE_TOLERANCE:
        worst = max(sites, key=lambda s: abs(achieved[s] / part.targets[s] - 1.0))
        unit = "tracts" if policy == "dec-bands" else "patch columns"
        heaviest = float(unit_work.max() / total) if unit_work.size else 0.0
        note = (
            f"work shares off by up to {dev:.1%} (site {worst}: {achieved[worst]:.1%} against "
            f"{part.targets[worst]:.1%}): the work sits in {len(units)} {unit} and the heaviest "
            f"holds {heaviest:.1%} of it, so cuts between whole {unit} cannot do better"
        )
        if policy == "dec-bands":
            note += "; partition policy 'patch-bands' cuts inside tracts"
        part = Partition(**{**part.__dict__, "note": note})
    return part
