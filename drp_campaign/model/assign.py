"""Assign every whole visit to one site (DESIGN.md section 4).

Once the patch partition is fixed, a visit's cost at a site is independent of every other visit:
the PVIs of its detectors that overlap patches owned by other sites must travel there. So the
cheapest plan ignoring shares is each visit at its cheapest site (the *lower bound*), and the
planner's job is to hold the step-1 work shares (visits per site) within tolerance while moving as
few visits as possible away from their cheapest site. We do that greedily by regret (the visits
that lose least move first), then improve with pairwise swaps that keep the counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Assignment", "assign_visits", "round_robin"]


@dataclass(frozen=True)
class Assignment:
    """Home site index per visit and the bytes the choice implies.

    Attributes
    ----------
    home : numpy.ndarray
        Site index (int8) per visit, aligned with the input visits.
    planned, lower_bound, naive_round_robin : int
        Cost totals (same unit as the cost matrix).
    counts : numpy.ndarray
        Visits per site.
    """

    home: np.ndarray
    planned: int
    lower_bound: int
    naive_round_robin: int
    counts: np.ndarray


def round_robin(visit: np.ndarray, n_sites: int) -> np.ndarray:
    """Deal visits to sites in turn by visit id (the naive baseline)."""
    order = np.argsort(visit, kind="stable")
    home = np.empty(visit.size, dtype=np.int8)
    home[order] = (np.arange(visit.size) % n_sites).astype(np.int8)
    return home


def _bounds(targets: Sequence[float], n: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([math.ceil(t * (1.0 - tol) * n - 1e-9) for t in targets], dtype=np.int64)
    hi = np.array([math.floor(t * (1.0 + tol) * n + 1e-9) for t in targets], dtype=np.int64)
    hi = np.maximum(hi, lo)
    # Small campaigns: integer rounding can make the band infeasible; widen it just enough.
    while hi.sum() < n:
        hi[int(np.argmax(np.asarray(targets) * n - hi))] += 1
    while lo.sum() > n:
        lo[int(np.argmax(lo - np.asarray(targets) * n))] -= 1
    return lo, hi


def _cheapest(cost: np.ndarray, tie: np.ndarray) -> np.ndarray:
    # Lowest cost; among equal costs the site with the most overlaps, then spec order.
    n_sites = cost.shape[1]
    score = cost.astype(np.float64) * (n_sites + 1) * (tie.max(initial=0) + 1)
    score -= tie * (n_sites + 1)
    score += np.arange(n_sites)[None, :] * 1e-3
    return np.argmin(score, axis=1).astype(np.int8)


def assign_visits(
    visit: np.ndarray,
    cost: np.ndarray,
    overlaps: np.ndarray,
    targets: Sequence[float],
    tolerance: float = 0.05,
) -> Assignment:
    """Assign each visit to one site, holding visit shares within ``tolerance`` of ``targets``.

    Parameters
    ----------
    visit : numpy.ndarray
        Visit ids (n,).
    cost : numpy.ndarray
        (n, n_sites) integer cost of homing each visit at each site (PVIs or bytes to move).
    overlaps : numpy.ndarray
        (n, n_sites) detector-patch overlaps of each visit in each site's patches; breaks ties.
    targets : sequence of float
        Share per site (sums to 1).
    tolerance : float
        Relative tolerance on each share.

    Returns
    -------
    assignment : `Assignment`
        Deterministic: the same inputs in any order give the same home per visit id.
    """
    n, n_sites = cost.shape
    order = np.argsort(visit, kind="stable")  # work in visit-id order: permutation-invariant
    c = np.asarray(cost, dtype=np.int64)[order]
    o = np.asarray(overlaps, dtype=np.int64)[order]
    cheapest = _cheapest(c, o)
    home = cheapest.copy()
    lower_bound = int(c[np.arange(n), cheapest].sum())
    lo, hi = _bounds(targets, n, tolerance)
    counts = np.bincount(home, minlength=n_sites).astype(np.int64)
    rank = np.arange(n)  # visit-id rank: the deterministic tie-break

    for _ in range(4 * n_sites + 4):
        over = np.flatnonzero(counts > hi)
        under = np.flatnonzero(counts < lo)
        if over.size == 0 and under.size == 0:
            break
        if over.size:
            s = int(over[0])
            need = int(counts[s] - hi[s])
            src = np.flatnonzero(home == s)
            dests = [t for t in range(n_sites) if t != s and counts[t] < hi[t]]
            pairs = [(c[v, t] - c[v, s], rank[v], v, t) for t in dests for v in src]
        else:
            s = int(under[0])
            need = int(lo[s] - counts[s])
            sources = [u for u in range(n_sites) if u != s and counts[u] > lo[u]]
            pairs = []
            for u in sources:
                src = np.flatnonzero(home == u)
                pairs.extend((c[v, s] - c[v, u], rank[v], v, s) for v in src)
        pairs.sort()
        moved: set[int] = set()
        for _delta, _r, v, t in pairs:
            if len(moved) == need:
                break
            u = int(home[v])
            if v in moved or counts[t] >= hi[t] or counts[u] <= lo[u]:
                continue
            home[v] = t
            counts[u] -= 1
            counts[t] += 1
            moved.add(int(v))
    home = _improve_by_swaps(home, c, n_sites)
    planned = int(c[np.arange(n), home].sum())
    rr = round_robin(visit[order], n_sites)
    naive = int(c[np.arange(n), rr].sum())
    out = np.empty(n, dtype=np.int8)
    out[order] = home
    return Assignment(
        home=out,
        planned=planned,
        lower_bound=lower_bound,
        naive_round_robin=naive,
        counts=np.bincount(home, minlength=n_sites),
    )


def _improve_by_swaps(home: np.ndarray, c: np.ndarray, n_sites: int) -> np.ndarray:
    """Swap visits pairwise between two sites while that lowers the total; counts stay put."""
    home = home.copy()
    idx = np.arange(home.size)
    for s in range(n_sites):
        for t in range(s + 1, n_sites):
            at_s = idx[home == s]
            at_t = idx[home == t]
            gain_st = c[at_s, s] - c[at_s, t]  # saved by moving an s-visit to t
            gain_ts = c[at_t, t] - c[at_t, s]
            a = at_s[np.lexsort((at_s, -gain_st))]
            b = at_t[np.lexsort((at_t, -gain_ts))]
            ga = np.sort(gain_st)[::-1]
            gb = np.sort(gain_ts)[::-1]
            k = int(np.sum((ga[: min(a.size, b.size)] + gb[: min(a.size, b.size)]) > 0))
            if k:
                home[a[:k]] = t
                home[b[:k]] = s
    return home
