"""Camera focal planes and their projection onto the sky.

The model is deliberately simple and exact in its own terms: a detector is a rectangle in the focal
plane (millimetres), the optics are a pure gnomonic (TAN) projection with a constant plate scale and
no distortion.  Focal-plane millimetres become angles through the plate scale, are rotated by the
visit's sky rotation into tangent-plane standard coordinates (xi towards east, eta towards north)
and are deprojected gnomonically around the boresight.  Because a gnomonic projection maps straight
lines to great circles, the four projected corners of a detector bound exactly the detector's sky
region, so the `lsst.sphgeom.ConvexPolygon` of those corners *is* the detector region (no
sampling of edges is needed).

Rotation convention: ``rotation_deg`` is the position angle of the focal-plane +y axis on the sky,
measured from north through east.  At rotation 0, +x points east and +y north; at rotation 90, +y
points east and +x south.

This module is pure: numpy, `lsst.sphgeom` and the standard library only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

__all__ = [
    "INSTRUMENTS",
    "Detector",
    "FocalPlane",
    "focal_plane",
    "polygons_from_corners",
]

#: Instruments `focal_plane` knows about.
INSTRUMENTS: tuple[str, ...] = ("LSSTCam", "LSSTCam-imSim", "LSSTComCam")

# LSSTCam geometry (DESIGN section 3; LCA-13381 / obs_lsst camera description).
_RAFT_PITCH_MM = 127.0
_CCD_PITCH_MM = 42.25
# Imaging area of an LSST CCD: 4072 x 4000 pixels of 10 um.
_CCD_WIDTH_MM = 4072 * 0.010
_CCD_HEIGHT_MM = 4000 * 0.010
_PLATE_SCALE_ARCSEC_PER_MM = 20.006
# The four corner rafts hold wavefront and guider sensors, not science CCDs.
_CORNER_RAFTS = frozenset({"R00", "R04", "R40", "R44"})

_ARCSEC_TO_RAD = math.pi / (180.0 * 3600.0)


@dataclass(frozen=True)
class Detector:
    """One science detector of a focal plane.

    Attributes
    ----------
    id : int
        Detector id as used by the Butler (obs_lsst numbering for LSSTCam).
    name : str
        Full name, ``"{raft}_{sensor}"``, e.g. ``"R22_S11"``.
    raft : str
        Raft name, ``"R{row}{col}"``.
    sensor : str
        Sensor name within the raft, ``"S{row}{col}"``.
    corners_mm : tuple of (float, float)
        The four corners of the imaging area in focal-plane millimetres, counter-clockwise,
        starting at the (min x, min y) corner.
    """

    id: int
    name: str
    raft: str
    sensor: str
    corners_mm: tuple[tuple[float, float], ...]

    @property
    def center_mm(self) -> tuple[float, float]:
        """Centre of the imaging area in focal-plane millimetres."""
        xs = [c[0] for c in self.corners_mm]
        ys = [c[1] for c in self.corners_mm]
        return (sum(xs) / len(xs), sum(ys) / len(ys))

    @property
    def area_mm2(self) -> float:
        """Area of the imaging area in mm^2 (shoelace formula, positive for CCW corners)."""
        pts = self.corners_mm
        twice = 0.0
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
            twice += x0 * y1 - x1 * y0
        return 0.5 * twice


@dataclass(frozen=True)
class FocalPlane:
    """A set of detectors and the plate scale that maps them onto the sky.

    Parameters
    ----------
    name : str
        Instrument name.
    detectors : tuple of `Detector`
        Detectors, sorted by id.
    plate_scale_arcsec_per_mm : float
        Constant plate scale of the (distortion-free) gnomonic optics.
    """

    name: str
    detectors: tuple[Detector, ...]
    plate_scale_arcsec_per_mm: float
    # Derived arrays, cached once: the projection is called for 100,000s of visits.
    _corners_mm: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)
    _centers_mm: npt.NDArray[np.float64] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ValueError(f"focal plane {self.name!r} has no detectors")
        ids = [d.id for d in self.detectors]
        if len(set(ids)) != len(ids):
            raise ValueError(f"focal plane {self.name!r} has duplicate detector ids")
        if any(len(d.corners_mm) != 4 for d in self.detectors):
            raise ValueError(f"focal plane {self.name!r}: every detector needs exactly 4 corners")
        corners = np.array([d.corners_mm for d in self.detectors], dtype=np.float64)
        corners.setflags(write=False)
        centers = corners.mean(axis=1)
        centers.setflags(write=False)
        # frozen dataclass: set the caches through object.__setattr__.
        object.__setattr__(self, "_corners_mm", corners)
        object.__setattr__(self, "_centers_mm", centers)

    # ------------------------------------------------------------------ geometry in the focal plane
    @property
    def n_detectors(self) -> int:
        """Number of detectors."""
        return len(self.detectors)

    @property
    def detector_ids(self) -> npt.NDArray[np.int64]:
        """Detector ids in the order used by every array this class returns."""
        return np.array([d.id for d in self.detectors], dtype=np.int64)

    @property
    def corners_mm(self) -> npt.NDArray[np.float64]:
        """Read-only array (n_detectors, 4, 2) of detector corners in focal-plane mm."""
        return self._corners_mm

    @property
    def _mm_to_rad(self) -> float:
        return self.plate_scale_arcsec_per_mm * _ARCSEC_TO_RAD

    @property
    def max_radius_deg(self) -> float:
        """Largest angular distance of any detector corner from the boresight, in degrees.

        Measured on the sky: the gnomonic deprojection turns a tangent-plane radius ``r``
        (radians) into the angle ``atan(r)``.
        """
        r_mm = float(np.hypot(self._corners_mm[..., 0], self._corners_mm[..., 1]).max())
        return math.degrees(math.atan(r_mm * self._mm_to_rad))

    @property
    def area_deg2(self) -> float:
        """Summed imaging area of all detectors in square degrees (tangent-plane approximation).

        The gnomonic distortion at 2 degrees from the boresight changes this by ~0.1 %.
        """
        total_mm2 = sum(d.area_mm2 for d in self.detectors)
        return total_mm2 * (self.plate_scale_arcsec_per_mm / 3600.0) ** 2

    def detector(self, key: int | str) -> Detector:
        """Return a detector by id or by name.

        Parameters
        ----------
        key : int or str
            Detector id (e.g. ``94``) or name (e.g. ``"R22_S11"``).

        Returns
        -------
        detector : `Detector`

        Raises
        ------
        KeyError
            If no detector has that id or name.
        """
        for det in self.detectors:
            if det.id == key or det.name == key:
                return det
        raise KeyError(f"{self.name} has no detector {key!r}")

    # ------------------------------------------------------------------ projection onto the sky
    def _project_many(
        self,
        points_mm: npt.NDArray[np.float64],
        ra: npt.ArrayLike,
        dec: npt.ArrayLike,
        rot: npt.ArrayLike,
    ) -> npt.NDArray[np.float64]:
        """Project focal-plane points for many visits.

        ``points_mm`` has shape (..., 2); the result has shape (n_visits, ..., 2) holding
        [ra, dec] in degrees with ra in [0, 360).
        """
        # Normalising the boresight RA first bounds every output RA to (-180, 540) degrees, so one
        # conditional add or subtract replaces a (slow) floating-point modulo per point.
        ra0 = np.radians(np.mod(np.atleast_1d(np.asarray(ra, dtype=np.float64)), 360.0))
        dec0 = np.radians(np.atleast_1d(np.asarray(dec, dtype=np.float64)))
        theta = np.radians(np.atleast_1d(np.asarray(rot, dtype=np.float64)))
        if not (ra0.ndim == dec0.ndim == theta.ndim == 1) or not (
            ra0.shape == dec0.shape == theta.shape
        ):
            raise ValueError(
                "ra, dec and rotation must be 1-d arrays of the same length, got shapes "
                f"{ra0.shape}, {dec0.shape}, {theta.shape}"
            )
        n_visits = ra0.shape[0]
        pts_shape = points_mm.shape[:-1]
        # Focal-plane mm -> tangent-plane radians, flattened to (P,) for plain 2-d broadcasting.
        x = points_mm[..., 0].reshape(-1) * self._mm_to_rad
        y = points_mm[..., 1].reshape(-1) * self._mm_to_rad

        out = np.empty((n_visits, x.shape[0], 2), dtype=np.float64)
        # Chunks of visits keep the (chunk, P) temporaries small and reused instead of
        # page-faulting in fresh arrays of the full output size; measured ~2x faster.
        step = max(1, _CHUNK_POINTS // max(1, x.shape[0]))
        for start in range(0, n_visits, step):
            sl = slice(start, min(start + step, n_visits))
            _project_chunk(x, y, ra0[sl], dec0[sl], theta[sl], out[sl])
        return out.reshape((n_visits, *pts_shape, 2))

    def corners_sky_many(
        self, ra: npt.ArrayLike, dec: npt.ArrayLike, rot: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        """Sky positions of every detector corner for many visits at once.

        Parameters
        ----------
        ra, dec : array_like
            Boresight coordinates in degrees, shape (n_visits,).
        rot : array_like
            Sky rotation angles in degrees (position angle of focal-plane +y, north through east),
            shape (n_visits,).

        Returns
        -------
        corners : `numpy.ndarray`
            Shape (n_visits, n_detectors, 4, 2): [ra, dec] in degrees, ra in [0, 360), detectors
            in the order of `detectors`, corners in the order of `Detector.corners_mm`.

        Notes
        -----
        Memory is about 8 * 8 * n_detectors bytes per visit (12 kB for LSSTCam) plus a few
        temporaries of half that size; chunk the visits for very large surveys.
        """
        return self._project_many(self._corners_mm, ra, dec, rot)

    def detector_corners_sky(
        self, ra_deg: float, dec_deg: float, rotation_deg: float
    ) -> npt.NDArray[np.float64]:
        """Sky positions of every detector corner for one visit.

        Parameters
        ----------
        ra_deg, dec_deg : float
            Boresight in degrees.
        rotation_deg : float
            Sky rotation angle in degrees (see the module docstring).

        Returns
        -------
        corners : `numpy.ndarray`
            Shape (n_detectors, 4, 2): [ra, dec] in degrees.
        """
        return self.corners_sky_many([ra_deg], [dec_deg], [rotation_deg])[0]

    def detector_centers_sky(
        self, ra_deg: float, dec_deg: float, rotation_deg: float
    ) -> npt.NDArray[np.float64]:
        """Sky positions of every detector centre for one visit.

        Parameters
        ----------
        ra_deg, dec_deg : float
            Boresight in degrees.
        rotation_deg : float
            Sky rotation angle in degrees.

        Returns
        -------
        centers : `numpy.ndarray`
            Shape (n_detectors, 2): [ra, dec] in degrees.
        """
        return self._project_many(self._centers_mm, [ra_deg], [dec_deg], [rotation_deg])[0]

    def detector_polygons(
        self, ra_deg: float, dec_deg: float, rotation_deg: float
    ) -> list[ConvexPolygon]:
        """Exact sky regions of every detector for one visit.

        Parameters
        ----------
        ra_deg, dec_deg : float
            Boresight in degrees.
        rotation_deg : float
            Sky rotation angle in degrees.

        Returns
        -------
        polygons : list of `lsst.sphgeom.ConvexPolygon`
            One polygon per detector, in the order of `detectors`.  Edges are great circles,
            exactly the gnomonic images of the detector edges.
        """
        corners = self.detector_corners_sky(ra_deg, dec_deg, rotation_deg)
        return polygons_from_corners(corners)


_CHUNK_POINTS = 1 << 16


def _project_chunk(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    ra0: npt.NDArray[np.float64],
    dec0: npt.NDArray[np.float64],
    theta: npt.NDArray[np.float64],
    out: npt.NDArray[np.float64],
) -> None:
    """Project tangent-plane points (x, y radians, shape (P,)) for a chunk of visits into out.

    ``ra0`` (in [0, 2 pi)), ``dec0`` and ``theta`` are radians, shape (V,); ``out`` has shape
    (V, P, 2) and receives [ra, dec] in degrees with ra in [0, 360).
    """
    # Per-visit scalars as (V, 1) columns broadcasting against the (P,) points.
    cos_t = np.cos(theta)[:, None]
    sin_t = np.sin(theta)[:, None]
    sin_d0 = np.sin(dec0)[:, None]
    cos_d0 = np.cos(dec0)[:, None]

    # Rotate so that focal-plane +y has position angle theta (north through east).
    xi = x * cos_t + y * sin_t
    eta = y * cos_t - x * sin_t

    # Inverse gnomonic projection about (ra0, dec0).  atan2 for the RA offset because the
    # denominator changes sign for fields that contain a pole.
    denom = cos_d0 - eta * sin_d0
    lon = np.arctan2(xi, denom)
    lon += ra0[:, None]
    num = eta
    num *= cos_d0
    num += sin_d0
    lat = np.arctan2(num, np.hypot(xi, denom))
    lon_deg = out[..., 0]
    np.degrees(lon, out=lon_deg)
    np.degrees(lat, out=out[..., 1])
    lon_deg[lon_deg < 0.0] += 360.0
    lon_deg[lon_deg >= 360.0] -= 360.0


def polygons_from_corners(corners: npt.NDArray[np.float64]) -> list[ConvexPolygon]:
    """Build sphgeom polygons from an array of [ra, dec] corners.

    Parameters
    ----------
    corners : `numpy.ndarray`
        Shape (n, k, 2), [ra, dec] in degrees, k >= 3 corners per polygon.

    Returns
    -------
    polygons : list of `lsst.sphgeom.ConvexPolygon`
    """
    # Built from LonLat degrees (not from intermediate vectors) so that any caller holding only
    # the corner table, e.g. read back from Parquet, reconstructs bit-identical regions.
    return [
        ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(a), float(d))) for a, d in poly])
        for poly in corners.tolist()
    ]


def _ccd_corners(cx: float, cy: float) -> tuple[tuple[float, float], ...]:
    """Counter-clockwise corners of a CCD imaging area centred at (cx, cy) mm."""
    hw = _CCD_WIDTH_MM / 2.0
    hh = _CCD_HEIGHT_MM / 2.0
    return (
        (cx - hw, cy - hh),
        (cx + hw, cy - hh),
        (cx + hw, cy + hh),
        (cx - hw, cy + hh),
    )


def _raft_detectors(raft: str, row: int, col: int, first_id: int) -> list[Detector]:
    """The 3x3 science CCDs of one raft, ids ``first_id + 3*sy + sx``."""
    raft_x = (col - 2) * _RAFT_PITCH_MM
    raft_y = (row - 2) * _RAFT_PITCH_MM
    dets = []
    for sy in range(3):
        for sx in range(3):
            sensor = f"S{sy}{sx}"
            cx = raft_x + (sx - 1) * _CCD_PITCH_MM
            cy = raft_y + (sy - 1) * _CCD_PITCH_MM
            dets.append(
                Detector(
                    id=first_id + 3 * sy + sx,
                    name=f"{raft}_{sensor}",
                    raft=raft,
                    sensor=sensor,
                    corners_mm=_ccd_corners(cx, cy),
                )
            )
    return dets


def _lsstcam(name: str) -> FocalPlane:
    # Science rafts in row-major order, corners excluded: R01, R02, R03, R10, ..., R43.  The raft
    # index times 9 plus the sensor index is obs_lsst's LSSTCam detector id (R22_S11 -> 94).
    dets: list[Detector] = []
    raft_index = 0
    for row in range(5):
        for col in range(5):
            raft = f"R{row}{col}"
            if raft in _CORNER_RAFTS:
                continue
            dets.extend(_raft_detectors(raft, row, col, raft_index * 9))
            raft_index += 1
    return FocalPlane(name, tuple(dets), _PLATE_SCALE_ARCSEC_PER_MM)


def _lsstcomcam(name: str) -> FocalPlane:
    # ComCam is a single LSSTCam-type raft mounted at the centre, in the R22 position.
    return FocalPlane(name, tuple(_raft_detectors("R22", 2, 2, 0)), _PLATE_SCALE_ARCSEC_PER_MM)


@functools.cache
def focal_plane(instrument: str) -> FocalPlane:
    """Return the focal plane of an instrument.

    Parameters
    ----------
    instrument : str
        ``"LSSTCam"``, ``"LSSTCam-imSim"`` (same layout as LSSTCam) or ``"LSSTComCam"``.

    Returns
    -------
    focal_plane : `FocalPlane`
        Cached: the same immutable object is returned for the same name.

    Raises
    ------
    ValueError
        If the instrument is not known.
    """
    if instrument in ("LSSTCam", "LSSTCam-imSim"):
        return _lsstcam(instrument)
    if instrument == "LSSTComCam":
        return _lsstcomcam(instrument)
    raise ValueError(f"unknown instrument {instrument!r}; use one of: {', '.join(INSTRUMENTS)}")
