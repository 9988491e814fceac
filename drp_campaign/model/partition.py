"""Partition the sky's patches among data facilities.

Policies (DESIGN.md section 4):

``dec-bands`` (default)
    Whole tracts. Tracts are walked in declination bands: ring by ring from south to north, in a
    serpentine (boustrophedon) order, east-bound in even rings and west-bound in odd ones, so that
    the walk turns into the next ring at the end where it left the last one. The walk is cut into
    one run per site, in spec order, where the cumulative work is closest to the cumulative
    shares. Each site therefore holds one band of rings plus partial rings at its two ends, kept
    fixed for the survey so coadds keep all years at one DF (RTN-100). The region must be
    contiguous (its tracts touch one another), and consecutive tracts of the walk need not touch:
    where a ring reaches further in RA than the ring before it, or a ring's work has a gap, a run
    ending just past the turn holds a tract cut off from the rest. So when the plain cut leaves a
    site's run in pieces, the cut is the contiguous one whose shares deviate least.
``patch-bands``
    The same walk, cut between whole-height columns of patches instead of whole tracts, for
    footprints with too few tracts to hold the shares with whole tracts (a test field of two tracts
    shared by three sites). Tract-level outputs of a split tract then need its patches gathered.

Work is measured in detector-patch overlaps (the coadd inputs), not area.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from lsst.sphgeom import DISJOINT

from .overlaps import patch_key, split_patch_key
from .sky import RingsSkyMap

__all__ = ["POLICIES", "Partition", "contiguous", "partition_patches", "touching_tracts", "walk"]

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


def walk(skymap: RingsSkyMap, tracts: Sequence[int]) -> list[int]:
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


def touching_tracts(skymap: RingsSkyMap, tracts: Sequence[int]) -> dict[int, list[int]]:
    """Neighbours of each tract among ``tracts``: those whose outer polygons are not disjoint.

    Candidates are the tracts whose bounding circles meet; sphgeom then relates their polygons.
    """
    ids = list(tracts)
    polys = [skymap[t].outer_polygon() for t in ids]
    circles = [p.getBoundingCircle() for p in polys]
    ctr = np.array([[c.getCenter().x(), c.getCenter().y(), c.getCenter().z()] for c in circles])
    rad = np.array([c.getOpeningAngle().asRadians() for c in circles])
    out: dict[int, list[int]] = {t: [] for t in ids}
    if len(ids) < 2:
        return out
    # Sorted by z (declination), a tract only meets tracts within its reach in declination.
    dec = np.arcsin(np.clip(ctr[:, 2], -1.0, 1.0))
    order = np.argsort(dec, kind="stable")
    dec_sorted = dec[order]
    reach_max = float(rad.max())
    for i in range(len(ids)):
        reach = rad[i] + reach_max + 1e-9
        lo = int(np.searchsorted(dec_sorted, dec[i] - reach, side="left"))
        hi = int(np.searchsorted(dec_sorted, dec[i] + reach, side="right"))
        js = order[lo:hi]
        js = js[js > i]
        if js.size == 0:
            continue
        ang = np.arccos(np.clip(ctr[js] @ ctr[i], -1.0, 1.0))
        for j in js[ang <= rad[i] + rad[js] + 1e-9].tolist():
            if not polys[i].relate(polys[j]) & DISJOINT:
                out[ids[i]].append(ids[j])
                out[ids[j]].append(ids[i])
    return out


class _Runs:
    """Which runs of the walk are contiguous: their tracts touch one another (one component).

    ``unit_tract`` is the tract of each walked unit; a tract's units are consecutive in the walk.
    """

    def __init__(self, unit_tract: Sequence[int], neighbours: Mapping[int, Sequence[int]]):
        self.unit_tract = list(unit_tract)
        self.neighbours = neighbours
        #: suffix[c]: the run from unit c to the end is contiguous.
        self.suffix = self._scan(range(len(self.unit_tract) - 1, -1, -1))[::-1] + [True]

    def _scan(self, units: Iterable[int]) -> list[bool]:
        """Contiguity after each unit added in the given order (union-find over tracts)."""
        parent: dict[int, int] = {}

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        components = 0
        flags: list[bool] = []
        for u in units:
            t = self.unit_tract[u]
            if t not in parent:
                parent[t] = t
                components += 1
                for b in self.neighbours.get(t, ()):
                    if b in parent:
                        ra, rb = find(t), find(b)
                        if ra != rb:
                            parent[ra] = rb
                            components -= 1
            flags.append(components == 1)
        return flags

    def prefix(self, start: int, stop: int) -> list[bool]:
        """flags[c - start]: the run [start, c) is contiguous, for c in [start, stop]."""
        return [True] + self._scan(range(start, stop))

    def contiguous(self, start: int, stop: int) -> bool:
        """The run [start, stop) is contiguous (an empty run is)."""
        return self.prefix(start, stop)[-1]


def contiguous(skymap: RingsSkyMap, tracts: Sequence[int]) -> bool:
    """Whether a set of tracts is one region: each touches the others through the set.

    The same test the partition applies to every site's tracts (a site holding part of a
    tract holds that tract for it).
    """
    ids = sorted({int(t) for t in tracts})
    return _Runs(ids, touching_tracts(skymap, ids)).contiguous(0, len(ids))


#: Candidate cuts per boundary the contiguous search starts from, and the union-find steps it may
#: spend widening them (windows x walk length x boundaries).
_SEARCH_FIRST, _SEARCH_STEPS = 16, 4_000_000


def _cut(work: np.ndarray, targets: Sequence[float], runs: _Runs | None = None) -> list[int]:
    """Cut a sequence of unit works into len(targets) runs with cumulative work near the targets.

    Each boundary is put where the cumulative work is closest to the cumulative target, never
    before the previous boundary, leaving every site at least one unit when there are enough.
    With ``runs``, every run must also be contiguous: when that plain cut leaves one that is not,
    the cut is the contiguous one of least largest share deviation (then least summed distance of
    the boundaries to their targets), searched among the cuts nearest each target and widened
    until no farther cut could do better or the search budget is spent. Falls back to the plain
    cut when none is found (the caller checks contiguity). Returns the run start indices (first
    is 0).
    """
    n = work.size
    cum = np.concatenate([[0.0], np.cumsum(work, dtype=np.float64)])
    total = cum[-1]
    goals = np.cumsum(np.asarray(targets, dtype=np.float64))[:-1] * total
    last = len(targets) - 1
    starts = [0]
    for k, goal in enumerate(goals):
        remaining_sites = last - k
        lo = starts[-1] + 1 if n - starts[-1] > remaining_sites else starts[-1]
        hi = max(lo, n - remaining_sites)
        cand = np.arange(lo, hi + 1)
        best = int(cand[np.argmin(np.abs(cum[cand] - goal))]) if cand.size else lo
        starts.append(best)
    if (
        runs is None
        or total <= 0
        or all(runs.contiguous(a, b) for a, b in zip(starts, [*starts[1:], n], strict=True))
    ):
        return starts
    m = _SEARCH_FIRST
    chosen: tuple[float, float, list[int]] | None = None
    while True:
        found, bound = _contiguous_cut(cum, targets, runs, m)
        chosen = found or chosen
        if chosen is not None and chosen[0] <= bound:
            break
        if m >= n + 1 or 4 * m * max(n, 1) * last > _SEARCH_STEPS:
            break
        m *= 4
    return chosen[2] if chosen is not None else starts


def _contiguous_cut(
    cum: np.ndarray, targets: Sequence[float], runs: _Runs, m: int
) -> tuple[tuple[float, float, list[int]] | None, float]:
    """The best contiguous cut with each boundary among the m cuts nearest its target.

    Returns ((largest share deviation, summed boundary distance, starts) or None, bound), where
    no cut with a boundary outside the windows has a largest share deviation below bound.
    """
    n = cum.size - 1
    total = float(cum[-1])
    want = np.asarray(targets, dtype=np.float64) * total
    goals = np.cumsum(want)[:-1]
    last = len(targets) - 1
    strict = n >= len(targets)  # every site gets a unit when there are enough
    windows: list[np.ndarray] = []
    bound = np.inf
    for k, goal in enumerate(goals):
        cand = np.arange(k + 1, n - last + k + 1) if strict else np.arange(n + 1)
        dist = np.abs(cum[cand] - goal)
        order = np.lexsort((cand, dist))
        if order.size > m:
            # A boundary off by d puts d of work on the k + 1 runs before it and the last - k
            # after it, so one of them is off by at least d / min(k + 1, last - k) of work.
            runs_each_side = min(k + 1, last - k)
            bound = min(bound, float(dist[order[m]]) / runs_each_side / float(want.max()))
        windows.append(np.sort(cand[order[:m]]))

    def deviation(k: int, a: int, c: int) -> float:
        return abs((float(cum[c]) - float(cum[a])) / float(want[k]) - 1.0) if want[k] else 0.0

    # Each layer maps a run start to (largest deviation, summed distance, previous start).
    layers: list[dict[int, tuple[float, float, int]]] = [{0: (0.0, 0.0, -1)}]
    for k, (goal, cand) in enumerate(zip(goals, windows, strict=True)):
        nxt: dict[int, tuple[float, float, int]] = {}
        top = int(cand.max())
        for a, (dev, dist, _) in sorted(layers[-1].items()):
            if top < a:
                continue
            ok = runs.prefix(a, top)
            for c in cand.tolist():
                if c < a or (strict and c == a) or not ok[c - a]:
                    continue
                key = (max(dev, deviation(k, a, c)), dist + abs(float(cum[c]) - float(goal)), a)
                if c not in nxt or key[:2] < nxt[c][:2]:
                    nxt[c] = key
        layers.append(nxt)
    ends = [
        (max(dev, deviation(last, c, n)), dist, c)
        for c, (dev, dist, _) in layers[-1].items()
        if runs.suffix[c]
    ]
    if not ends:
        return None, bound
    dev, dist, c = min(ends)
    starts = [c]
    for layer in reversed(layers[1:]):
        c = layer[c][2]
        starts.append(c)
    return (dev, dist, starts[::-1]), bound


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
    walked = walk(skymap, tracts)
    work_of = dict(zip(wk.tolist(), wc.tolist(), strict=True))
    # The units walked: whole tracts, or single patches in walking order.
    units: list[list[int]] = []
    unit_tract: list[int] = []
    ring_rank = {r: n for n, r in enumerate(sorted({skymap[t].ring for t in tracts}))}
    for t in walked:
        nx, ny = skymap[t].num_patches
        if policy == "dec-bands":
            units.append([int(k) for k in patch_key(np.full(nx * ny, t), np.arange(nx * ny))])
            unit_tract.append(t)
        else:
            eastward = ring_rank[skymap[t].ring] % 2 == 0
            for col in _column_walk(skymap, t, eastward):
                units.append([int(k) for k in patch_key(np.full(len(col), t), col)])
                unit_tract.append(t)
    unit_work = np.array([sum(work_of.get(k, 0) for k in u) for u in units], dtype=np.float64)
    # Consecutive tracts of the walk need not touch where it turns into the next ring (a ring
    # reaching further in RA than the one before it), so only cuts whose runs touch are taken.
    runs = _Runs(unit_tract, touching_tracts(skymap, tracts))
    starts = _cut(unit_work, targets, runs) + [len(units)]
    plain = _cut(unit_work, targets) + [len(units)]
    broken = [sites[s] for s in range(len(sites)) if not runs.contiguous(starts[s], starts[s + 1])]
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
        if starts != plain:
            note += f" while every site's {unit} touch one another"
        if policy == "dec-bands":
            note += "; partition policy 'patch-bands' cuts inside tracts"
        part = Partition(**{**part.__dict__, "note": note})
    if broken:
        note = (part.note + "; " if part.note else "") + (
            f"no cut of the walk keeps every region contiguous: the tracts of "
            f"{', '.join(broken)} do not all touch"
        )
        part = Partition(**{**part.__dict__, "note": note})
    return part
