"""Detector-patch overlaps, vectorised.

Why this is exact and fast: a detector region is the spherical polygon of its four corners (the
focal plane model is gnomonic about the boresight, so its edges are great circles), and a patch's
outer region is the spherical polygon of its pixel box's corners through the tract's TAN WCS. A
gnomonic (TAN) projection maps great circles to straight lines, so in a tract's pixel frame the
detector is a planar convex quadrilateral and the patch an axis-aligned rectangle: two convex
polygons in the plane, tested with the separating-axis theorem in numpy. This gives the same answer
as ``lsst.sphgeom`` ``relate`` on the same polygons (up to tangency, a set of measure zero), at
numpy speed instead of one Python call per pair; :func:`brute_force_overlaps` is that sphgeom
reference and the benchmark's baseline.

The same holds for any convex spherical polygon, which is what a registry stores for each
``visit_detector_region``: :func:`compute_polygon_overlaps` takes such polygons with any number of
vertices (padded to the page's largest count by repeating the last vertex, which adds only
zero-length edges that separate nothing), and :func:`brute_force_polygon_overlaps` is its sphgeom
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from lsst.sphgeom import DISJOINT, ConvexPolygon, LonLat, UnitVector3d

from .focalplane import FocalPlane
from .sky import RingsSkyMap, TractInfo

__all__ = [
    "OverlapTable",
    "brute_force_overlaps",
    "brute_force_polygon_overlaps",
    "compute_overlaps",
    "compute_polygon_overlaps",
    "patch_key",
    "split_patch_key",
]

#: Patch keys pack (tract, patch) into one int64 so that lookups are a single searchsorted.
_PATCH_KEY_SHIFT = 1024


def patch_key(tract: npt.ArrayLike, patch: npt.ArrayLike) -> np.ndarray:
    """Pack (tract, patch) pairs into int64 keys that sort like (tract, patch).

    Parameters
    ----------
    tract, patch : array_like
        Tract ids and sequential patch indices.

    Returns
    -------
    keys : `numpy.ndarray`
        ``tract * 1024 + patch`` as int64.
    """
    return np.asarray(tract, dtype=np.int64) * _PATCH_KEY_SHIFT + np.asarray(patch, dtype=np.int64)


def split_patch_key(keys: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`patch_key`.

    Parameters
    ----------
    keys : array_like
        Keys made by :func:`patch_key`.

    Returns
    -------
    tract, patch : `numpy.ndarray`
        Tract ids (int32) and patch indices (int16).
    """
    k = np.asarray(keys, dtype=np.int64)
    return (k // _PATCH_KEY_SHIFT).astype(np.int32), (k % _PATCH_KEY_SHIFT).astype(np.int16)


@dataclass(frozen=True)
class OverlapTable:
    """Columns of (visit, detector, tract, patch) overlap rows, sorted and unique."""

    visit: np.ndarray
    detector: np.ndarray
    tract: np.ndarray
    patch: np.ndarray

    def __len__(self) -> int:
        return int(self.visit.size)

    @classmethod
    def empty(cls) -> OverlapTable:
        """Return a table with no rows and the canonical dtypes."""
        return cls(
            np.empty(0, np.int64),
            np.empty(0, np.int16),
            np.empty(0, np.int32),
            np.empty(0, np.int16),
        )


@dataclass(frozen=True)
class _PatchBoxes:
    """Floating outer boxes of every patch of one tract, as arrays indexed by sequential patch."""

    x0: np.ndarray
    x1: np.ndarray
    y0: np.ndarray
    y1: np.ndarray
    nx: int
    ny: int
    inner: int
    border: int


def _patch_boxes(skymap: RingsSkyMap, tract_id: int) -> _PatchBoxes:
    tract = skymap[tract_id]
    # Every tract of a rings sky map has the same pixel geometry, so the boxes are computed once
    # per distinct geometry rather than once per tract.
    return _patch_boxes_for(
        skymap,
        tract_id,
        (
            tract.num_patches,
            tract.width,
            tract.height,
            tract.patch_inner,
            tract.patch_border,
            tract.clip_outer,
        ),
    )


_BOXES: dict[tuple[object, ...], _PatchBoxes] = {}


def _patch_boxes_for(
    skymap: RingsSkyMap, tract_id: int, geometry: tuple[object, ...]
) -> _PatchBoxes:
    boxes_cached = _BOXES.get(geometry)
    if boxes_cached is not None:
        return boxes_cached
    tract = skymap[tract_id]
    nx, ny = tract.num_patches
    boxes = np.array([tract.patch_outer_bbox(i) for i in range(nx * ny)], dtype=np.float64)
    # Integer boxes are inclusive pixel ranges; pixel centres sit on integers, so the covered
    # floating area extends half a pixel beyond (DESIGN.md section 3).
    result = _PatchBoxes(
        x0=boxes[:, 0] - 0.5,
        y0=boxes[:, 1] - 0.5,
        x1=boxes[:, 2] + 0.5,
        y1=boxes[:, 3] + 0.5,
        nx=nx,
        ny=ny,
        inner=tract.patch_inner,
        border=tract.patch_border,
    )
    _BOXES[geometry] = result
    return result


def _quad_rect_overlap(
    qx: np.ndarray,
    qy: np.ndarray,
    rx0: np.ndarray,
    rx1: np.ndarray,
    ry0: np.ndarray,
    ry1: np.ndarray,
) -> np.ndarray:
    """Separating-axis test of convex polygons against axis-aligned rectangles.

    ``qx``/``qy`` have shape (n, k) (vertices in order, either orientation; quadrilaterals from
    the focal plane, any k from a registry); the rectangles have shape (n,). Returns a boolean
    array: True where the two overlap.
    """
    # Axes of the rectangle: the quadrilateral's bounding box must meet it.
    hit = (qx.min(axis=1) <= rx1) & (qx.max(axis=1) >= rx0)
    hit &= (qy.min(axis=1) <= ry1) & (qy.max(axis=1) >= ry0)
    # Axes normal to the quadrilateral's edges: separated if the whole rectangle lies strictly
    # outside one edge. f(c) = e x (c - p) is linear in the corner c, so its largest value over
    # the rectangle is at the corner picked by the signs of the edge vector: one evaluation per
    # edge instead of four. Orientation comes from the signed area, so CW input works too.
    succ = _NEXT if qx.shape[1] == 4 else (np.arange(qx.shape[1]) + 1) % qx.shape[1]
    nx_ = qx[:, succ]
    ny_ = qy[:, succ]
    ex = nx_ - qx
    ey = ny_ - qy
    sign = np.where((qx * ny_ - nx_ * qy).sum(axis=1) >= 0.0, 1.0, -1.0)[:, None]
    a = sign * ex
    b = sign * ey
    cy = np.where(a > 0.0, ry1[:, None], ry0[:, None])
    cx = np.where(b > 0.0, rx0[:, None], rx1[:, None])
    fmax = a * (cy - qy) - b * (cx - qx)
    return hit & ~(fmax < 0.0).any(axis=1)


#: Index of each quadrilateral vertex's successor.
_NEXT = np.array([1, 2, 3, 0])


def _tract_overlaps(
    tract: TractInfo,
    boxes: _PatchBoxes,
    corners: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Overlaps of detector polygons (m, k, 2 [ra, dec]) with one tract's outer patches.

    Returns (row index into ``corners``, sequential patch) for every overlapping pair.
    """
    k = corners.shape[1]
    px, py = tract.sky_to_pixel(corners[..., 0], corners[..., 1])
    px = np.asarray(px, dtype=np.float64).reshape(-1, k)
    py = np.asarray(py, dtype=np.float64).reshape(-1, k)
    xmin, xmax = px.min(axis=1), px.max(axis=1)
    ymin, ymax = py.min(axis=1), py.max(axis=1)
    inner, border = float(boxes.inner), float(boxes.border)
    # Candidate patch index ranges from the bounding box. The outer x-range of column i is
    # [i*inner - border - 0.5, (i+1)*inner + border - 0.5] (a superset when the legacy builder
    # clips at the tract edge), so these ranges never miss a true overlap.
    ix0 = np.maximum(np.ceil((xmin - border + 0.5) / inner - 1.0), 0).astype(np.int64)
    ix1 = np.minimum(np.floor((xmax + border + 0.5) / inner), boxes.nx - 1).astype(np.int64)
    iy0 = np.maximum(np.ceil((ymin - border + 0.5) / inner - 1.0), 0).astype(np.int64)
    iy1 = np.minimum(np.floor((ymax + border + 0.5) / inner), boxes.ny - 1).astype(np.int64)
    wx = np.maximum(ix1 - ix0 + 1, 0)
    wy = np.maximum(iy1 - iy0 + 1, 0)
    counts = wx * wy
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows = np.repeat(np.arange(px.shape[0]), counts)
    # Offset of each pair inside its row's block, then unravel into (dx, dy).
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    within = np.arange(total) - starts
    wxr = wx[rows]
    ix = ix0[rows] + within % wxr
    iy = iy0[rows] + within // wxr
    seq = iy * boxes.nx + ix
    ok = _quad_rect_overlap(
        px[rows], py[rows], boxes.x0[seq], boxes.x1[seq], boxes.y0[seq], boxes.y1[seq]
    )
    return rows[ok], seq[ok]


#: One tract's overlaps: visit and detector of each row, the tract, and each row's patch.
_TractRows = tuple[np.ndarray, np.ndarray, int, np.ndarray]


def _sorted_table(parts: list[_TractRows]) -> OverlapTable:
    """The tracts' rows as one `OverlapTable`, sorted by (visit, detector, tract, patch)."""
    parts = [part for part in parts if part[0].size]
    if not parts:
        return OverlapTable.empty()
    v = np.concatenate([part[0] for part in parts])
    d = np.concatenate([part[1] for part in parts])
    t = np.concatenate([np.full(part[0].size, part[2], dtype=np.int32) for part in parts])
    p = np.concatenate([part[3].astype(np.int16) for part in parts])
    order = np.lexsort((p, t, d, v))
    return OverlapTable(v[order], d[order], t[order], p[order])


def compute_overlaps(
    skymap: RingsSkyMap,
    plane: FocalPlane,
    visit: npt.ArrayLike,
    ra: npt.ArrayLike,
    dec: npt.ArrayLike,
    rotation: npt.ArrayLike,
) -> OverlapTable:
    """Every (visit, detector, tract, patch) whose detector region meets the patch outer region.

    Parameters
    ----------
    skymap : `RingsSkyMap`
        The sky map.
    plane : `FocalPlane`
        The instrument's focal plane.
    visit, ra, dec, rotation : array_like
        One entry per visit: id, boresight (degrees) and rotation (degrees).

    Returns
    -------
    table : `OverlapTable`
        Rows sorted by (visit, detector, tract, patch), no duplicates.
    """
    visit = np.asarray(visit, dtype=np.int64)
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    rotation = np.asarray(rotation, dtype=np.float64)
    if visit.size == 0:
        return OverlapTable.empty()
    corners = plane.corners_sky_many(ra, dec, rotation)  # (V, D, 4, 2)
    n_det = corners.shape[1]
    det_ids = np.array([d.id for d in plane.detectors], dtype=np.int16)
    # Group visits by candidate tract so that each tract projects all its visits at once.
    by_tract: dict[int, list[int]] = {}
    radius = plane.max_radius_deg
    for i in range(visit.size):
        for t in skymap.tracts_near(float(ra[i]), float(dec[i]), radius):
            by_tract.setdefault(t, []).append(i)
    parts: list[_TractRows] = []
    for t in sorted(by_tract):
        idx = np.asarray(by_tract[t], dtype=np.int64)
        rows, seq = _tract_overlaps(
            skymap[t], _patch_boxes(skymap, t), corners[idx].reshape(-1, 4, 2)
        )
        parts.append((visit[idx[rows // n_det]], det_ids[rows % n_det], t, seq))
    return _sorted_table(parts)


def brute_force_overlaps(
    skymap: RingsSkyMap,
    plane: FocalPlane,
    visit: npt.ArrayLike,
    ra: npt.ArrayLike,
    dec: npt.ArrayLike,
    rotation: npt.ArrayLike,
) -> OverlapTable:
    """Reference implementation: every detector polygon against every patch with ``sphgeom``.

    Each detector's ConvexPolygon is related to the outer patch polygon of every patch of every
    candidate tract of its visit, with no index. Slow by design: it is the correctness oracle for
    :func:`compute_overlaps` and the baseline of ``benchmarks/plan_scale.py``.
    """
    visit = np.asarray(visit, dtype=np.int64)
    rows: list[tuple[int, int, int, int]] = []
    corners = plane.corners_sky_many(
        np.asarray(ra, np.float64), np.asarray(dec, np.float64), np.asarray(rotation, np.float64)
    )
    patch_polys: dict[int, list[ConvexPolygon]] = {}
    for i, v in enumerate(visit):
        tracts = skymap.tracts_near(
            float(np.asarray(ra)[i]), float(np.asarray(dec)[i]), plane.max_radius_deg
        )
        for j, det in enumerate(plane.detectors):
            poly = ConvexPolygon(
                [UnitVector3d(LonLat.fromDegrees(float(a), float(b))) for a, b in corners[i, j]]
            )
            for t in tracts:
                if t not in patch_polys:
                    info = skymap[t]
                    n = info.num_patches[0] * info.num_patches[1]
                    patch_polys[t] = [info.patch_outer_polygon(k) for k in range(n)]
                for k, pp in enumerate(patch_polys[t]):
                    if not (poly.relate(pp) & DISJOINT):
                        rows.append((int(v), det.id, t, k))
    if not rows:
        return OverlapTable.empty()
    arr = np.array(sorted(set(rows)), dtype=np.int64)
    return OverlapTable(
        arr[:, 0],
        arr[:, 1].astype(np.int16),
        arr[:, 2].astype(np.int32),
        arr[:, 3].astype(np.int16),
    )


def _padded_vertices(offsets: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Polygons as (n, k, 2) [ra, dec], k the largest vertex count, short ones padded.

    Padding repeats each polygon's last vertex: the extra edges have zero length, so they add no
    separating axis and leave the bounding box unchanged.
    """
    counts = np.diff(offsets)
    k = int(counts.max())
    take = offsets[:-1, None] + np.minimum(np.arange(k)[None, :], counts[:, None] - 1)
    return np.stack([ra[take], dec[take]], axis=-1)


def _angular_distance_deg(
    ra0: np.ndarray, dec0: np.ndarray, ra1: np.ndarray, dec1: np.ndarray
) -> np.ndarray:
    """Great-circle distance in degrees (haversine: accurate at small separations)."""
    r0, d0, r1, d1 = (np.radians(a) for a in (ra0, dec0, ra1, dec1))
    h = np.sin((d1 - d0) / 2.0) ** 2 + np.cos(d0) * np.cos(d1) * np.sin((r1 - r0) / 2.0) ** 2
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _region_reach(
    region_visit: np.ndarray,
    offsets: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    visit: np.ndarray,
    centre_ra: np.ndarray,
    centre_dec: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """For each region: the index of its visit, and each visit's reach (degrees).

    The reach is the largest distance from the visit's centre to a vertex of its regions: a
    circle of that radius contains every region of the visit (each is the convex hull of its
    vertices, and a cap smaller than a hemisphere is convex), so the tracts near that circle are
    the only candidates.
    """
    order = np.argsort(visit, kind="stable")
    found = np.searchsorted(visit, region_visit, sorter=order)
    pos = order[np.minimum(found, visit.size - 1)]
    if not np.array_equal(visit[pos], region_visit):
        raise ValueError("a detector region belongs to a visit without a centre")
    vertex_visit = np.repeat(pos, np.diff(offsets))
    dist = _angular_distance_deg(centre_ra[vertex_visit], centre_dec[vertex_visit], ra, dec)
    reach = np.zeros(visit.size, dtype=np.float64)
    np.maximum.at(reach, vertex_visit, dist)
    return pos, reach


def compute_polygon_overlaps(
    skymap: RingsSkyMap,
    region_visit: npt.ArrayLike,
    region_detector: npt.ArrayLike,
    offsets: npt.ArrayLike,
    ra: npt.ArrayLike,
    dec: npt.ArrayLike,
    visit: npt.ArrayLike,
    centre_ra: npt.ArrayLike,
    centre_dec: npt.ArrayLike,
) -> OverlapTable:
    """Every (visit, detector, tract, patch) whose stored convex region meets a patch outer region.

    Parameters
    ----------
    skymap : `RingsSkyMap`
        The sky map.
    region_visit, region_detector : array_like
        Visit and detector id of each region.
    offsets : array_like
        Region ``i`` has the vertices ``offsets[i]:offsets[i+1]`` (at least 3; a convex
        spherical polygon with great-circle edges, as `lsst.sphgeom.ConvexPolygon` stores it).
    ra, dec : array_like
        Vertices, degrees.
    visit, centre_ra, centre_dec : array_like
        One entry per visit of the regions: a point near the visit's regions (its boresight or
        the centre of its region's bounding circle), degrees. Only used to find candidate tracts.

    Returns
    -------
    table : `OverlapTable`
        Rows sorted by (visit, detector, tract, patch), no duplicates.
    """
    rv = np.asarray(region_visit, dtype=np.int64)
    rd = np.asarray(region_detector, dtype=np.int16)
    off = np.asarray(offsets, dtype=np.int64)
    ra_v = np.asarray(ra, dtype=np.float64)
    dec_v = np.asarray(dec, dtype=np.float64)
    vis = np.asarray(visit, dtype=np.int64)
    c_ra = np.asarray(centre_ra, dtype=np.float64)
    c_dec = np.asarray(centre_dec, dtype=np.float64)
    if rv.size == 0:
        return OverlapTable.empty()
    pos, reach = _region_reach(rv, off, ra_v, dec_v, vis, c_ra, c_dec)
    corners = _padded_vertices(off, ra_v, dec_v)  # (R, K, 2)
    by_tract: dict[int, list[int]] = {}
    for i in np.unique(pos):
        for t in skymap.tracts_near(float(c_ra[i]), float(c_dec[i]), float(reach[i])):
            by_tract.setdefault(t, []).append(int(i))
    order = np.argsort(pos, kind="stable")
    first = np.searchsorted(pos[order], np.arange(vis.size), side="left")
    last = np.searchsorted(pos[order], np.arange(vis.size), side="right")
    parts: list[_TractRows] = []
    for t in sorted(by_tract):
        near = np.asarray(by_tract[t], dtype=np.int64)
        idx = np.concatenate([order[first[i] : last[i]] for i in near])
        rows, seq = _tract_overlaps(skymap[t], _patch_boxes(skymap, t), corners[idx])
        parts.append((rv[idx[rows]], rd[idx[rows]], t, seq))
    return _sorted_table(parts)


def brute_force_polygon_overlaps(
    skymap: RingsSkyMap,
    region_visit: npt.ArrayLike,
    region_detector: npt.ArrayLike,
    offsets: npt.ArrayLike,
    ra: npt.ArrayLike,
    dec: npt.ArrayLike,
) -> OverlapTable:
    """Reference for :func:`compute_polygon_overlaps`: each region against every patch, sphgeom.

    Candidate tracts are those near each region's own bounding circle, found independently of the
    visit centres :func:`compute_polygon_overlaps` uses; each region's ConvexPolygon is related to
    the outer polygon of every patch of those tracts.
    """
    rv = np.asarray(region_visit, dtype=np.int64)
    rd = np.asarray(region_detector, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64)
    ra_v = np.asarray(ra, dtype=np.float64)
    dec_v = np.asarray(dec, dtype=np.float64)
    rows: list[tuple[int, int, int, int]] = []
    patch_polys: dict[int, list[ConvexPolygon]] = {}
    for i in range(rv.size):
        poly = ConvexPolygon(
            [
                UnitVector3d(LonLat.fromDegrees(float(a), float(b)))
                for a, b in zip(ra_v[off[i] : off[i + 1]], dec_v[off[i] : off[i + 1]], strict=True)
            ]
        )
        circle = poly.getBoundingCircle()
        centre = LonLat(circle.getCenter())
        radius = circle.getOpeningAngle().asDegrees()
        near = skymap.tracts_near(centre.getLon().asDegrees(), centre.getLat().asDegrees(), radius)
        for t in near:
            if t not in patch_polys:
                info = skymap[t]
                n = info.num_patches[0] * info.num_patches[1]
                patch_polys[t] = [info.patch_outer_polygon(k) for k in range(n)]
            for k, pp in enumerate(patch_polys[t]):
                if not (poly.relate(pp) & DISJOINT):
                    rows.append((int(rv[i]), int(rd[i]), t, k))
    if not rows:
        return OverlapTable.empty()
    arr = np.array(sorted(set(rows)), dtype=np.int64)
    return OverlapTable(
        arr[:, 0],
        arr[:, 1].astype(np.int16),
        arr[:, 2].astype(np.int32),
        arr[:, 3].astype(np.int16),
    )
