"""Sky geometry: a pure-Python re-implementation of ``lsst.skymap.RingsSkyMap``.

This module reproduces the tract and patch geometry of ``lsst.skymap``'s
``RingsSkyMap`` (version 1 numbering, TAN projection, no rotation) with either
the ``CellTractBuilder`` (``builder="cells"``, as used by ``lsst_cells_v1`` and
``DC2_cells_v1``) or the ``LegacyTractBuilder`` (``builder="legacy"``, DC2).

The arithmetic mirrors the upstream code operation by operation where it
decides integer results (ring sizes, tract numbering, ``findTract``
rounding, the ``Box2D`` -> ``Box2I`` "expand" conversion of
``lsst.geom`` and the growth of the tract box to whole patches), so tract ids,
centres, inner RA/Dec boxes, tract bounding boxes and patch boxes are the same
as upstream's.  Pixel conventions are LSST's: 0-based, pixel centres at
integers, an integer box ``[min, max]`` covers ``[min - 0.5, max + 0.5]``.

Only numpy, astropy, ``lsst.sphgeom`` and the standard library are used.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Literal

import lsst.sphgeom as sphgeom
import numpy as np
from astropy.wcs import WCS
from numpy.typing import ArrayLike, NDArray

from .skyconfig import (
    CELL_BORDER,
    CELL_INNER,
    SkyMapConfig,
    SkymapLike,
    builder_defaults,
    cell_layout,
    resolve_config,
    resolve_skymap,
)

__all__ = ["RingsSkyMap", "TractInfo", "sky_map", "sky_map_for", "skymap_hash"]

# lsst.geom angle units (``AngleUnit`` values) and constants.
_PI = math.pi
_TWOPI = math.pi * 2.0
_HALFPI = math.pi * 0.5
_DEGREES = math.pi / 180.0
_ARCSECONDS = math.pi / 180.0 / 3600.0
# ``lsst::geom::Box2D::EPSILON``.
_BOX2D_EPSILON = float(np.finfo(float).eps) * 2.0

# Builder parameters: defaults and cell sizes live in skyconfig (the spec loader checks them).
_PROJECTION = "TAN"
_ROTATION = 0.0

Box = tuple[int, int, int, int]


def _wrap(angle: float) -> float:
    """Wrap an angle in radians into ``[0, 2 pi)`` exactly as ``lsst.geom.Angle.wrap``.

    Parameters
    ----------
    angle : `float`
        Angle in radians.

    Returns
    -------
    wrapped : `float`
        The wrapped angle in radians.
    """
    wrapped = math.fmod(angle, _TWOPI)
    if wrapped < 0.0:
        wrapped += _TWOPI
    if wrapped >= _TWOPI:
        wrapped = 0.0
    return wrapped


def _unit_vector(lon: float, lat: float) -> NDArray[np.float64]:
    """Return the unit vector of a longitude/latitude pair (radians).

    Parameters
    ----------
    lon, lat : `float`
        Longitude and latitude in radians.

    Returns
    -------
    vec : `numpy.ndarray`
        Cartesian unit vector, shape ``(3,)``.
    """
    return np.array([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)])


Vec3 = tuple[float, float, float]


def _cross(a: Vec3, b: Vec3) -> Vec3:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Vec3, b: Vec3) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _offset(lon: float, lat: float, bearing: float, amount: float) -> Vec3:
    """Offset a sky position along a great circle, as ``lsst.geom.SpherePoint.offset``.

    Parameters
    ----------
    lon, lat : `float`
        Starting point (radians).
    bearing : `float`
        Direction in radians: 0 is east (increasing longitude), pi/2 is north.
    amount : `float`
        Distance to move, radians.

    Returns
    -------
    vec : `tuple` [`float`, `float`, `float`]
        Unit vector of the offset point.
    """
    cos_lat = math.cos(lat)
    r = (cos_lat * math.cos(lon), cos_lat * math.sin(lon), math.sin(lat))
    u = (-math.sin(lon), math.cos(lon), 0.0)
    w = _cross(r, u)
    cb, sb = math.cos(bearing), math.sin(bearing)
    v = (cb * u[0] + sb * w[0], cb * u[1] + sb * w[1], cb * u[2] + sb * w[2])
    ax = _cross(r, v)
    norm = math.sqrt(_dot(ax, ax))
    ax = (ax[0] / norm, ax[1] / norm, ax[2] / norm)
    # Rodrigues rotation of r about the axis by amount (Eigen::AngleAxisd).
    cos_a, sin_a = math.cos(amount), math.sin(amount)
    kxr = _cross(ax, r)
    kdr = _dot(ax, r) * (1.0 - cos_a)
    return (
        r[0] * cos_a + kxr[0] * sin_a + ax[0] * kdr,
        r[1] * cos_a + kxr[1] * sin_a + ax[1] * kdr,
        r[2] * cos_a + kxr[2] * sin_a + ax[2] * kdr,
    )


def _tangent_basis(
    ra: float, dec: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Return the gnomonic basis (centre, +x_iwc, +y_iwc) for a TAN WCS centred at (ra, dec).

    The intermediate world coordinates follow FITS paper II with the default
    ``LONPOLE`` (180 deg, except 0 deg when the reference point is the north
    celestial pole, where ``delta_0 >= theta_0``).

    Parameters
    ----------
    ra, dec : `float`
        Reference point (CRVAL) in radians.

    Returns
    -------
    centre, east, north : `numpy.ndarray`
        Unit vectors of the reference point and of the directions of
        increasing intermediate world coordinates x and y.
    """
    c = _unit_vector(ra, dec)
    east = np.array([-math.sin(ra), math.cos(ra), 0.0])
    north = np.array([-math.sin(dec) * math.cos(ra), -math.sin(dec) * math.sin(ra), math.cos(dec)])
    if dec / _DEGREES >= 90.0:
        # LONPOLE defaults to 0 (not 180) when delta_0 >= theta_0 = 90 deg.
        east, north = -east, -north
    return c, east, north


def _project(
    basis: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
    ra: NDArray[np.float64],
    dec: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Gnomonic projection to standard coordinates (radians of tangent plane).

    Parameters
    ----------
    basis : `tuple` of `numpy.ndarray`
        Output of `_tangent_basis`.
    ra, dec : `numpy.ndarray`
        Sky positions in radians.

    Returns
    -------
    xi, eta : `numpy.ndarray`
        Tangent-plane coordinates (dimensionless); NaN for points on or
        behind the tangent plane's horizon.
    """
    c, e, n = basis
    cos_dec = np.cos(dec)
    px = cos_dec * np.cos(ra)
    py = cos_dec * np.sin(ra)
    pz = np.sin(dec)
    denom = px * c[0] + py * c[1] + pz * c[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(denom > 0.0, 1.0 / np.where(denom > 0.0, denom, 1.0), np.nan)
    xi = (px * e[0] + py * e[1] + pz * e[2]) * inv
    eta = (px * n[0] + py * n[1] + pz * n[2]) * inv
    return xi, eta


class _Box2D:
    """Minimal mirror of ``lsst.geom.Box2D`` (``include`` and ``Box2I`` EXPAND)."""

    def __init__(self) -> None:
        self.min = [math.nan, math.nan]
        self.max = [math.nan, math.nan]

    def is_empty(self) -> bool:
        return math.isnan(self.min[0])

    def _tweak_max(self, n: int) -> None:
        if self.max[n] < 0.0:
            self.max[n] *= 1.0 - _BOX2D_EPSILON
        elif self.max[n] > 0.0:
            self.max[n] *= 1.0 + _BOX2D_EPSILON
        else:
            self.max[n] = _BOX2D_EPSILON

    def include(self, x: float, y: float) -> None:
        point = (x, y)
        if self.is_empty():
            self.min = [x, y]
            self.max = [x, y]
            self._tweak_max(0)
            self._tweak_max(1)
            return
        for n in range(2):
            if point[n] < self.min[n]:
                self.min[n] = point[n]
            elif point[n] >= self.max[n]:
                self.max[n] = point[n]
                self._tweak_max(n)

    def to_box2i_expand(self) -> Box:
        """Convert to an integer box as ``Box2I(Box2D, EXPAND)`` does."""
        xmin = math.ceil(self.min[0] - 0.5)
        xmax = math.floor(self.max[0] + 0.5)
        ymin = math.ceil(self.min[1] - 0.5)
        ymax = math.floor(self.max[1] + 0.5)
        return xmin, ymin, xmax, ymax


@dataclass(frozen=True)
class TractInfo:
    """Geometry of one tract of a `RingsSkyMap`.

    Attributes
    ----------
    tract_id : `int`
        Tract id.
    ring : `int`
        Ring number: -1 for the south cap, ``0 .. num_rings - 1`` for rings,
        ``num_rings`` for the north cap.
    ctr_ra_deg, ctr_dec_deg : `float`
        Tract centre (CRVAL of the tract WCS), degrees.
    inner_ra_deg : `tuple` [`float`, `float`]
        (min, max) RA of the inner box, degrees, not wrapped (the minimum may
        be negative); ``(0, 360)`` for the caps.
    inner_dec_deg : `tuple` [`float`, `float`]
        (min, max) Dec of the inner box, degrees.
    crpix : `tuple` [`float`, `float`]
        LSST (0-based) pixel position of the tract centre in the tract frame.
    width, height : `int`
        Tract bounding box size in pixels; the box starts at (0, 0).
    num_patches : `tuple` [`int`, `int`]
        Number of patches in x and y.
    patch_inner : `int`
        Patch inner size in pixels (square patches).
    patch_border : `int`
        Patch border in pixels.
    pixel_scale_deg : `float`
        Pixel scale, degrees per pixel.
    clip_outer : `bool`
        Whether patch outer boxes are clipped to the tract box (legacy builder).
    index_in_ring : `int`
        Position of the tract in its ring (0 at ``raStart``; 0 for the caps).
    inner_box_rad : `tuple` [`float`, `float`, `float`, `float`]
        ``(raMin, raMax, decMin, decMax)`` of the inner box in radians, RA
        wrapped into ``[0, 2 pi)`` exactly as ``lsst.skymap`` does (caps:
        ``(0, 2 pi, ...)``); used to build `inner_region`.
    """

    tract_id: int
    ring: int
    ctr_ra_deg: float
    ctr_dec_deg: float
    inner_ra_deg: tuple[float, float]
    inner_dec_deg: tuple[float, float]
    crpix: tuple[float, float]
    width: int
    height: int
    num_patches: tuple[int, int]
    patch_inner: int
    patch_border: int
    pixel_scale_deg: float
    clip_outer: bool
    index_in_ring: int = 0
    inner_box_rad: tuple[float, float, float, float] = field(
        default=(0.0, 0.0, 0.0, 0.0), repr=False
    )

    # ------------------------------------------------------------------ WCS

    @cached_property
    def _basis(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        return _tangent_basis(self.ctr_ra_deg * _DEGREES, self.ctr_dec_deg * _DEGREES)

    def wcs(self) -> WCS:
        """Return the tract WCS as an astropy `~astropy.wcs.WCS`.

        Returns
        -------
        wcs : `astropy.wcs.WCS`
            TAN projection, CRVAL at the tract centre, ``CD = [[-s, 0], [0, s]]``,
            FITS ``CRPIX = crpix + 1``; default ``LONPOLE``.
        """
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = [f"RA---{_PROJECTION}", f"DEC--{_PROJECTION}"]
        wcs.wcs.cunit = ["deg", "deg"]
        wcs.wcs.radesys = "ICRS"
        wcs.wcs.crval = [self.ctr_ra_deg, self.ctr_dec_deg]
        wcs.wcs.crpix = [self.crpix[0] + 1.0, self.crpix[1] + 1.0]
        s = self.pixel_scale_deg
        wcs.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
        wcs.pixel_shape = (self.width, self.height)
        return wcs

    def sky_to_pixel(
        self, ra_deg: ArrayLike, dec_deg: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Project sky positions to tract pixel coordinates (LSST, 0-based).

        Parameters
        ----------
        ra_deg, dec_deg : array_like
            Sky positions in degrees.

        Returns
        -------
        x, y : `numpy.ndarray`
            Pixel positions; NaN for points 90 deg or more from the centre.
        """
        ra = np.asarray(ra_deg, dtype=np.float64) * _DEGREES
        dec = np.asarray(dec_deg, dtype=np.float64) * _DEGREES
        xi, eta = _project(self._basis, ra, dec)
        s = self.pixel_scale_deg
        x = self.crpix[0] - np.degrees(xi) / s
        y = self.crpix[1] + np.degrees(eta) / s
        return x, y

    def _pixel_to_vectors(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        xa = np.asarray(x, dtype=np.float64)
        ya = np.asarray(y, dtype=np.float64)
        s = self.pixel_scale_deg
        xi = np.radians(-(xa - self.crpix[0]) * s)
        eta = np.radians((ya - self.crpix[1]) * s)
        c, e, n = self._basis
        vec = c[:, None] + np.multiply.outer(e, xi.ravel()) + np.multiply.outer(n, eta.ravel())
        vec /= np.linalg.norm(vec, axis=0)
        return vec.reshape((3, *xa.shape))

    def pixel_to_sky(
        self, x: ArrayLike, y: ArrayLike
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Convert tract pixel coordinates (LSST, 0-based) to sky positions.

        Parameters
        ----------
        x, y : array_like
            Pixel positions.

        Returns
        -------
        ra_deg, dec_deg : `numpy.ndarray`
            Sky positions in degrees, RA in ``[0, 360)``.
        """
        vec = self._pixel_to_vectors(*np.broadcast_arrays(np.asarray(x), np.asarray(y)))
        ra = np.degrees(np.arctan2(vec[1], vec[0])) % 360.0
        ra = np.where(ra >= 360.0, 0.0, ra)
        dec = np.degrees(np.arctan2(vec[2], np.hypot(vec[0], vec[1])))
        return ra, dec

    # -------------------------------------------------------------- patches

    def __len__(self) -> int:
        return self.num_patches[0] * self.num_patches[1]

    def patch_index(self, sequential: int) -> tuple[int, int]:
        """Convert a sequential patch index to (x, y).

        Parameters
        ----------
        sequential : `int`
            Sequential patch index, ``nx * y + x``.

        Returns
        -------
        x, y : `int`
            Patch index pair.

        Raises
        ------
        IndexError
            Raised if the index is out of range.
        """
        nx, ny = self.num_patches
        if not 0 <= sequential < nx * ny:
            raise IndexError(f"patch {sequential} out of range [0, {nx * ny - 1}]")
        return sequential % nx, sequential // nx

    def patch_sequential(self, x: int, y: int) -> int:
        """Convert a patch index pair to the sequential index ``nx * y + x``.

        Parameters
        ----------
        x, y : `int`
            Patch index pair.

        Returns
        -------
        sequential : `int`
            Sequential patch index.
        """
        nx, ny = self.num_patches
        if not (0 <= x < nx and 0 <= y < ny):
            raise IndexError(f"patch ({x}, {y}) out of range")
        return nx * y + x

    def patch_inner_bbox(self, sequential: int) -> Box:
        """Return the inner bounding box of a patch.

        Parameters
        ----------
        sequential : `int`
            Sequential patch index.

        Returns
        -------
        bbox : `tuple` [`int`, `int`, `int`, `int`]
            ``(xmin, ymin, xmax, ymax)``, integer and inclusive.
        """
        x, y = self.patch_index(sequential)
        p = self.patch_inner
        return x * p, y * p, x * p + p - 1, y * p + p - 1

    def patch_outer_bbox(self, sequential: int) -> Box:
        """Return the outer bounding box of a patch.

        The inner box grown by the patch border; clipped to the tract box for
        the legacy builder, not clipped for the cells builder.

        Parameters
        ----------
        sequential : `int`
            Sequential patch index.

        Returns
        -------
        bbox : `tuple` [`int`, `int`, `int`, `int`]
            ``(xmin, ymin, xmax, ymax)``, integer and inclusive.
        """
        x0, y0, x1, y1 = self.patch_inner_bbox(sequential)
        b = self.patch_border
        x0, y0, x1, y1 = x0 - b, y0 - b, x1 + b, y1 + b
        if self.clip_outer:
            x0, y0 = max(x0, 0), max(y0, 0)
            x1, y1 = min(x1, self.width - 1), min(y1, self.height - 1)
        return x0, y0, x1, y1

    def _box_polygon(self, bbox: Box) -> sphgeom.ConvexPolygon:
        x0, y0, x1, y1 = bbox
        xs = np.array([x0 - 0.5, x1 + 0.5, x1 + 0.5, x0 - 0.5])
        ys = np.array([y0 - 0.5, y0 - 0.5, y1 + 0.5, y1 + 0.5])
        vec = self._pixel_to_vectors(xs, ys)
        return sphgeom.ConvexPolygon(
            [sphgeom.UnitVector3d(*(float(c) for c in vec[:, i])) for i in range(4)]
        )

    def patch_inner_polygon(self, sequential: int) -> sphgeom.ConvexPolygon:
        """Return the sky polygon of a patch's inner box.

        Parameters
        ----------
        sequential : `int`
            Sequential patch index.

        Returns
        -------
        polygon : `lsst.sphgeom.ConvexPolygon`
            The four corners of the floating box through the tract WCS.
        """
        return self._box_polygon(self.patch_inner_bbox(sequential))

    def patch_outer_polygon(self, sequential: int) -> sphgeom.ConvexPolygon:
        """Return the sky polygon of a patch's outer box.

        Parameters
        ----------
        sequential : `int`
            Sequential patch index.

        Returns
        -------
        polygon : `lsst.sphgeom.ConvexPolygon`
            The four corners of the floating box through the tract WCS.
        """
        return self._box_polygon(self.patch_outer_bbox(sequential))

    def outer_polygon(self) -> sphgeom.ConvexPolygon:
        """Return the sky polygon of the tract bounding box.

        Returns
        -------
        polygon : `lsst.sphgeom.ConvexPolygon`
            The tract's outer sky polygon (as registered in the Butler).
        """
        return self._box_polygon((0, 0, self.width - 1, self.height - 1))

    def inner_region(self) -> sphgeom.Region:
        """Return the inner region: the RA/Dec box as an `lsst.sphgeom.Box`.

        Returns
        -------
        region : `lsst.sphgeom.Box`
            For the caps, the box spanning all longitudes.
        """
        ra_min, ra_max, dec_min, dec_max = self.inner_box_rad
        return sphgeom.Box(
            sphgeom.LonLat(sphgeom.NormalizedAngle(ra_min), sphgeom.Angle(dec_min)),
            sphgeom.LonLat(sphgeom.NormalizedAngle(ra_max), sphgeom.Angle(dec_max)),
        )

    def contains_inner(self, ra_deg: float, dec_deg: float) -> bool:
        """Test whether a sky position lies in the tract's inner region.

        Parameters
        ----------
        ra_deg, dec_deg : `float`
            Sky position, degrees.

        Returns
        -------
        contained : `bool`
            `True` if inside (boundaries included).
        """
        lonlat = sphgeom.LonLat.fromRadians(ra_deg * _DEGREES, dec_deg * _DEGREES)
        return bool(self.inner_region().contains(sphgeom.UnitVector3d(lonlat)))


class RingsSkyMap:
    """Re-implementation of ``lsst.skymap.RingsSkyMap`` (version 1, TAN, rotation 0).

    Parameters
    ----------
    num_rings : `int`
        Number of Dec rings (excluding the two polar caps).
    builder : {"cells", "legacy"}
        Tract builder: ``CellTractBuilder`` defaults (patch inner 3000 px,
        border 200 px, outer boxes not clipped) or ``LegacyTractBuilder``
        defaults (inner 4000 px, border 100 px, outer boxes clipped).
    tract_overlap_deg : `float`
        ``tractOverlap`` config, degrees.
    pixel_scale_arcsec : `float`
        ``pixelScale`` config, arcseconds per pixel.
    ra_start_deg : `float`
        ``raStart`` config, degrees, in ``[0, 360)``.
    patch_inner : `int`, optional
        Patch inner size in pixels; by default the builder's (3000 cells, 4000 legacy). With the
        cells builder it must be whole 150 px cells.
    patch_border : `int`, optional
        Patch border in pixels; by default the builder's (200 cells, 100 legacy). With the cells
        builder it must be 50 px plus whole 150 px cells.
    """

    def __init__(
        self,
        num_rings: int = 120,
        builder: Literal["cells", "legacy"] = "cells",
        tract_overlap_deg: float = 1 / 60,
        pixel_scale_arcsec: float = 0.2,
        ra_start_deg: float = 0.0,
        patch_inner: int | None = None,
        patch_border: int | None = None,
    ) -> None:
        if num_rings <= 0:
            raise ValueError("num_rings must be positive")
        if builder not in ("cells", "legacy"):
            raise ValueError(f"unknown builder {builder!r}; use 'cells' or 'legacy'")
        if not 0.0 <= ra_start_deg < 360.0:
            raise ValueError("ra_start_deg must be in [0, 360)")
        if not pixel_scale_arcsec > 0.0:
            raise ValueError("pixel_scale_arcsec must be positive")
        if not tract_overlap_deg >= 0.0:
            raise ValueError("tract_overlap_deg must be >= 0")
        defaults = builder_defaults(builder)
        inner = int(defaults["patch_inner"] if patch_inner is None else patch_inner)
        border = int(defaults["patch_border"] if patch_border is None else patch_border)
        if inner <= 0 or border < 0:
            raise ValueError("patch_inner must be positive and patch_border >= 0")
        # The cells builder packs cell counts, not pixels, into the hash.
        self._cell_counts = cell_layout(inner, border) if builder == "cells" else (0, 0)
        self.num_rings = num_rings
        self.builder: Literal["cells", "legacy"] = builder
        self.tract_overlap_deg = float(tract_overlap_deg)
        self.pixel_scale_arcsec = float(pixel_scale_arcsec)
        self.ra_start_deg = float(ra_start_deg)
        self.ring_size_rad: float = math.pi / (num_rings + 1)
        ring_nums: list[int] = []
        for i in range(num_rings):
            start_dec = self.ring_size_rad * (i + 0.5) - 0.5 * math.pi
            stop_dec = start_dec + self.ring_size_rad
            dec = min(math.fabs(start_dec), math.fabs(stop_dec))
            ring_nums.append(int(2 * math.pi * math.cos(dec) / self.ring_size_rad) + 1)
        self._ring_nums = ring_nums
        self._ring_nums_arr = np.array(ring_nums, dtype=np.int64)
        self._ring_cumulative = np.cumsum(np.insert(self._ring_nums_arr, 0, 0))
        self._num_tracts = sum(ring_nums) + 2
        self._ra_start = self.ra_start_deg * _DEGREES
        self._first_ring_start = self.ring_size_rad * 0.5 - 0.5 * math.pi
        self.patch_inner = inner
        self.patch_border = border
        # ``Angle(pixelScale, arcseconds).asDegrees()`` as used by makeCdMatrix.
        self.pixel_scale_deg = (self.pixel_scale_arcsec * _ARCSECONDS) / _DEGREES
        self._cache: dict[int, TractInfo] = {}
        self._cover_radius: float | None = None

    # ------------------------------------------------------------- container

    def __len__(self) -> int:
        return self._num_tracts

    def __iter__(self) -> Iterator[TractInfo]:
        for i in range(self._num_tracts):
            yield self[i]

    def __getitem__(self, tract_id: int) -> TractInfo:
        tract_id = int(tract_id)
        if tract_id < 0 or tract_id >= self._num_tracts:
            raise IndexError(f"tract {tract_id} out of range [0, {self._num_tracts - 1}]")
        tract = self._cache.get(tract_id)
        if tract is None:
            tract = self._generate(tract_id)
            self._cache[tract_id] = tract
        return tract

    # ----------------------------------------------------------------- rings

    def ring_tract_count(self, ring: int) -> int:
        """Return the number of tracts in a ring (1 for the caps).

        Parameters
        ----------
        ring : `int`
            Ring number, -1 .. num_rings.

        Returns
        -------
        count : `int`
            Number of tracts.
        """
        if ring in (-1, self.num_rings):
            return 1
        if not 0 <= ring < self.num_rings:
            raise IndexError(f"ring {ring} out of range")
        return self._ring_nums[ring]

    def ring_first_tract(self, ring: int) -> int:
        """Return the id of the first tract (at ``raStart``) of a ring.

        Parameters
        ----------
        ring : `int`
            Ring number, -1 .. num_rings.

        Returns
        -------
        tract_id : `int`
            Tract id.
        """
        if ring == -1:
            return 0
        if ring == self.num_rings:
            return self._num_tracts - 1
        if not 0 <= ring < self.num_rings:
            raise IndexError(f"ring {ring} out of range")
        return int(self._ring_cumulative[ring]) + 1

    def ring_indices(self, tract_id: int) -> tuple[int, int]:
        """Return (ring, index within ring) of a tract (``getRingIndices``, version 1).

        Parameters
        ----------
        tract_id : `int`
            Tract id.

        Returns
        -------
        ring, index : `int`
            Ring number (-1 / num_rings for the caps) and index in the ring.
        """
        if tract_id == 0:
            return -1, 0
        if tract_id == self._num_tracts - 1:
            return self.num_rings, 0
        if tract_id < 0 or tract_id >= self._num_tracts:
            raise IndexError(f"tract {tract_id} out of range [0, {self._num_tracts - 1}]")
        ring = int(np.searchsorted(self._ring_cumulative, tract_id - 1, side="right")) - 1
        return ring, tract_id - 1 - int(self._ring_cumulative[ring])

    def ring_of_dec(self, dec_deg: ArrayLike) -> NDArray[np.int64]:
        """Return the ring number of declinations (as ``findTractIdArray``).

        Parameters
        ----------
        dec_deg : array_like
            Declinations in degrees.

        Returns
        -------
        ring : `numpy.ndarray`
            -1 for the south cap, num_rings for the north cap.
        """
        dec = np.deg2rad(np.asarray(dec_deg, dtype=np.float64))
        frs = self._first_ring_start
        ring = np.zeros(dec.shape, dtype=np.int64)
        mid = (dec >= frs) & (dec <= -frs)
        with np.errstate(invalid="ignore"):
            ring = np.where(mid, ((dec - frs) / self.ring_size_rad).astype(np.int64), ring)
        ring = np.where(dec < frs, -1, ring)
        ring = np.where(dec > -frs, self.num_rings, ring)
        return np.minimum(ring, self.num_rings)

    # ---------------------------------------------------------------- tracts

    def _generate(self, index: int) -> TractInfo:
        """Build a tract exactly as ``RingsSkyMap.generateTract`` + ``ExplicitTractInfo``."""
        ring, k = self.ring_indices(index)
        rs = self.ring_size_rad
        if ring == -1:
            ra, dec = 0.0, -0.5 * math.pi
            ra_min, ra_max = 0.0, 2.0 * np.pi
            dec_min = -np.pi / 2.0
            dec_max = -np.pi / 2.0 + (ring + 1.5) * rs
            ra_min_u, ra_max_u = 0.0, 360.0
        elif ring == self.num_rings:
            ra, dec = 0.0, 0.5 * math.pi
            ra_min, ra_max = 0.0, 2.0 * np.pi
            dec_min = -np.pi / 2.0 + (ring + 0.5) * rs
            dec_max = np.pi / 2.0
            ra_min_u, ra_max_u = 0.0, 360.0
        else:
            n = self._ring_nums[ring]
            dec = rs * (ring + 1) - 0.5 * math.pi
            ra = _wrap((2 * math.pi * k / n) + self._ra_start)
            dec_min = -np.pi / 2.0 + (ring + 0.5) * rs
            dec_max = -np.pi / 2.0 + (ring + 1.5) * rs
            delta_start = (k - 0.5) * 2.0 * np.pi / n
            delta_stop = (k + 0.5) * 2.0 * np.pi / n
            ra_min = _wrap(self._ra_start + delta_start)
            ra_max = _wrap(self._ra_start + delta_stop)
            ra_min_u = (self._ra_start + delta_start) / _DEGREES
            ra_max_u = (self._ra_start + delta_stop) / _DEGREES

        # ExplicitTractInfo._minimumBoundingBox: four points at radius +
        # tractOverlap from the centre, through the WCS with crpix (0, 0).
        radius = 0.5 * rs
        amount = radius + self.tract_overlap_deg * _DEGREES
        cvec, evec, nvec = (
            (float(v[0]), float(v[1]), float(v[2])) for v in _tangent_basis(ra, dec)
        )
        s = self.pixel_scale_deg
        box = _Box2D()
        for i in range(4):
            bearing = (i * 90) * _DEGREES
            p = _offset(ra, dec, bearing, amount)
            denom = _dot(p, cvec)
            xi = _dot(p, evec) / denom
            eta = _dot(p, nvec) / denom
            box.include(-math.degrees(xi) / s, math.degrees(eta) / s)
        xmin, ymin, xmax, ymax = box.to_box2i_expand()

        # BaseTractBuilder.setupPatches: grow to whole patches, keeping the centre.
        bbox_min = [xmin, ymin]
        bbox_dim = [xmax - xmin + 1, ymax - ymin + 1]
        num_patches = [0, 0]
        inner = self.patch_inner
        for i in range(2):
            num = (bbox_dim[i] + inner - 1) // inner
            delta = inner * num - bbox_dim[i]
            if delta > 0:
                bbox_dim[i] = inner * num
                bbox_min[i] -= delta // 2
            num_patches[i] = num

        # TractInfo._finalOrientation: shift so the bbox starts at (0, 0).
        crpix = (float(0 - bbox_min[0]), float(0 - bbox_min[1]))
        return TractInfo(
            tract_id=index,
            ring=ring,
            ctr_ra_deg=ra / _DEGREES,
            ctr_dec_deg=dec / _DEGREES,
            inner_ra_deg=(ra_min_u, ra_max_u),
            inner_dec_deg=(dec_min / _DEGREES, dec_max / _DEGREES),
            crpix=crpix,
            width=bbox_dim[0],
            height=bbox_dim[1],
            num_patches=(num_patches[0], num_patches[1]),
            patch_inner=inner,
            patch_border=self.patch_border,
            pixel_scale_deg=s,
            clip_outer=self.builder == "legacy",
            index_in_ring=k,
            inner_box_rad=(ra_min, ra_max, dec_min, dec_max),
        )

    def _ra_to_index(self, ra_rad: float, ring: int) -> int:
        if ring in (-1, self.num_rings):
            return 0
        n = self._ring_nums[ring]
        k = int(_wrap(ra_rad - self._ra_start) / (2 * math.pi / n) + 0.5)
        return 0 if k == n else k

    def find_tract(self, ra_deg: float, dec_deg: float) -> int:
        """Return the id of the tract whose inner region contains a position.

        Mirrors ``RingsSkyMap.findTract``.

        Parameters
        ----------
        ra_deg, dec_deg : `float`
            Sky position, degrees.

        Returns
        -------
        tract_id : `int`
            Tract id.
        """
        dec = float(dec_deg) * _DEGREES
        ra = _wrap(float(ra_deg) * _DEGREES)
        frs = self._first_ring_start
        if dec < frs:
            return 0
        if dec > -frs:
            return self._num_tracts - 1
        ring = int((dec - frs) / self.ring_size_rad)
        if ring >= self.num_rings:
            return self._num_tracts - 1
        k = self._ra_to_index(ra, ring)
        return int(self._ring_cumulative[ring]) + k + 1

    def find_tracts(self, ra_deg: ArrayLike, dec_deg: ArrayLike) -> NDArray[np.int64]:
        """Vectorised `find_tract` (mirrors ``findTractIdArray`` with degrees).

        Parameters
        ----------
        ra_deg, dec_deg : array_like
            Sky positions, degrees (broadcast together).

        Returns
        -------
        tract_ids : `numpy.ndarray`
            Tract ids, same shape as the broadcast inputs.
        """
        ra_b, dec_b = np.broadcast_arrays(
            np.asarray(ra_deg, dtype=np.float64), np.asarray(dec_deg, dtype=np.float64)
        )
        ra = np.deg2rad(ra_b)
        ring = self.ring_of_dec(dec_b)
        in_ring = (ring >= 0) & (ring < self.num_rings)
        safe_ring = np.where(in_ring, ring, 0)
        n = self._ring_nums_arr[safe_ring]
        delta = np.mod(ra - self._ra_start, 2.0 * np.pi)
        k = (delta / (2.0 * np.pi / n) + 0.5).astype(np.int64)
        k = np.where(k == n, 0, k)
        ids = self._ring_cumulative[safe_ring] + k + 1
        ids = np.where(ring == -1, 0, ids)
        ids = np.where(ring >= self.num_rings, self._num_tracts - 1, ids)
        return np.asarray(ids, dtype=np.int64)

    # --------------------------------------------------------- region search

    def _tract_cover_radius(self) -> float:
        """Angular radius (rad) around a tract centre covering its outer box and patch boxes."""
        if self._cover_radius is None:
            radius = 0.0
            for tid in (0, 1, self._num_tracts - 1):
                t = self[tid]
                grow = 0 if t.clip_outer else t.patch_border
                grow += 2  # safety margin, pixels
                dx = max(t.crpix[0] + 0.5 + grow, t.width - 0.5 + grow - t.crpix[0])
                dy = max(t.crpix[1] + 0.5 + grow, t.height - 0.5 + grow - t.crpix[1])
                tan_r = math.radians(math.hypot(dx, dy) * t.pixel_scale_deg)
                radius = max(radius, math.atan(tan_r))
            self._cover_radius = radius
        return self._cover_radius

    def tracts_near(self, ra_deg: float, dec_deg: float, radius_deg: float) -> list[int]:
        """Return tracts whose outer region could intersect a circle.

        A conservative superset: every tract whose outer bounding-box polygon
        (or, for the cells builder, any unclipped patch outer box) intersects
        the circle is returned, found through ring and RA ranges of tract
        centres within ``radius + tract covering radius``.

        Parameters
        ----------
        ra_deg, dec_deg : `float`
            Circle centre, degrees.
        radius_deg : `float`
            Circle radius, degrees.

        Returns
        -------
        tract_ids : `list` [`int`]
            Sorted tract ids.
        """
        margin = 1e-9
        reach = radius_deg * _DEGREES + self._tract_cover_radius() + margin
        dec = dec_deg * _DEGREES
        ra = ra_deg * _DEGREES
        result: list[int] = []
        if reach >= math.pi:
            return list(range(self._num_tracts))
        if dec + _HALFPI <= reach:
            result.append(0)
        ring_lo = int(self.ring_of_dec(math.degrees(max(dec - reach, -_HALFPI)))) - 1
        ring_hi = int(self.ring_of_dec(math.degrees(min(dec + reach, _HALFPI)))) + 1
        sin_d, cos_d = math.sin(dec), math.cos(dec)
        cos_reach = math.cos(reach)
        for ring in range(max(ring_lo, 0), min(ring_hi, self.num_rings - 1) + 1):
            n = self._ring_nums[ring]
            dec_r = self.ring_size_rad * (ring + 1) - 0.5 * math.pi
            denom = cos_d * math.cos(dec_r)
            first = int(self._ring_cumulative[ring]) + 1
            if denom < 1e-15:
                if abs(dec - dec_r) <= reach:
                    result.extend(range(first, first + n))
                continue
            q = (cos_reach - sin_d * math.sin(dec_r)) / denom
            if q > 1.0:
                continue
            if q <= -1.0:
                result.extend(range(first, first + n))
                continue
            half = math.acos(q) + margin
            step = 2.0 * math.pi / n
            k_lo = math.ceil((ra - half - self._ra_start) / step - margin)
            k_hi = math.floor((ra + half - self._ra_start) / step + margin)
            if k_hi - k_lo + 1 >= n:
                result.extend(range(first, first + n))
            else:
                result.extend(first + (k % n) for k in range(k_lo, k_hi + 1))
        if _HALFPI - dec <= reach:
            result.append(self._num_tracts - 1)
        return sorted(set(result))

    def find_patches(self, region: sphgeom.ConvexPolygon) -> list[tuple[int, int]]:
        """Return (tract, patch) pairs whose outer patch polygon overlaps a region.

        Brute force over the patches of the candidate tracts (from
        `tracts_near` on the region's bounding circle); intended as a
        reference implementation.

        Parameters
        ----------
        region : `lsst.sphgeom.ConvexPolygon`
            Sky region (any `lsst.sphgeom.Region` works).

        Returns
        -------
        patches : `list` [`tuple` [`int`, `int`]]
            Sorted ``(tract_id, sequential_patch)`` pairs.
        """
        circle = region.getBoundingCircle()
        centre = sphgeom.LonLat(circle.getCenter())
        ra_deg = centre.getLon().asDegrees()
        dec_deg = centre.getLat().asDegrees()
        radius_deg = circle.getOpeningAngle().asDegrees()
        out: list[tuple[int, int]] = []
        for tract_id in self.tracts_near(ra_deg, dec_deg, radius_deg):
            tract = self[tract_id]
            for seq in range(len(tract)):
                poly = tract.patch_outer_polygon(seq)
                if not poly.relate(region) & sphgeom.DISJOINT:
                    out.append((tract_id, seq))
        return out

    # ------------------------------------------------------------------ hash

    def hash(self) -> bytes:
        """Return the SHA1 digest identifying this sky map, as ``BaseSkyMap.getSha1``.

        Returns
        -------
        sha1 : `bytes`
            20-byte digest of the class name, the packed tract-builder config
            and the ring parameters (same bytes as ``lsst.skymap``).
        """
        sha1 = hashlib.sha1()
        sha1.update(b"RingsSkyMap")
        projection = _PROJECTION.encode("ascii")
        if self.builder == "cells":
            packed = struct.pack(
                "<iiiiidd3sd",
                CELL_INNER,
                CELL_INNER,
                CELL_BORDER,
                self._cell_counts[0],
                self._cell_counts[1],
                self.tract_overlap_deg,
                self.pixel_scale_arcsec,
                projection,
                _ROTATION,
            )
        else:
            packed = struct.pack(
                "<iiidd3sd",
                self.patch_inner,
                self.patch_inner,
                self.patch_border,
                self.tract_overlap_deg,
                self.pixel_scale_arcsec,
                projection,
                _ROTATION,
            )
        sha1.update(packed)
        sha1.update(struct.pack("<id", self.num_rings, self.ra_start_deg))
        return sha1.digest()

    def hash_hex(self) -> str:
        """Return `hash` as 40 lower-case hex digits (as ``butler`` tools print it).

        Returns
        -------
        sha1 : `str`
        """
        return self.hash().hex()

    @property
    def config(self) -> SkyMapConfig:
        """The resolved config this sky map was built from."""
        return SkyMapConfig(
            num_rings=self.num_rings,
            builder=self.builder,
            pixel_scale_arcsec=self.pixel_scale_arcsec,
            tract_overlap_deg=self.tract_overlap_deg,
            ra_start_deg=self.ra_start_deg,
            patch_inner=self.patch_inner,
            patch_border=self.patch_border,
        )

    @classmethod
    def from_config(cls, config: SkyMapConfig) -> RingsSkyMap:
        """Build a sky map from a resolved config.

        Parameters
        ----------
        config : `SkyMapConfig`
            E.g. from `~drp_campaign.model.skyconfig.resolve_skymap`.

        Returns
        -------
        sky : `RingsSkyMap`
        """
        return cls(
            num_rings=config.num_rings,
            builder=config.builder,
            tract_overlap_deg=config.tract_overlap_deg,
            pixel_scale_arcsec=config.pixel_scale_arcsec,
            ra_start_deg=config.ra_start_deg,
            patch_inner=config.patch_inner,
            patch_border=config.patch_border,
        )


@lru_cache(maxsize=8)
def _shared(config: SkyMapConfig) -> RingsSkyMap:
    # One instance per resolved config: a spec that spells out a default and one that leaves it
    # out get the same object (and its tract cache).
    return RingsSkyMap.from_config(config)


def sky_map(
    num_rings: int = 120,
    builder: str = "cells",
    *,
    pixel_scale_arcsec: float | None = None,
    tract_overlap_deg: float | None = None,
    ra_start_deg: float | None = None,
    patch_inner: int | None = None,
    patch_border: int | None = None,
) -> RingsSkyMap:
    """Return a shared `RingsSkyMap` for these parameters (one per process).

    Tracts and their patch boxes are cached inside a sky map, so code that plans, registers or
    queries the same sky should share one instance rather than build its own. Code holding a
    spec should call `sky_map_for` instead, so that the spec's whole config reaches the geometry.

    Parameters
    ----------
    num_rings : `int`
        Number of rings.
    builder : `str`
        ``cells`` or ``legacy``.
    pixel_scale_arcsec, tract_overlap_deg, ra_start_deg : `float`, optional
        ``pixelScale`` (arcsec), ``tractOverlap`` (deg), ``raStart`` (deg); `None`: the default.
    patch_inner, patch_border : `int`, optional
        Patch inner size and border, pixels; `None`: the builder's default.

    Returns
    -------
    sky : `RingsSkyMap`
    """
    return _shared(
        resolve_config(
            num_rings,
            builder,
            pixel_scale=pixel_scale_arcsec,
            tract_overlap=tract_overlap_deg,
            ra_start=ra_start_deg,
            patch_inner=patch_inner,
            patch_border=patch_border,
        )
    )


def sky_map_for(skymap: SkymapLike) -> RingsSkyMap:
    """Return the shared `RingsSkyMap` of a spec's skymap, with its whole config.

    Parameters
    ----------
    skymap : `~drp_campaign.model.spec.SkymapSpec`
        Usually ``spec.skymap``; keys left out mean the builder's defaults.

    Returns
    -------
    sky : `RingsSkyMap`
    """
    return _shared(resolve_skymap(skymap))


def skymap_hash(skymap: SkymapLike) -> str:
    """Return the lsst.skymap SHA1 of a spec's skymap as 40 hex digits.

    This is what a Butler registry stores in the ``skymap`` record's ``hash`` (as bytes).

    Parameters
    ----------
    skymap : `~drp_campaign.model.spec.SkymapSpec`
        Usually ``spec.skymap``.

    Returns
    -------
    sha1 : `str`
        E.g. ``e29fe9f1008e359f36a3677e7d69cc439376d1e6`` for ``hsc_rings_v1``.
    """
    return sky_map_for(skymap).hash_hex()
