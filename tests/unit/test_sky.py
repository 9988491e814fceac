"""Tests for drp_campaign.model.sky (RingsSkyMap re-implementation)."""

from __future__ import annotations

import functools
import math

import lsst.sphgeom as sphgeom
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drp_campaign.model.sky import RingsSkyMap, TractInfo, sky_map, sky_map_for, skymap_hash
from drp_campaign.model.spec import SkymapSpec

_SKYMAP = RingsSkyMap()
_SMALL = RingsSkyMap(num_rings=12)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def skymap() -> RingsSkyMap:
    return _SKYMAP


@pytest.fixture(scope="module")
def legacy() -> RingsSkyMap:
    return RingsSkyMap(builder="legacy")


ra_st = st.floats(min_value=0.0, max_value=360.0, allow_nan=False, exclude_max=True)
dec_st = st.floats(min_value=-90.0, max_value=90.0, allow_nan=False)


def _circle(ra: float, dec: float, radius: float) -> sphgeom.Circle:
    centre = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec))
    return sphgeom.Circle(centre, sphgeom.Angle.fromDegrees(radius))


# ----------------------------------------------------------------- reference values


@pytest.mark.parametrize(
    ("tract_id", "ra", "dec"),
    [
        (3828, 56.650, -36.446),  # DC2 test-med-1
        (3829, 58.477, -36.446),
        (5063, 53.088, -27.521),  # DP1 ECDFS
        (453, 4.615, -72.149),  # 47 Tuc
    ],
)
def test_check_values(skymap: RingsSkyMap, tract_id: int, ra: float, dec: float) -> None:
    tract = skymap[tract_id]
    assert tract.ctr_ra_deg == pytest.approx(ra, abs=1e-3)
    assert tract.ctr_dec_deg == pytest.approx(dec, abs=1e-3)
    assert skymap.find_tract(tract.ctr_ra_deg, tract.ctr_dec_deg) == tract_id
    assert skymap.find_tracts([tract.ctr_ra_deg], [tract.ctr_dec_deg])[0] == tract_id


def test_hsc_reference_centres(skymap: RingsSkyMap) -> None:
    # From lsst.skymap tests/test_ringsSkyMap.py (HSC rings: 120 rings; the
    # centres do not depend on the pixel scale).  9813 (COSMOS) is numbered
    # identically in version 0 and 1; in version 1, 9712 is the tract at RA=0
    # one ring north of the version-0 tract 9712 at (0, 0.7438016528925696).
    t = skymap[9813]
    assert t.ctr_ra_deg == pytest.approx(150.2479338842975, abs=1e-12)
    assert t.ctr_dec_deg == pytest.approx(2.2314049586776834, abs=1e-12)
    t = skymap[9712]
    assert t.ctr_ra_deg == 0.0
    assert t.ctr_dec_deg == pytest.approx(0.7438016528925696 + 180.0 / 121, abs=1e-12)
    # testWraparound: +-10" around the centre of tract 9712 stays in it.
    for dra in (-10 / 3600, 10 / 3600):
        ra = (t.ctr_ra_deg + dra) % 360.0
        assert skymap.find_tract(ra, t.ctr_dec_deg) == 9712
        assert skymap.find_tracts([t.ctr_ra_deg + dra], [t.ctr_dec_deg])[0] == 9712


def test_counts(skymap: RingsSkyMap) -> None:
    assert len(skymap) == 18938
    assert len(RingsSkyMap(num_rings=3)) == 26  # lsst.skymap test_ringsSkyMap
    assert skymap.ring_size_rad == pytest.approx(math.pi / 121)
    total = 2 + sum(skymap.ring_tract_count(r) for r in range(120))
    assert total == len(skymap)
    assert skymap.ring_first_tract(-1) == 0
    assert skymap.ring_first_tract(0) == 1
    assert skymap.ring_first_tract(120) == 18937
    for ring in (0, 1, 37, 60, 119):
        first = skymap.ring_first_tract(ring)
        assert skymap.ring_indices(first) == (ring, 0)
        last = first + skymap.ring_tract_count(ring) - 1
        assert skymap.ring_indices(last) == (ring, skymap.ring_tract_count(ring) - 1)
        assert skymap[first].ctr_ra_deg == 0.0
    with pytest.raises(IndexError):
        skymap[18938]
    with pytest.raises(IndexError):
        skymap[-1]


def test_caps(skymap: RingsSkyMap) -> None:
    south, north = skymap[0], skymap[len(skymap) - 1]
    assert (south.ring, south.ctr_dec_deg) == (-1, -90.0)
    assert (north.ring, north.ctr_dec_deg) == (120, 90.0)
    assert south.inner_ra_deg == (0.0, 360.0)
    assert skymap.find_tract(123.0, -90.0) == 0
    assert skymap.find_tract(321.0, 90.0) == 18937
    assert skymap.find_tract(10.0, south.inner_dec_deg[1] - 1e-9) == 0
    assert skymap.find_tract(10.0, south.inner_dec_deg[1] + 1e-9) == 1
    for ra in (0.0, 123.0, 321.0, 359.9):
        assert south.contains_inner(ra, -90.0)
        assert north.contains_inner(ra, 90.0)
        assert south.contains_inner(ra, -89.3)
        assert not south.contains_inner(ra, -89.2)


# ------------------------------------------------------------------- tract geometry


def test_cells_patches(skymap: RingsSkyMap) -> None:
    tract = skymap[3828]
    assert tract.num_patches == (10, 10)
    assert (tract.patch_inner, tract.patch_border) == (3000, 200)
    assert (tract.width, tract.height) == (30000, 30000)
    # Offsets at ringSize/2 + 1' reach 13689.23 px: Box2I(-13689..13689), grown
    # to 30000 px with floor(2621 / 2) = 1310 px on the low side.
    assert tract.crpix == (14999.0, 14999.0)
    assert not tract.clip_outer
    for seq in (0, 5, 55, 99):
        x0, y0, x1, y1 = tract.patch_inner_bbox(seq)
        ox0, oy0, ox1, oy1 = tract.patch_outer_bbox(seq)
        assert (x1 - x0 + 1, y1 - y0 + 1) == (3000, 3000)
        assert (ox1 - ox0 + 1, oy1 - oy0 + 1) == (3400, 3400)
        # lsst.skymap test_ringsSkyMapCells: outer begins one cell + border before.
        assert ox0 == x0 - 150 - 50
        assert oy0 == y0 - 150 - 50
        # neighbouring patches' outer boxes overlap by 400 px = 80".
        assert (ox1 - ox0 + 1 - 3000) * 0.2 == pytest.approx(80.0)
    assert tract.patch_outer_bbox(0)[:2] == (-200, -200)
    assert tract.patch_index(57) == (7, 5)
    assert tract.patch_sequential(7, 5) == 57
    with pytest.raises(IndexError):
        tract.patch_index(100)


def test_legacy_patches(legacy: RingsSkyMap) -> None:
    tract = legacy[3828]
    assert tract.num_patches == (7, 7)
    assert (tract.width, tract.height) == (28000, 28000)
    assert tract.crpix == (13999.0, 13999.0)
    assert tract.clip_outer
    nx, ny = tract.num_patches
    for seq in range(nx * ny):
        xi, yi = tract.patch_index(seq)
        x0, y0, x1, y1 = tract.patch_inner_bbox(seq)
        ox0, oy0, ox1, oy1 = tract.patch_outer_bbox(seq)
        assert ox0 == (x0 if xi == 0 else x0 - 100)
        assert oy0 == (y0 if yi == 0 else y0 - 100)
        assert ox1 == (x1 if xi == nx - 1 else x1 + 100)
        assert oy1 == (y1 if yi == ny - 1 else y1 + 100)


def test_same_geometry_everywhere(skymap: RingsSkyMap) -> None:
    for tract_id in (0, 1, 2, 500, 9712, 18000, 18936, 18937):
        t = skymap[tract_id]
        assert (t.width, t.height, t.crpix, t.num_patches) == (
            30000,
            30000,
            (14999.0, 14999.0),
            (10, 10),
        )


def test_inner_box(skymap: RingsSkyMap) -> None:
    t = skymap[3828]
    n = skymap.ring_tract_count(t.ring)
    assert t.inner_ra_deg[1] - t.inner_ra_deg[0] == pytest.approx(360.0 / n)
    assert t.inner_dec_deg[1] - t.inner_dec_deg[0] == pytest.approx(180.0 / 121)
    first = skymap[skymap.ring_first_tract(t.ring)]
    assert first.inner_ra_deg[0] < 0.0
    assert first.contains_inner(359.99, first.ctr_dec_deg)
    assert first.contains_inner(0.01, first.ctr_dec_deg)
    assert isinstance(t.inner_region(), sphgeom.Box)


@pytest.mark.parametrize("tract_id", [0, 1, 7, 13, 25])
def test_inner_region_matches_find_tracts_small(tract_id: int) -> None:
    # lsst.skymap testInnerSkyRegion on the 3-ring sky map.
    sm = RingsSkyMap(num_rings=3)
    tract = sm[tract_id]
    xs = np.linspace(0, tract.width - 1, 60)
    xx, yy = np.meshgrid(xs, xs)
    ra, dec = tract.pixel_to_sky(xx.ravel(), yy.ravel())
    region = tract.inner_region()
    inside = region.contains(np.radians(ra), np.radians(dec))
    np.testing.assert_array_equal(inside, sm.find_tracts(ra, dec) == tract_id)


def test_wcs_header(skymap: RingsSkyMap) -> None:
    t = skymap[3828]
    w = t.wcs()
    assert list(w.wcs.ctype) == ["RA---TAN", "DEC--TAN"]
    np.testing.assert_allclose(w.wcs.crpix, [15000.0, 15000.0])
    np.testing.assert_allclose(w.wcs.cd, [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]], rtol=1e-15)
    x, y = w.all_world2pix([t.ctr_ra_deg], [t.ctr_dec_deg], 0)
    assert (x[0], y[0]) == pytest.approx(t.crpix, abs=1e-9)


def test_hash(skymap: RingsSkyMap, legacy: RingsSkyMap) -> None:
    h = skymap.hash()
    assert len(h) == 20
    assert h == RingsSkyMap().hash()
    assert h != legacy.hash()
    assert h != RingsSkyMap(num_rings=121).hash()
    assert h != RingsSkyMap(ra_start_deg=10.0).hash()


# Hashes of the registered skymaps these configs describe (lsst.skymap's getSha1).
HSC_RINGS_V1 = "e29fe9f1008e359f36a3677e7d69cc439376d1e6"


def test_hash_of_hsc_rings_v1() -> None:
    # hsc_rings_v1: 120 rings, legacy builder, 0.168"/px, tractOverlap 1/60 deg, raStart 0.
    spec = SkymapSpec(
        name="hsc_rings_v1", rings=120, builder="legacy", pixel_scale=0.168, tract_overlap=1 / 60
    )
    assert skymap_hash(spec) == HSC_RINGS_V1
    assert sky_map_for(spec).hash_hex() == HSC_RINGS_V1
    spelled_out = spec.model_copy(
        update={"ra_start": 0.0, "patch_inner": 4000, "patch_border": 100}
    )
    assert skymap_hash(spelled_out) == HSC_RINGS_V1
    assert RingsSkyMap(120, "legacy", 1 / 60, 0.168, 0.0).hash().hex() == HSC_RINGS_V1
    assert skymap_hash(spec.model_copy(update={"pixel_scale": 0.2})) != HSC_RINGS_V1
    assert skymap_hash(spec.model_copy(update={"patch_border": 101})) != HSC_RINGS_V1


def test_spec_defaults_are_the_existing_geometry() -> None:
    # A spec without the new keys is the sky map (and hash) every caller used before.
    for builder in ("cells", "legacy"):
        spec = SkymapSpec(name="x", rings=120, builder=builder)  # type: ignore[arg-type]
        sky = sky_map_for(spec)
        assert sky is sky_map(120, builder)
        assert sky.hash() == RingsSkyMap(120, builder).hash()  # type: ignore[arg-type]
    spelled = SkymapSpec(
        name="x",
        rings=120,
        builder="cells",
        pixel_scale=0.2,
        tract_overlap=1 / 60,
        ra_start=0,
        patch_inner=3000,
        patch_border=200,
    )
    assert sky_map_for(spelled) is sky_map(120, "cells")


def test_patch_size_overrides() -> None:
    legacy = RingsSkyMap(num_rings=12, builder="legacy", patch_inner=2000, patch_border=50)
    t = legacy[5]
    assert (t.patch_inner, t.patch_border) == (2000, 50)
    assert t.width == 2000 * t.num_patches[0]
    assert legacy.hash() != RingsSkyMap(num_rings=12, builder="legacy").hash()
    # Cells: the hash packs cell counts, so 350 px of border is 2 border cells.
    cells = RingsSkyMap(num_rings=12, patch_inner=1500, patch_border=350)
    assert (cells[5].patch_inner, cells[5].patch_border) == (1500, 350)
    assert cells._cell_counts == (10, 2)
    with pytest.raises(ValueError, match="multiple of the 150 px cell"):
        RingsSkyMap(num_rings=12, patch_inner=1000)
    with pytest.raises(ValueError, match="50 px plus whole 150 px cells"):
        RingsSkyMap(num_rings=12, patch_border=100)
    with pytest.raises(ValueError, match="pixel_scale_arcsec"):
        RingsSkyMap(num_rings=12, pixel_scale_arcsec=0.0)


# ----------------------------------------------------------------------- properties


def _neighbours(sm: RingsSkyMap, ra: float, dec: float) -> set[int]:
    ring = int(sm.ring_of_dec(dec))
    cands = {0, len(sm) - 1}
    for r in (ring - 1, ring, ring + 1):
        if 0 <= r < sm.num_rings:
            n = sm.ring_tract_count(r)
            first = sm.ring_first_tract(r)
            k = int(round(((ra - sm.ra_start_deg) % 360.0) / (360.0 / n)))
            cands.update(first + (kk % n) for kk in (k - 1, k, k + 1))
    return cands


@SETTINGS
@given(ra=ra_st, dec=dec_st)
def test_point_in_exactly_one_inner_region(ra: float, dec: float) -> None:
    sm = _SKYMAP
    tid = sm.find_tract(ra, dec)
    owners = [t for t in _neighbours(sm, ra, dec) if sm[t].contains_inner(ra, dec)]
    on_edge = any(
        abs(ra - b) < 1e-9 or abs(ra - b - 360.0) < 1e-9 or abs(ra - b + 360.0) < 1e-9
        for t in owners
        for b in sm[t].inner_ra_deg
    ) or any(abs(dec - b) < 1e-9 for t in owners for b in sm[t].inner_dec_deg)
    if not on_edge:
        assert owners == [tid]
    else:
        # On a boundary, lsst.skymap's findTract rounding and the closed sphgeom
        # boxes may disagree by ~1e-16 rad; the found tract must still be adjacent.
        assert owners
        t = sm[tid]
        assert t.inner_dec_deg[0] - 1e-9 <= dec <= t.inner_dec_deg[1] + 1e-9
    assert int(sm.find_tracts(ra, dec)) == tid


@SETTINGS
@given(
    ra=st.lists(ra_st, min_size=1, max_size=20),
    dec=st.lists(dec_st, min_size=20, max_size=20),
)
def test_find_tracts_agrees(ra: list[float], dec: list[float]) -> None:
    sm = _SKYMAP
    dec = dec[: len(ra)]
    ids = sm.find_tracts(ra, dec)
    assert ids.tolist() == [sm.find_tract(r, d) for r, d in zip(ra, dec, strict=True)]


def test_find_tracts_random_dense(skymap: RingsSkyMap) -> None:
    rng = np.random.default_rng(12345)
    ra = rng.uniform(0.0, 360.0, 1000)
    dec = rng.uniform(-90.0, 90.0, 1000)
    ids = skymap.find_tracts(ra, dec)
    assert ids.tolist() == [skymap.find_tract(r, d) for r, d in zip(ra, dec, strict=True)]
    assert ring_consistent(skymap, ids, dec)


def ring_consistent(sm: RingsSkyMap, ids: np.ndarray, dec: np.ndarray) -> bool:
    rings = sm.ring_of_dec(dec)
    return all(sm[int(t)].ring == int(r) for t, r in zip(ids, rings, strict=True))


@SETTINGS
@given(
    tract_id=st.integers(min_value=0, max_value=18937),
    dx=st.floats(min_value=-15000, max_value=15000),
    dy=st.floats(min_value=-15000, max_value=15000),
)
def test_sky_to_pixel_matches_astropy(tract_id: int, dx: float, dy: float) -> None:
    tract = _SKYMAP[tract_id]
    w = tract.wcs()
    x0, y0 = tract.crpix[0] + dx, tract.crpix[1] + dy
    ra, dec = w.all_pix2world([x0], [y0], 0)
    x, y = tract.sky_to_pixel(ra, dec)
    assert abs(x[0] - x0) < 1e-6 and abs(y[0] - y0) < 1e-6
    ra2, dec2 = tract.pixel_to_sky([x0], [y0])
    assert abs(dec2[0] - dec[0]) < 1e-9
    assert abs(((ra2[0] - ra[0] + 180.0) % 360.0 - 180.0) * math.cos(math.radians(dec[0]))) < 1e-9


@SETTINGS
@given(tract_id=st.integers(min_value=0, max_value=18937), seq=st.integers(0, 99))
def test_patch_polygons_contain_centre(tract_id: int, seq: int) -> None:
    tract = _SKYMAP[tract_id]
    x0, y0, x1, y1 = tract.patch_inner_bbox(seq)
    ra, dec = tract.pixel_to_sky([(x0 + x1) / 2], [(y0 + y1) / 2])
    v = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(ra[0]), float(dec[0])))
    inner = tract.patch_inner_polygon(seq)
    outer = tract.patch_outer_polygon(seq)
    assert inner.contains(v)
    assert outer.contains(v)
    assert tract.outer_polygon().contains(v)
    assert outer.contains(inner)
    # a point just outside the inner box (but inside the border) is in outer only
    ra, dec = tract.pixel_to_sky([x1 + 100.0], [(y0 + y1) / 2])
    v = sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(ra[0]), float(dec[0])))
    assert not inner.contains(v)
    assert outer.contains(v)


@functools.cache
def _centres(sm: RingsSkyMap) -> np.ndarray:
    return np.radians(np.array([[t.ctr_ra_deg, t.ctr_dec_deg] for t in sm]))


def _brute_near(sm: RingsSkyMap, ra: float, dec: float, radius: float, pre: float) -> set[int]:
    circle = _circle(ra, dec, radius)
    c = _centres(sm)
    v = np.stack(
        [np.cos(c[:, 1]) * np.cos(c[:, 0]), np.cos(c[:, 1]) * np.sin(c[:, 0]), np.sin(c[:, 1])]
    )
    q = np.array(
        [
            math.cos(math.radians(dec)) * math.cos(math.radians(ra)),
            math.cos(math.radians(dec)) * math.sin(math.radians(ra)),
            math.sin(math.radians(dec)),
        ]
    )
    sep = np.degrees(np.arccos(np.clip(q @ v, -1.0, 1.0)))
    out = set()
    for t in np.nonzero(sep < radius + pre)[0]:
        if not (sm[int(t)].outer_polygon().relate(circle) & sphgeom.DISJOINT):
            out.add(int(t))
    return out


@SETTINGS
@given(ra=ra_st, dec=dec_st, radius=st.floats(min_value=0.0, max_value=5.0))
def test_tracts_near_superset_small(ra: float, dec: float, radius: float) -> None:
    sm = _SMALL
    near = sm.tracts_near(ra, dec, radius)
    assert near == sorted(set(near))
    brute = _brute_near(sm, ra, dec, radius, pre=360.0)
    assert brute <= set(near)
    assert sm.find_tract(ra, dec) in near


@settings(max_examples=25, deadline=None)
@given(ra=ra_st, dec=dec_st, radius=st.floats(min_value=0.0, max_value=3.0))
def test_tracts_near_superset(ra: float, dec: float, radius: float) -> None:
    sm = _SKYMAP
    near = set(sm.tracts_near(ra, dec, radius))
    brute = _brute_near(sm, ra, dec, radius, pre=3.0)
    assert brute <= near
    # not absurdly large either
    assert len(near) <= 4 * len(brute) + 30


def test_tracts_near_poles_and_wrap(skymap: RingsSkyMap) -> None:
    assert 0 in skymap.tracts_near(0.0, -90.0, 0.1)
    assert 18937 in skymap.tracts_near(0.0, 90.0, 0.1)
    near = skymap.tracts_near(0.0, 0.0, 1.0)
    ring = int(skymap.ring_of_dec(0.0))
    first = skymap.ring_first_tract(ring)
    last = first + skymap.ring_tract_count(ring) - 1
    assert first in near and last in near
    assert len(skymap.tracts_near(0.0, 0.0, 200.0)) == len(skymap)


def test_find_patches(skymap: RingsSkyMap) -> None:
    tract = skymap[3828]
    seq = 44
    x0, y0, x1, y1 = tract.patch_inner_bbox(seq)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    xs = np.array([cx - 100, cx + 100, cx + 100, cx - 100])
    ys = np.array([cy - 100, cy - 100, cy + 100, cy + 100])
    ra, dec = tract.pixel_to_sky(xs, ys)
    region = sphgeom.ConvexPolygon.convexHull(
        [
            sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(r), float(d)))
            for r, d in zip(ra, dec, strict=True)
        ]
    )
    found = skymap.find_patches(region)
    assert found == [(3828, 44)]
    # a region at a patch corner overlaps 4 patches of the tract (plus none elsewhere)
    cx, cy = float(x1) + 0.5, float(y1) + 0.5
    ra, dec = tract.pixel_to_sky(
        np.array([cx - 20, cx + 20, cx + 20, cx - 20]),
        np.array([cy - 20, cy - 20, cy + 20, cy + 20]),
    )
    region = sphgeom.ConvexPolygon.convexHull(
        [
            sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(r), float(d)))
            for r, d in zip(ra, dec, strict=True)
        ]
    )
    found = skymap.find_patches(region)
    assert [(t, p) for t, p in found if t == 3828] == [
        (3828, 44),
        (3828, 45),
        (3828, 54),
        (3828, 55),
    ]
    for t, p in found:
        assert not (skymap[t].patch_outer_polygon(p).relate(region) & sphgeom.DISJOINT)


def test_tractinfo_is_frozen(skymap: RingsSkyMap) -> None:
    t: TractInfo = skymap[3828]
    with pytest.raises(AttributeError):
        t.tract_id = 1  # type: ignore[misc]
    assert skymap[3828] is t
    assert len(t) == 100
