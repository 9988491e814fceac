"""Which PVIs must cross between sites, and what each visit's home costs (DESIGN.md section 4).

A PVI (visit, detector) is needed for coadds by every site owning a patch its region overlaps.
Homed at site ``h``, it must travel to every other needing site. Only this cross-site overlap
traffic is counted; publishing every PVI to the hub happens anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .overlaps import OverlapTable
from .partition import Partition

__all__ = [
    "NOMINAL_BYTES",
    "DetectorNeeds",
    "detector_needs",
    "visit_costs",
    "link_bytes",
    "transfer_rows",
]

#: Nominal sizes in bytes (RTN-109): PVI per detector, warp, coadd per patch and band, raw visit.
NOMINAL_BYTES = {
    "pvi": 107_000_000,
    "warp": 81_000_000,
    "coadd": 80_000_000,
    "raw_visit": 4_000_000_000,
}


@dataclass(frozen=True)
class DetectorNeeds:
    """Per (visit, detector) with any overlap: a bitmask of the sites that need its PVI.

    ``overlaps`` counts the detector-patch overlaps per site (n, n_sites).
    """

    visit: np.ndarray
    detector: np.ndarray
    mask: np.ndarray
    overlaps: np.ndarray


def detector_needs(table: OverlapTable, partition: Partition) -> DetectorNeeds:
    """Group overlap rows by (visit, detector) and record which sites need each PVI.

    Parameters
    ----------
    table : `OverlapTable`
        Overlap rows sorted by (visit, detector, ...).
    partition : `Partition`
        Patch ownership.

    Returns
    -------
    needs : `DetectorNeeds`
    """
    n_sites = len(partition.sites)
    if len(table) == 0:
        e = np.empty(0, np.int64)
        return DetectorNeeds(e, e.astype(np.int16), e.astype(np.uint8), np.zeros((0, n_sites)))
    owner = partition.owner_of(table.tract, table.patch).astype(np.int64)
    key = table.visit * 1024 + table.detector.astype(np.int64)
    # Rows are sorted by (visit, detector), so group starts are where the key changes.
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    group = np.cumsum(np.concatenate([[False], key[1:] != key[:-1]]))
    counts = np.zeros((starts.size, n_sites), dtype=np.int64)
    np.add.at(counts, (group, owner), 1)
    bits = (1 << np.arange(n_sites, dtype=np.int64))[None, :]
    mask = ((counts > 0) * bits).sum(axis=1).astype(np.uint8 if n_sites <= 8 else np.int64)
    return DetectorNeeds(
        visit=table.visit[starts],
        detector=table.detector[starts],
        mask=mask,
        overlaps=counts,
    )


def visit_costs(needs: DetectorNeeds, n_sites: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PVIs each visit would send away if homed at each site.

    Returns
    -------
    visits : numpy.ndarray
        Unique visit ids with at least one overlap.
    cost : numpy.ndarray
        (n_visits, n_sites) number of PVI transfers.
    overlaps : numpy.ndarray
        (n_visits, n_sites) detector-patch overlaps in each site's patches.
    """
    visits, inv = np.unique(needs.visit, return_inverse=True)
    bits = ((needs.mask[:, None].astype(np.int64) >> np.arange(n_sites)) & 1).astype(np.int64)
    n_need = bits.sum(axis=1)
    # Homed at s, the PVI travels to every needing site but s.
    per_det = n_need[:, None] - bits
    cost = np.zeros((visits.size, n_sites), dtype=np.int64)
    np.add.at(cost, inv, per_det)
    ov = np.zeros((visits.size, n_sites), dtype=np.int64)
    np.add.at(ov, inv, needs.overlaps)
    return visits, cost, ov


def transfer_rows(
    needs: DetectorNeeds, home_of_visit: dict[int, int] | np.ndarray, visits_sorted: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Expand needs into transfer rows (visit, detector, src_site, dst_site).

    ``home_of_visit`` is an array aligned with ``visits_sorted`` (sorted unique visit ids).
    """
    home_arr = np.asarray(home_of_visit)
    pos = np.searchsorted(visits_sorted, needs.visit)
    home = home_arr[pos].astype(np.int64)
    # Sites are bits of the masks: the highest set bit bounds the sites to look at.
    n_sites = int(needs.mask.max(initial=0)).bit_length()
    vs, ds, src, dst = [], [], [], []
    for s in range(n_sites):
        need_s = ((needs.mask.astype(np.int64) >> s) & 1).astype(bool) & (home != s)
        if need_s.any():
            vs.append(needs.visit[need_s])
            ds.append(needs.detector[need_s])
            src.append(home[need_s].astype(np.int8))
            dst.append(np.full(int(need_s.sum()), s, dtype=np.int8))
    if not vs:
        e = np.empty(0, np.int64)
        return e, e.astype(np.int16), e.astype(np.int8), e.astype(np.int8)
    v = np.concatenate(vs)
    d = np.concatenate(ds)
    a = np.concatenate(src)
    b = np.concatenate(dst)
    order = np.lexsort((b, d, v))
    return v[order], d[order], a[order], b[order]


def link_bytes(sites: Sequence[str], links: np.ndarray) -> dict[str, int]:
    """PVIs per (source, destination) site as nominal bytes, ``"A->B"`` -> bytes (non-zero)."""
    pvi = NOMINAL_BYTES["pvi"]
    return {
        f"{a}->{b}": int(links[i, j]) * pvi
        for i, a in enumerate(sites)
        for j, b in enumerate(sites)
        if i != j and links[i, j]
    }
