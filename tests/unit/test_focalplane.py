"""Tests of drp_campaign.model.focalplane."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lsst.sphgeom import LonLat, UnitVector3d

from drp_campaign.model.focalplane import Detector, FocalPlane, focal_plane

LSSTCAM = focal_plane("LSSTCam")
COMCAM = focal_plane("LSSTComCam")
ARCSEC_PER_MM = 20.006


def _tangent(
    ra: npt.NDArray[np.float64], dec: npt.NDArray[np.float64], ra0: float, dec0: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Forward gnomonic projection (independent of the code under test), degrees -> degrees."""
    a, d = np.radians(ra), np.radians(dec)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cos_c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cos_c
    eta = (math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cos_c
    return np.degrees(xi), np.degrees(eta)


def _separation_deg(ra: npt.ArrayLike, dec: npt.ArrayLike, ra0: float, dec0: float) -> np.ndarray:
    a, d = np.radians(ra), np.radians(dec)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cos_s = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    return np.degrees(np.arccos(np.clip(cos_s, -1.0, 1.0)))


def _uv(ra: float, dec: float) -> UnitVector3d:
    return UnitVector3d(LonLat.fromDegrees(float(ra), float(dec)))


# ------------------------------------------------------------------------------------- layout
def test_lsstcam_detector_count_ids_and_names() -> None:
    assert LSSTCAM.n_detectors == 189
    assert [d.id for d in LSSTCAM.detectors] == list(range(189))
    assert len({d.name for d in LSSTCAM.detectors}) == 189
    for det in LSSTCAM.detectors:
        assert det.name == f"{det.raft}_{det.sensor}"
    assert {d.raft for d in LSSTCAM.detectors}.isdisjoint({"R00", "R04", "R40", "R44"})


def test_lsstcam_id_formula_matches_obs_lsst() -> None:
    # Science rafts in row-major order without the corner rafts; id = raft_index*9 + 3*sy + sx.
    rafts = [f"R{r}{c}" for r in range(5) for c in range(5)]
    rafts = [r for r in rafts if r not in {"R00", "R04", "R40", "R44"}]
    assert rafts[:4] == ["R01", "R02", "R03", "R10"] and rafts[-1] == "R43"
    for det in LSSTCAM.detectors:
        sy, sx = int(det.sensor[1]), int(det.sensor[2])
        assert det.id == rafts.index(det.raft) * 9 + 3 * sy + sx
    assert LSSTCAM.detector("R22_S11").id == 94
    assert LSSTCAM.detector(0).name == "R01_S00"
    assert LSSTCAM.detector(188).name == "R43_S22"


def test_lsstcam_geometry() -> None:
    det = LSSTCAM.detector("R22_S11")
    assert det.center_mm == pytest.approx((0.0, 0.0))
    assert det.area_mm2 == pytest.approx(40.72 * 40.00)
    # R01 is row 0 (y), column 1 (x): centre (-127, -254); S21 is sensor row 2, column 1.
    cx, cy = LSSTCAM.detector("R01_S21").center_mm
    assert (cx, cy) == pytest.approx((-127.0, -254.0 + 42.25))
    for d in LSSTCAM.detectors:
        assert d.area_mm2 > 0  # counter-clockwise corners
    assert LSSTCAM.corners_mm.shape == (189, 4, 2)
    assert LSSTCAM.plate_scale_arcsec_per_mm == ARCSEC_PER_MM


def test_lsstcam_radius_and_area() -> None:
    assert 2.04 < LSSTCAM.max_radius_deg < 2.06
    assert 9.0 < LSSTCAM.area_deg2 < 10.0
    assert LSSTCAM.area_deg2 == pytest.approx(189 * 40.72 * 40.0 * (ARCSEC_PER_MM / 3600) ** 2)


def test_imsim_same_layout_and_comcam() -> None:
    imsim = focal_plane("LSSTCam-imSim")
    assert imsim.name == "LSSTCam-imSim"
    assert imsim.detectors == LSSTCAM.detectors
    assert COMCAM.n_detectors == 9
    assert [d.id for d in COMCAM.detectors] == list(range(9))
    assert [d.name for d in COMCAM.detectors] == [
        f"R22_S{y}{x}" for y in range(3) for x in range(3)
    ]
    # The imaging area alone is 0.45 deg^2 (the ~0.5 deg^2 often quoted includes the gaps).
    assert 0.4 < COMCAM.area_deg2 < 0.7
    assert COMCAM.max_radius_deg < 0.5


def test_unknown_instrument() -> None:
    with pytest.raises(ValueError, match="unknown instrument 'HSC'; use one of: LSSTCam, "):
        focal_plane("HSC")


def test_focal_plane_validation() -> None:
    with pytest.raises(ValueError, match="no detectors"):
        FocalPlane("empty", (), 1.0)
    det = Detector(0, "A", "R", "S", ((0, 0), (1, 0), (1, 1), (0, 1)))
    with pytest.raises(ValueError, match="duplicate"):
        FocalPlane("dup", (det, det), 1.0)


# ------------------------------------------------------------------------------------- on the sky
@pytest.mark.parametrize(("ra0", "dec0"), [(57.56, -36.45), (0.3, 10.0), (200.0, -89.5)])
def test_rotation_zero_is_scaled_focal_plane(ra0: float, dec0: float) -> None:
    corners = LSSTCAM.detector_corners_sky(ra0, dec0, 0.0)
    xi, eta = _tangent(corners[..., 0], corners[..., 1], ra0, dec0)
    scale = ARCSEC_PER_MM / 3600.0
    np.testing.assert_allclose(xi, LSSTCAM.corners_mm[..., 0] * scale, atol=1e-9)
    np.testing.assert_allclose(eta, LSSTCAM.corners_mm[..., 1] * scale, atol=1e-9)


@pytest.mark.parametrize(("ra0", "dec0"), [(57.56, -36.45), (359.9, 1.0), (10.0, 88.5)])
def test_rotation_90_rotates_about_boresight(ra0: float, dec0: float) -> None:
    c0 = LSSTCAM.detector_corners_sky(ra0, dec0, 0.0)
    c90 = LSSTCAM.detector_corners_sky(ra0, dec0, 90.0)
    xi0, eta0 = _tangent(c0[..., 0], c0[..., 1], ra0, dec0)
    xi9, eta9 = _tangent(c90[..., 0], c90[..., 1], ra0, dec0)
    # Position angle of +y goes from north to east: (xi, eta) -> (eta, -xi).
    np.testing.assert_allclose(xi9, eta0, atol=1e-9)
    np.testing.assert_allclose(eta9, -xi0, atol=1e-9)
    # Distances from the boresight are unchanged by the rotation.
    np.testing.assert_allclose(
        _separation_deg(c0[..., 0], c0[..., 1], ra0, dec0),
        _separation_deg(c90[..., 0], c90[..., 1], ra0, dec0),
        atol=1e-9,
    )


def test_corner_distance_and_ra_range() -> None:
    corners = LSSTCAM.detector_corners_sky(0.01, -20.0, 33.0)
    sep = _separation_deg(corners[..., 0], corners[..., 1], 0.01, -20.0)
    assert sep.max() == pytest.approx(LSSTCAM.max_radius_deg, abs=1e-9)
    ra = corners[..., 0]
    assert ra.min() >= 0.0 and ra.max() < 360.0
    assert (ra > 180).any() and (ra < 180).any()  # the field straddles RA 0


def test_many_equals_per_visit() -> None:
    rng = np.random.default_rng(5)
    n = 40
    ra = rng.uniform(-10, 370, n)  # out-of-range RA is wrapped
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    dec[:2] = [90.0, -90.0]
    rot = rng.uniform(-180, 540, n)
    many = LSSTCAM.corners_sky_many(ra, dec, rot)
    assert many.shape == (n, 189, 4, 2)
    assert many.dtype == np.float64
    single = np.stack(
        [LSSTCAM.detector_corners_sky(*args) for args in zip(ra, dec, rot, strict=True)]
    )
    np.testing.assert_array_equal(many, single)
    assert (many[..., 0] >= 0).all() and (many[..., 0] < 360).all()
    assert (np.abs(many[..., 1]) <= 90).all()


def test_many_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same length"):
        LSSTCAM.corners_sky_many(np.zeros(3), np.zeros(2), np.zeros(3))


def test_polygons_contain_their_centres_only() -> None:
    ra0, dec0, rot = 57.56, -36.45, 17.0
    polys = LSSTCAM.detector_polygons(ra0, dec0, rot)
    centres = LSSTCAM.detector_centers_sky(ra0, dec0, rot)
    assert len(polys) == 189
    for i, poly in enumerate(polys):
        assert poly.contains(_uv(*centres[i]))
        # Detectors do not overlap: a neighbour's centre is never inside.
        others = [j for j in (i - 1, i + 1, i + 3) if 0 <= j < 189]
        assert not any(poly.contains(_uv(*centres[j])) for j in others)
    # The boresight is the centre of R22_S11 (id 94) and of no other detector.
    inside = [i for i, p in enumerate(polys) if p.contains(_uv(ra0, dec0))]
    assert inside == [94]


@settings(max_examples=40, deadline=None)
@given(
    ra0=st.floats(0, 360, exclude_max=True),
    dec0=st.floats(-89.9, 89.9),
    rot=st.floats(0, 360),
    det=st.integers(0, 188),
    fx=st.floats(0.02, 0.98),
    fy=st.floats(0.02, 0.98),
)
def test_polygon_is_exact_detector_region(
    ra0: float, dec0: float, rot: float, det: int, fx: float, fy: float
) -> None:
    # Any point inside the detector rectangle, projected the same way, lies in the polygon:
    # gnomonic projection keeps straight edges straight (great circles).
    d = LSSTCAM.detectors[det]
    (x0, y0), _, (x1, y1), _ = d.corners_mm
    point = np.array([[x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)]])
    sky = LSSTCAM._project_many(point, [ra0], [dec0], [rot])[0, 0]
    assert LSSTCAM.detector_polygons(ra0, dec0, rot)[det].contains(_uv(*sky))


def test_comcam_polygons() -> None:
    polys = COMCAM.detector_polygons(150.0, 2.2, 45.0)
    assert len(polys) == 9
    assert polys[4].contains(_uv(150.0, 2.2))
