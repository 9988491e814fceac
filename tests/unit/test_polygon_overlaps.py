"""Overlaps of arbitrary convex detector regions (as a registry stores them) with patches."""

from __future__ import annotations

import numpy as np
import pytest
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

from drp_campaign.model.focalplane import focal_plane
from drp_campaign.model.overlaps import (
    OverlapTable,
    brute_force_polygon_overlaps,
    compute_overlaps,
    compute_polygon_overlaps,
)
from drp_campaign.model.sky import RingsSkyMap
from drp_campaign.model.survey import make_survey

SKY = RingsSkyMap(120, "cells")


def _rows(table: OverlapTable) -> list[tuple[int, int, int, int]]:
    return list(
        zip(
            table.visit.tolist(),
            table.detector.tolist(),
            table.tract.tolist(),
            table.patch.tolist(),
            strict=True,
        )
    )


def _flatten(polys: list[ConvexPolygon]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, ra, dec) of sphgeom polygons, vertices as stored."""
    ra: list[float] = []
    dec: list[float] = []
    counts = []
    for poly in polys:
        vertices = [LonLat(v) for v in poly.getVertices()]
        counts.append(len(vertices))
        ra += [v.getLon().asDegrees() for v in vertices]
        dec += [v.getLat().asDegrees() for v in vertices]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, np.array(ra), np.array(dec)


def _fake_camera(
    rng: np.random.Generator, n_visits: int, centre: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, list[ConvexPolygon], np.ndarray, np.ndarray, np.ndarray]:
    """Visits of a camera we have no model of: 7 detectors, each a 4- to 7-gon of random shape."""
    visit = np.arange(n_visits, dtype=np.int64) * 3 + 11
    c_ra = centre[0] + rng.uniform(-2.0, 2.0, n_visits)
    c_dec = centre[1] + rng.uniform(-2.0, 2.0, n_visits)
    rv, rd, polys = [], [], []
    for v, ra0, dec0 in zip(visit, c_ra, c_dec, strict=True):
        for det in range(7):
            k = 4 + det % 4
            angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, k))
            radius = rng.uniform(0.05, 0.4)
            dra, ddec = rng.uniform(-0.8, 0.8, 2)
            points = [
                UnitVector3d(
                    LonLat.fromDegrees(
                        ra0 + (dra + radius * np.cos(a)) / np.cos(np.radians(dec0 + ddec)),
                        dec0 + ddec + radius * np.sin(a),
                    )
                )
                for a in angles
            ]
            rv.append(v)
            rd.append(det)
            polys.append(ConvexPolygon.convexHull(points))
    return visit, c_ra, polys, c_dec, np.array(rv), np.array(rd, dtype=np.int16)


@pytest.mark.parametrize(
    ("seed", "centre"), [(1, (57.5, -36.4)), (2, (0.3, 10.0)), (3, (181.0, -86.0))]
)
def test_polygon_overlaps_equal_sphgeom(seed: int, centre: tuple[float, float]) -> None:
    rng = np.random.default_rng(seed)
    visit, c_ra, polys, c_dec, rv, rd = _fake_camera(rng, 6, centre)
    offsets, ra, dec = _flatten(polys)
    assert {int(n) for n in np.diff(offsets)} >= {4, 5, 6}
    fast = compute_polygon_overlaps(SKY, rv, rd, offsets, ra, dec, visit, c_ra % 360.0, c_dec)
    slow = brute_force_polygon_overlaps(SKY, rv, rd, offsets, ra, dec)
    assert len(slow) > 0
    assert _rows(fast) == _rows(slow)


def test_focal_plane_quads_through_the_polygon_path_give_the_same_overlaps() -> None:
    plane = focal_plane("LSSTComCam")
    visits = make_survey("dc2-test-med-1", seed=1, visits=10)
    corners = plane.corners_sky_many(
        visits["ra"].to_numpy(), visits["dec"].to_numpy(), visits["rotation"].to_numpy()
    )
    n_det = len(plane.detectors)
    rv = np.repeat(visits["visit"].to_numpy(), n_det)
    rd = np.tile(np.array([d.id for d in plane.detectors], dtype=np.int16), len(visits))
    offsets = np.arange(0, 4 * rv.size + 1, 4, dtype=np.int64)
    ours = compute_polygon_overlaps(
        SKY,
        rv,
        rd,
        offsets,
        corners[..., 0].ravel(),
        corners[..., 1].ravel(),
        visits["visit"].to_numpy(),
        visits["ra"].to_numpy(),
        visits["dec"].to_numpy(),
    )
    ref = compute_overlaps(
        SKY,
        plane,
        visits["visit"].to_numpy(),
        visits["ra"].to_numpy(),
        visits["dec"].to_numpy(),
        visits["rotation"].to_numpy(),
    )
    assert _rows(ours) == _rows(ref)


def test_no_regions_no_overlaps() -> None:
    empty = np.empty(0)
    table = compute_polygon_overlaps(SKY, empty, empty, [0], empty, empty, empty, empty, empty)
    assert len(table) == 0
