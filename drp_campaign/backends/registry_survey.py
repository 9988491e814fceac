"""The survey read from a Butler registry: ``survey: {butler: REPO, where: QUERY}``.

DESIGN.md section 10: a real campaign starts from the hub's registry, where the visits and their
``visit_detector_region`` records are already defined. The planner takes those regions exactly as
stored, so any instrument registered there plans without a focal-plane model of ours.

Two reads, both read-only:

`read_registry_visits`
    The visit table (``visit, band, ra, dec, rotation``), one row per visit matching the query.
    Visit-level only, so the driver can hold it (240,000 rows for DR1). ``band`` comes from the
    visit's physical filter; ``ra, dec, rotation`` from the tracking position and sky angle of the
    visit's first exposure where the registry has exposures, else the centre of the visit
    region's bounding circle and 0.
`read_detector_regions` / `iter_detector_regions`
    The ``visit_detector_region`` polygons of given visits, in pages of a bounded number of visits,
    as flat numpy arrays (`DetectorRegions`). Dask workers call this for their own chunk, so the
    driver never holds the detector regions (35.6 M for DR1).

Every failure the operator can fix (the repository cannot be opened, the instrument is not
registered, the query is rejected or matches nothing) raises `RegistrySurveyError`, a `SpecError`
naming the spec file, the key (``survey.butler``, ``survey.where``, ``instrument``) and the fix, so
the CLI reports it as it reports a bad spec (exit 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from lsst.daf.butler import Butler, ButlerUserError, DataCoordinate
from lsst.sphgeom import ConvexPolygon, LonLat

from ..model.spec import CampaignSpec, Problem, SpecError, _did_you_mean

__all__ = [
    "DEFAULT_PAGE_VISITS",
    "DetectorRegions",
    "RegistrySurveyError",
    "iter_detector_regions",
    "open_registry",
    "read_detector_regions",
    "read_registry_visits",
    "register_instrument_records",
    "register_visit_regions",
]

#: Visits in the first registry page of detector regions: ~38,000 LSSTCam regions.
DEFAULT_PAGE_VISITS = 200
#: Most visits in one page (one uploaded table of data IDs).
MAX_PAGE_VISITS = 1_000
#: Regions a page aims at once the first page shows how many detectors a visit has: a camera with
#: few detectors then gets pages of more visits (fewer queries, each with its fixed cost of
#: building and compiling it), while the page's DimensionRecords stay in the tens of MB.
PAGE_REGIONS = 40_000

# Bytes of one vertex in ConvexPolygon.encode(): three little-endian float64 after a 1-byte tag.
_VERTEX_BYTES = 24


class RegistrySurveyError(SpecError):
    """The registry a spec's survey names cannot give the visits (a `SpecError`: file, key, fix)."""


@dataclass(frozen=True)
class DetectorRegions:
    """Detector regions as flat arrays: region ``i`` has vertices ``offsets[i]:offsets[i+1]``.

    Attributes
    ----------
    visit : `numpy.ndarray`
        Visit id of each region (int64), sorted by (visit, detector).
    detector : `numpy.ndarray`
        Detector id of each region (int16).
    offsets : `numpy.ndarray`
        int64, one more than there are regions; ``offsets[0] == 0``.
    ra, dec : `numpy.ndarray`
        Vertices in degrees (float64), in the stored order (counter-clockwise seen from outside
        the sphere, as `lsst.sphgeom.ConvexPolygon` keeps them); ra in [0, 360).
    """

    visit: np.ndarray
    detector: np.ndarray
    offsets: np.ndarray
    ra: np.ndarray
    dec: np.ndarray

    def __len__(self) -> int:
        return int(self.visit.size)

    @classmethod
    def empty(cls) -> DetectorRegions:
        """No regions, with the canonical dtypes."""
        return cls(
            np.empty(0, np.int64),
            np.empty(0, np.int16),
            np.zeros(1, np.int64),
            np.empty(0, np.float64),
            np.empty(0, np.float64),
        )

    @classmethod
    def concat(cls, parts: Sequence[DetectorRegions]) -> DetectorRegions:
        """Concatenate pages (in the given order)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate(
            [np.zeros(1, np.int64)]
            + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)]
        )
        return cls(
            np.concatenate([p.visit for p in parts]),
            np.concatenate([p.detector for p in parts]),
            offsets,
            np.concatenate([p.ra for p in parts]),
            np.concatenate([p.dec for p in parts]),
        )


def _error(spec: CampaignSpec | None, key: str, reason: str, fix: str, value: object) -> Exception:
    source = spec.source if spec is not None else None
    return RegistrySurveyError([Problem(key, reason, fix, value=value)], source)


def open_registry(uri: str, spec: CampaignSpec | None = None) -> Butler:
    """Open the repository read-only.

    Parameters
    ----------
    uri : `str`
        Repository root, its ``butler.yaml``, or a URI.
    spec : `CampaignSpec`, optional
        The spec that names it, for the error message.

    Returns
    -------
    butler : `lsst.daf.butler.Butler`
        A new read-only Butler.

    Raises
    ------
    RegistrySurveyError
        If the repository cannot be opened.
    """
    try:
        return Butler.from_config(uri, writeable=False)
    except Exception as exc:  # daf_butler raises many kinds (FileNotFoundError, sqlalchemy, ...)
        shown = spec.survey.butler if spec is not None else uri
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _error(
            spec,
            "survey.butler",
            f"cannot open the Butler repository {uri}: {first}",
            "give the root (or butler.yaml) of an existing repository relative to the spec, or "
            "its URI, and check that it is readable.",
            shown,
        ) from None


def _unit_to_degrees(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (n, 3) to (ra in [0, 360), dec) degrees, as `lsst.sphgeom.LonLat` does."""
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    ra = np.degrees(np.arctan2(y, x))
    ra = np.where(ra < 0.0, ra + 360.0, ra)
    ra[ra >= 360.0] = 0.0
    dec = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra, dec


def _bands(butler: Butler, instrument: str) -> dict[str, str]:
    return {
        str(r.name): str(r.band)
        for r in butler.query_dimension_records(
            "physical_filter", instrument=instrument, limit=None
        )
    }


def _boresights(butler: Butler, instrument: str, where: str) -> dict[int, tuple[Any, Any, Any]]:
    """(tracking_ra, tracking_dec, sky_angle) of each visit's first exposure, where recorded."""
    out: dict[int, tuple[Any, Any, Any]] = {}
    with butler.query() as query:
        rows = (
            query.join_dimensions(["visit", "exposure"])
            .where(where, instrument=instrument)
            .general(
                ["visit", "exposure"],
                "exposure.tracking_ra",
                "exposure.tracking_dec",
                "exposure.sky_angle",
            )
        )
        best: dict[int, int] = {}
        for row in rows:
            visit, exposure = int(row["visit"]), int(row["exposure"])
            if visit in best and best[visit] <= exposure:
                continue
            best[visit] = exposure
            out[visit] = (
                row["exposure.tracking_ra"],
                row["exposure.tracking_dec"],
                row["exposure.sky_angle"],
            )
    return out


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def read_registry_visits(spec: CampaignSpec) -> pd.DataFrame:
    """The visit table of a spec whose survey is a registry.

    Parameters
    ----------
    spec : `CampaignSpec`
        A spec with ``survey.butler`` (``survey.butler_uri`` resolved by the loader).

    Returns
    -------
    table : `pandas.DataFrame`
        Columns ``visit, band, ra, dec, rotation`` (see `drp_campaign.model.survey`), sorted by
        visit; ``band`` is the registry's band of the visit's physical filter.

    Raises
    ------
    RegistrySurveyError
        If the repository cannot be opened, the instrument is not registered there, the query is
        rejected, or no visit matches.
    """
    survey = spec.survey
    uri = survey.butler_uri or survey.butler
    if uri is None:
        raise ValueError("read_registry_visits needs a spec whose survey is 'butler: REPO'")
    where = survey.where or ""
    instrument = spec.instrument
    butler = open_registry(uri, spec)
    with butler:
        registered = sorted(str(r.name) for r in butler.query_dimension_records("instrument"))
        if instrument not in registered:
            hint = _did_you_mean(instrument, registered)
            listed = ", ".join(registered) if registered else "none"
            raise _error(
                spec,
                "instrument",
                f"the instrument is not registered in {uri} (registered: {listed})",
                f"use {hint!r}." if hint else "set instrument to one registered in the repository.",
                instrument,
            )
        try:
            bands = _bands(butler, instrument)
            with butler.query() as query:
                records = list(query.dimension_records("visit").where(where, instrument=instrument))
            boresights = _boresights(butler, instrument, where) if records else {}
        except ButlerUserError as exc:
            raise _error(
                spec,
                "survey.where",
                f"the registry rejects the query: {str(exc).splitlines()[0]}",
                "write a daf_butler query expression on the visit's dimensions, e.g. "
                "\"band = 'r' AND visit > 1000\".",
                survey.where,
            ) from None
    if not records:
        what = f"matches {where!r}" if where else "is registered"
        raise _error(
            spec,
            "survey.where" if where else "survey.butler",
            f"no visit of {instrument} in {uri} {what}",
            "widen or remove 'where'."
            if where
            else f"point 'butler' at the repository that defines the visits of {instrument}.",
            survey.where if where else survey.butler,
        )
    records.sort(key=lambda r: int(r.id))
    n = len(records)
    visit = np.empty(n, np.int64)
    ra = np.empty(n, np.float64)
    dec = np.empty(n, np.float64)
    rotation = np.zeros(n, np.float64)
    band: list[str] = []
    for i, rec in enumerate(records):
        vid = int(rec.id)
        visit[i] = vid
        band.append(bands.get(str(rec.physical_filter), str(rec.physical_filter)))
        t_ra, t_dec, sky_angle = boresights.get(vid, (None, None, None))
        if _finite(t_ra) and _finite(t_dec):
            ra[i], dec[i] = float(t_ra) % 360.0, float(t_dec)
        elif rec.region is not None:
            # No boresight recorded: the centre of the visit region's bounding circle.
            centre = LonLat(rec.region.getBoundingCircle().getCenter())
            ra[i], dec[i] = centre.getLon().asDegrees(), centre.getLat().asDegrees()
        else:
            raise _error(
                spec,
                "survey.butler",
                f"visit {vid} of {instrument} has neither a region nor an exposure boresight",
                "define the visit's region in the registry (butler define-visits does), or "
                "exclude the visit with 'where'.",
                survey.butler,
            )
        if _finite(sky_angle):
            rotation[i] = float(sky_angle)
    ra[ra >= 360.0] = 0.0
    return pd.DataFrame(
        {
            "visit": visit,
            "band": pd.Series(band, dtype=str),
            "ra": ra,
            "dec": dec,
            "rotation": rotation,
        }
    )


def _page(butler: Butler, instrument: str, visits: Sequence[int]) -> DetectorRegions:
    # The visits go to the database as an uploaded table of data IDs rather than as a bound
    # 'visit IN (...)' list; with the larger pages above this read the regions of a
    # 9-detector camera 5-20 % faster than 200-visit IN-list pages (SQLite, 100,000 visits).
    group = butler.dimensions.conform(["instrument", "visit"])
    data_ids = [DataCoordinate.from_required_values(group, (instrument, v)) for v in visits]
    with butler.query() as query:
        records = list(
            query.join_data_coordinates(data_ids).dimension_records("visit_detector_region")
        )
    # A detector without a stored region cannot be planned (nor processed): it has no overlaps.
    records = [r for r in records if r.region is not None]
    if not records:
        return DetectorRegions.empty()
    records.sort(key=lambda r: (int(r.visit), int(r.detector)))
    blobs: list[bytes] = []
    for rec in records:
        if not isinstance(rec.region, ConvexPolygon):
            raise ValueError(
                f"visit_detector_region of visit {rec.visit} detector {rec.detector} is a "
                f"{type(rec.region).__name__}, not a ConvexPolygon"
            )
        # One C++ call per region; the vertices are then decoded for the whole page at once.
        blobs.append(rec.region.encode()[1:])
    counts = np.fromiter((len(b) // _VERTEX_BYTES for b in blobs), np.int64, len(blobs))
    xyz = np.frombuffer(b"".join(blobs), dtype="<f8").reshape(-1, 3)
    ra, dec = _unit_to_degrees(xyz)
    return DetectorRegions(
        np.fromiter((int(r.visit) for r in records), np.int64, len(records)),
        np.fromiter((int(r.detector) for r in records), np.int16, len(records)),
        np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)]),
        ra,
        dec,
    )


def iter_detector_regions(
    uri: str | Path,
    instrument: str,
    visits: npt.ArrayLike,
    page_visits: int = DEFAULT_PAGE_VISITS,
) -> Iterator[DetectorRegions]:
    """The stored ``visit_detector_region`` polygons of ``visits``, one page at a time.

    Parameters
    ----------
    uri : `str` or `pathlib.Path`
        The repository (``survey.butler_uri``).
    instrument : `str`
        Instrument name.
    visits : array_like
        Visit ids; pages follow their sorted order.
    page_visits : `int`, optional
        Visits in the first registry query; later pages hold about `PAGE_REGIONS` regions.

    Yields
    ------
    page : `DetectorRegions`
        The regions of one page of visits, sorted by (visit, detector).
    """
    ids = np.unique(np.asarray(visits, dtype=np.int64))
    if ids.size == 0:
        return
    with Butler.from_config(str(uri), writeable=False) as butler:
        start, size = 0, page_visits
        while start < ids.size:
            page = _page(butler, instrument, [int(v) for v in ids[start : start + size]])
            start += size
            if len(page):
                # A camera with few detectors gets pages of more visits (fewer queries).
                size = min(MAX_PAGE_VISITS, max(page_visits, PAGE_REGIONS * size // len(page)))
            yield page


def read_detector_regions(
    uri: str | Path,
    instrument: str,
    visits: npt.ArrayLike,
    page_visits: int = DEFAULT_PAGE_VISITS,
) -> DetectorRegions:
    """All regions of ``visits`` (one planner chunk), read in pages; see `iter_detector_regions`."""
    return DetectorRegions.concat(list(iter_detector_regions(uri, instrument, visits, page_visits)))


# --------------------------------------------------------------------------------------------
# Seeding: an instrument we have no model of, with visits and regions as given
# --------------------------------------------------------------------------------------------


def register_instrument_records(
    butler: Butler,
    instrument: str,
    physical_filters: dict[str, str],
    detectors: Sequence[int],
) -> None:
    """Register an instrument by its dimension records alone (no `Instrument` class).

    What ``butler register-instrument`` writes for a real camera, reduced to what the planner
    reads: the instrument, its physical filters (name -> band) and detector ids. For tests and
    benchmarks of instruments the project has no focal-plane model of.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    instrument : `str`
        Instrument name, e.g. ``HSC``.
    physical_filters : `dict` [`str`, `str`]
        Physical filter name -> band.
    detectors : sequence of `int`
        Detector ids.
    """
    registry = butler.registry
    registry.syncDimensionData(
        "instrument",
        {
            "name": instrument,
            "detector_max": max(detectors) + 1,
            "visit_max": 2**44,
            "exposure_max": 2**44,
        },
    )
    registry.insertDimensionData(
        "physical_filter",
        *[
            {"instrument": instrument, "name": name, "band": band}
            for name, band in physical_filters.items()
        ],
        skip_existing=True,
    )
    registry.insertDimensionData(
        "detector",
        *[
            {"instrument": instrument, "id": int(d), "full_name": f"D{int(d):03d}"}
            for d in detectors
        ],
        skip_existing=True,
    )


def register_visit_regions(
    butler: Butler,
    instrument: str,
    visits: Sequence[tuple[int, str, Sequence[tuple[int, ConvexPolygon]]]],
    day_obs: int = 20260101,
) -> None:
    """Register visits with their ``visit_detector_region`` polygons exactly as given.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler where the instrument, its filters and detectors are registered.
    instrument : `str`
        Instrument name.
    visits : sequence of (`int`, `str`, sequence of (`int`, `lsst.sphgeom.ConvexPolygon`))
        ``(visit id, physical filter, [(detector id, region), ...])``. The visit's region is the
        convex hull of its detectors' vertices, as ``butler define-visits`` records it. No
        exposures: the planner then takes each visit's position from its region.
    day_obs : `int`, optional
        The observing day of every visit (``visit`` requires one).
    """
    visit_records: list[dict[str, Any]] = []
    region_records: list[dict[str, Any]] = []
    for vid, physical_filter, detector_regions in visits:
        corners = [v for _, poly in detector_regions for v in poly.getVertices()]
        visit_records.append(
            {
                "instrument": instrument,
                "id": int(vid),
                "day_obs": day_obs,
                "physical_filter": physical_filter,
                "name": str(vid),
                "region": ConvexPolygon.convexHull(corners),
            }
        )
        region_records.extend(
            {"instrument": instrument, "visit": int(vid), "detector": int(det), "region": poly}
            for det, poly in detector_regions
        )
    with butler.transaction():
        butler.registry.insertDimensionData(
            "day_obs", {"instrument": instrument, "id": day_obs}, skip_existing=True
        )
        butler.registry.insertDimensionData("visit", *visit_records)
        butler.registry.insertDimensionData("visit_detector_region", *region_records)
