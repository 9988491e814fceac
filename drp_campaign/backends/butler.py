"""Real Butler repositories: opening and creating them, and seeding the demo's hub.

The campaign opens the repositories the sites' Blocks name (`drp_campaign.backends.repos`
checks and adopts them); this module holds the Butler helpers it uses (`open_repo`,
`register_run`, output chains) and what `drp_campaign.seed` writes to play the observatory: every
record that matters for graph building comes from :mod:`drp_campaign.model`, so the Butler and
the planner agree to the last vertex: detectors from the focal plane model, tract and patch
regions from our `RingsSkyMap` (tract: outer polygon; patch: OUTER polygon and ``cell_x/cell_y`` =
patch index, exactly what ``lsst.skymap.BaseSkyMap.register`` writes), visit-detector regions from
``FocalPlane.detector_polygons``.

What the seeded hub holds (``<inst>`` is the instrument name)
--------------------------------------------------------------
The embedded default's repositories are ``<workdir>/repos/<site>/`` (`site_repo_root`; only the
seed and the embedded Blocks use that layout), SQLite registries by default, or a PostgreSQL
schema per repository when given a ``postgresql://`` URL. The collections are the spec's default
``inputs``:

========================  ============  =====================================================
``<inst>/raw/all``        RUN           mock raws, one per (exposure, detector)
``<inst>/calib/mock``     CALIBRATION   bias (detector) and flat (physical_filter, detector),
                                        certified over an unbounded timespan
``<inst>/calib/mock/unbounded``  RUN    the calibration files themselves
``<inst>/calib``          CHAINED       ``[<inst>/calib/mock]``
``skymaps``               RUN           the ``skyMap`` dataset (a mock; lsst.skymap is not on PyPI)
``<inst>/defaults``       CHAINED       ``[<inst>/raw/all, <inst>/calib, skymaps]``
========================  ============  =====================================================

The other sites' repositories start empty; setup copies the dimension records they need from the
hub, and the raws, calibrations and skymap arrive through the catalog. `populate_site_repos`
still builds all of them at once for the backend tests that need repositories without a campaign.

Mock datasets
-------------
Datasets use the ``_mock_*`` storage classes of :mod:`lsst.pipe.base.tests.mocks`, so the mock
pipeline tasks really read them (a missing file fails the quantum, as in production). Each file is
a `MockDataset` JSON document padded with trailing whitespace to the requested size (JSON ignores
it, so the padding is not copied into the provenance of downstream outputs). Files are written
directly and ingested in bulk (``Butler.ingest``, transfer ``move``), like real raw ingest; one
``put`` per dataset would be ~20x slower at campaign scale.

PostgreSQL
----------
``create_repo(root, registry_db="postgresql://user@host:port/db")`` puts the registry in that
database, in a schema of its own (``drp_<dirname>_<hash of the path>`` unless given), so every
site's repository can share one server and database; the datastore stays under ``root``. A bare
``postgresql://`` is given the ``psycopg2`` driver (SQLAlchemy 2.1 would pick psycopg 3, which is
not installed), and ``CREATE EXTENSION IF NOT EXISTS btree_gist`` is attempted first (daf_butler
refuses a database without it; creating it needs a privileged role).

Every process that reads these datasets must ``import lsst.pipe.base.tests.mocks`` first (it
registers the storage classes and the formatter); this module does it on import.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import astropy.time
import lsst.pipe.base.tests.mocks  # noqa: F401  (registers the _mock_* storage classes)
import numpy as np
import pandas as pd
from lsst.daf.butler import (
    Butler,
    CollectionType,
    Config,
    DataCoordinate,
    DatasetRef,
    DatasetType,
    FileDataset,
    Timespan,
)
from lsst.daf.butler.formatters.json import JsonFormatter
from lsst.pipe.base.tests.mocks import MockDataset, get_mock_name
from lsst.sphgeom import ConvexPolygon, UnitVector3d

from ..model.focalplane import focal_plane
from ..model.plan import MemoryPlan
from ..model.sky import RingsSkyMap, sky_map_for
from ..model.skyconfig import SkyMapConfig
from ..model.spec import CampaignSpec, SkymapSpec
from .instrument import (
    PHYSICAL_FILTERS,
    VISIT_SYSTEM_ID,
    instrument_class,
)

__all__ = [
    "CALIB_DATASET_TYPES",
    "DEFAULT_FILE_SIZE",
    "RAW_DATASET_TYPE",
    "has_collection",
    "site_has",
    "SKYMAP_DATASET_TYPE",
    "SKYMAP_RUN",
    "Collections",
    "SiteRepo",
    "collections_for",
    "create_repo",
    "detector_regions",
    "define_defaults_chain",
    "ingest_mock_calibs",
    "ingest_mock_datasets",
    "ingest_mock_raws",
    "ingest_mock_skymap",
    "open_repo",
    "populate_site_repos",
    "register_campaign_dimensions",
    "register_run",
    "prepare_graph_outputs",
    "ensure_output_chain",
    "register_skymap",
    "register_visits",
    "site_repo_root",
    "visit_times",
]

#: Default size of each mock file in bytes (small: tests and demos; reports use nominal sizes).
DEFAULT_FILE_SIZE = 1024
#: (name, dimensions, original storage class) of the raw dataset type.
RAW_DATASET_TYPE = ("raw", ("instrument", "exposure", "detector"), "Exposure")
#: Calibration dataset types (name -> dimensions, original storage class).
CALIB_DATASET_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "bias": (("instrument", "detector"), "ExposureF"),
    "flat": (("instrument", "physical_filter", "detector"), "ExposureF"),
}
#: The skyMap dataset type (a mock: lsst.skymap's ``SkyMap`` storage class needs lsst.skymap).
SKYMAP_DATASET_TYPE = ("skyMap", ("skymap",), "SkyMap")
#: RUN collection of the skyMap dataset (lsst.skymap's ``SKYMAP_RUN_COLLECTION_NAME``).
SKYMAP_RUN = "skymaps"

# Synthetic observing times (the visit tables carry none). DC2/imSim-style ids are small
# integers: visit v starts at _IMSIM_EPOCH + v * _VISIT_SPACING. LSSTCam-style ids are
# day_obs * 100000 + seq_num: the night of day_obs starts at 22:00 UTC (an hour after Rubin's
# local sunset) and seq_num counts _VISIT_SPACING steps; 1500 visits end before the 12:00 UTC
# day_obs rollover.
_IMSIM_EPOCH = datetime.datetime(2022, 1, 1, tzinfo=datetime.UTC)
_VISIT_SPACING = datetime.timedelta(seconds=30)
_EXPOSURE_TIME = 30.0
_LSSTCAM_ID_MIN = 10**9
# Rubin's day_obs is the date at UTC-12h.
_DAY_OBS_OFFSET = datetime.timedelta(hours=12)


# --------------------------------------------------------------------------------- collections
@dataclass(frozen=True)
class Collections:
    """Collection names of one instrument's repository layout (see the module docstring)."""

    instrument: str

    @property
    def raw_run(self) -> str:
        """RUN of the raws."""
        return f"{self.instrument}/raw/all"

    @property
    def calib(self) -> str:
        """CALIBRATION collection the mock calibs are certified in."""
        return f"{self.instrument}/calib/mock"

    @property
    def calib_run(self) -> str:
        """RUN holding the calibration files."""
        return f"{self.instrument}/calib/mock/unbounded"

    @property
    def calib_chain(self) -> str:
        """CHAINED collection of all calibrations."""
        return f"{self.instrument}/calib"

    @property
    def skymap_run(self) -> str:
        """RUN of the skyMap dataset."""
        return SKYMAP_RUN

    @property
    def defaults(self) -> str:
        """CHAINED collection used as the input of every graph."""
        return f"{self.instrument}/defaults"


def collections_for(instrument: str) -> Collections:
    """Return the collection names for an instrument.

    Parameters
    ----------
    instrument : `str`
        Instrument name.

    Returns
    -------
    collections : `Collections`
        The names.
    """
    return Collections(instrument)


# --------------------------------------------------------------------------------- repositories
_NAMESPACE_RE = re.compile(r"[^a-z0-9_]")


def _default_namespace(root: Path) -> str:
    # One PostgreSQL schema per repository: the directory name says which site it is, a hash of
    # the absolute path keeps two work directories on one server apart. PostgreSQL folds
    # unquoted identifiers to lower case and limits them to 63 bytes.
    stem = _NAMESPACE_RE.sub("_", root.name.lower())[:40] or "repo"
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return f"drp_{stem}_{digest}"


def create_repo(
    root: str | Path,
    *,
    registry_db: str | None = None,
    namespace: str | None = None,
) -> Butler:
    """Create a Butler repository (or open it if it already exists).

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Repository root directory (holds ``butler.yaml`` and the datastore files).
    registry_db : `str`, optional
        SQLAlchemy URL of the registry database. `None` (default) puts an SQLite file in the
        repository. A ``postgresql://user@host:port/db`` URL puts the registry in that database,
        in the schema ``namespace``.
    namespace : `str`, optional
        PostgreSQL schema of this repository; by default ``drp_<dirname>_<hash of the path>``
        so that several repositories share one database. Ignored for SQLite.

    Returns
    -------
    butler : `lsst.daf.butler.Butler`
        A writeable Butler on the repository.
    """
    root = Path(root)
    if (root / "butler.yaml").exists():
        return open_repo(root, writeable=True)
    root.mkdir(parents=True, exist_ok=True)
    seed = Config()
    if registry_db is not None:
        if registry_db.startswith("postgresql"):
            registry_db = _postgres_url(registry_db)
            _ensure_btree_gist(registry_db)
            seed["registry", "namespace"] = namespace or _default_namespace(root)
        seed["registry", "db"] = registry_db
    Butler.makeRepo(str(root), config=seed)
    return open_repo(root, writeable=True)


def _postgres_url(url: str) -> str:
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (v3); the environment ships
    # psycopg2-binary, so name the driver unless psycopg is importable.
    if not url.startswith("postgresql://"):
        return url
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _ensure_btree_gist(url: str) -> None:
    # daf_butler's PostgreSQL registry needs the btree_gist extension (timespan constraints) and
    # refuses to start without it. Creating it needs privileges: try, and leave the error to
    # daf_butler's own message ("requires the btree_gist extension") if we cannot.
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE EXTENSION IF NOT EXISTS btree_gist"))
    except sqlalchemy.exc.SQLAlchemyError:
        pass
    finally:
        engine.dispose()


def open_repo(root: str | Path, writeable: bool = True) -> Butler:
    """Open an existing repository.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Repository root.
    writeable : `bool`, optional
        Open for writing (default).

    Returns
    -------
    butler : `lsst.daf.butler.Butler`
        A new Butler (never cached: a Butler's caches go stale when another process writes).
    """
    return Butler.from_config(str(root), writeable=writeable)


# --------------------------------------------------------------------------------- dimensions
def _patch_maxima(sky: RingsSkyMap) -> tuple[int, int]:
    return _patch_maxima_of(sky.config)


@lru_cache(maxsize=4)
def _patch_maxima_of(config: SkyMapConfig) -> tuple[int, int]:
    # lsst.skymap records the largest patch grid of *all* tracts (0.6 s for 120 rings), not only
    # the registered ones, so the skymap record is the same whatever the campaign touches.
    sky = RingsSkyMap.from_config(config)
    nx = ny = 0
    for tract in sky:
        tx, ty = tract.num_patches
        nx, ny = max(nx, tx), max(ny, ty)
    return nx, ny


def visit_times(visit: int) -> tuple[astropy.time.Time, astropy.time.Time, int]:
    """Return the synthetic (begin, end, day_obs) of a visit.

    Parameters
    ----------
    visit : `int`
        Visit id (imSim-style small integer or LSSTCam-style ``day_obs * 100000 + seq_num``).

    Returns
    -------
    begin, end : `astropy.time.Time`
        Exposure start and end (TAI).
    day_obs : `int`
        ``YYYYMMDD`` of the observing day (the date at UTC-12h).
    """
    visit = int(visit)
    if visit >= _LSSTCAM_ID_MIN:
        day_obs, seq = divmod(visit, 100_000)
        night = datetime.datetime.strptime(str(day_obs), "%Y%m%d").replace(tzinfo=datetime.UTC)
        start = night + datetime.timedelta(hours=22) + seq * _VISIT_SPACING
    else:
        start = _IMSIM_EPOCH + visit * _VISIT_SPACING
        day_obs = int((start - _DAY_OBS_OFFSET).strftime("%Y%m%d"))
    end = start + datetime.timedelta(seconds=_EXPOSURE_TIME)
    # TAI scale, as obs_base records it; the UTC datetimes are converted once here.
    begin_t = astropy.time.Time(start, scale="utc").tai
    end_t = astropy.time.Time(end, scale="utc").tai
    return begin_t, end_t, day_obs


def _day_obs_timespan(day_obs: int) -> Timespan:
    date = datetime.datetime.strptime(str(day_obs), "%Y%m%d").replace(tzinfo=datetime.UTC)
    begin = date + _DAY_OBS_OFFSET
    return Timespan(
        astropy.time.Time(begin, scale="utc").tai,
        astropy.time.Time(begin + datetime.timedelta(days=1), scale="utc").tai,
    )


def detector_regions(
    instrument: str, ra: float, dec: float, rotation: float
) -> list[ConvexPolygon]:
    """Return the sky regions of every detector of one visit (the planner's polygons).

    Parameters
    ----------
    instrument : `str`
        Instrument name (selects the focal plane).
    ra, dec, rotation : `float`
        Boresight and rotation, degrees.

    Returns
    -------
    regions : `list` [`lsst.sphgeom.ConvexPolygon`]
        One per detector, in the focal plane's detector order.
    """
    return focal_plane(instrument).detector_polygons(float(ra), float(dec), float(rotation))


def _visit_region(polygons: Sequence[ConvexPolygon]) -> ConvexPolygon:
    # The convex hull of every detector corner: convex, and contains every detector region, so a
    # visit-level spatial join never misses a detector-level overlap.
    vertices: list[UnitVector3d] = [v for poly in polygons for v in poly.getVertices()]
    return ConvexPolygon.convexHull(vertices)


def _sync(butler: Butler, element: str, records: list[dict[str, Any]]) -> None:
    if records:
        butler.registry.insertDimensionData(element, *records, skip_existing=True)


def register_skymap(
    butler: Butler,
    skymap: SkymapSpec,
    tracts: Iterable[int],
    *,
    name: str | None = None,
) -> None:
    """Register the skymap and the given tracts with all their patches.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    skymap : `~drp_campaign.model.spec.SkymapSpec`
        The spec's skymap: its whole config decides the geometry and the hash recorded.
    tracts : iterable of `int`
        Tracts to register (with every patch of each). Registering only the campaign's tracts
        instead of all 18,938 keeps the registry small; the skymap record itself (hash, maxima)
        is exactly lsst.skymap's, so a repository with the real skymap stays compatible.
    name : `str`, optional
        Skymap dimension name; ``skymap.name`` (e.g. ``DC2_cells_v1``) by default.

    Raises
    ------
    lsst.daf.butler.registry.ConflictingDefinitionError
        If the registry has a skymap of that name with another hash (use
        `~drp_campaign.backends.skymaps.check_registered_skymap` first for a message that says
        which keys to check).
    """
    skymap_name = name or skymap.name
    sky = sky_map_for(skymap)
    nx_max, ny_max = _patch_maxima(sky)
    butler.registry.syncDimensionData(
        "skymap",
        {
            "name": skymap_name,
            "hash": sky.hash(),
            "tract_max": len(sky),
            "patch_nx_max": nx_max,
            "patch_ny_max": ny_max,
        },
    )
    tract_records: list[dict[str, Any]] = []
    patch_records: list[dict[str, Any]] = []
    for tract_id in sorted({int(t) for t in tracts}):
        tract = sky[tract_id]
        tract_records.append(
            {"skymap": skymap_name, "id": tract_id, "region": tract.outer_polygon()}
        )
        nx, ny = tract.num_patches
        for seq in range(nx * ny):
            x, y = tract.patch_index(seq)
            patch_records.append(
                {
                    "skymap": skymap_name,
                    "tract": tract_id,
                    "id": seq,
                    "cell_x": x,
                    "cell_y": y,
                    # Patch regions are the OUTER boxes, as BaseSkyMap.register writes them.
                    "region": tract.patch_outer_polygon(seq),
                }
            )
    _sync(butler, "tract", tract_records)
    _sync(butler, "patch", patch_records)


def register_visits(butler: Butler, instrument: str, visits: pd.DataFrame) -> None:
    """Register exposures and visits with their regions (one exposure per visit, same id).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler where the instrument is registered.
    instrument : `str`
        Instrument name.
    visits : `pandas.DataFrame`
        Columns ``visit, band, ra, dec, rotation`` (degrees).
    """
    plane = focal_plane(instrument)
    filters = PHYSICAL_FILTERS[instrument]
    day_obs_records: dict[int, dict[str, Any]] = {}
    groups, exposures, visit_recs, definitions, memberships, vdrs = [], [], [], [], [], []
    for row in visits.sort_values("visit").itertuples(index=False):
        vid = int(row.visit)
        begin, end, day_obs = visit_times(vid)
        timespan = Timespan(begin, end)
        physical_filter = filters[str(row.band)]
        polygons = plane.detector_polygons(float(row.ra), float(row.dec), float(row.rotation))
        if day_obs not in day_obs_records:
            day_obs_records[day_obs] = {
                "instrument": instrument,
                "id": day_obs,
                "timespan": _day_obs_timespan(day_obs),
            }
        group = str(vid)
        groups.append({"instrument": instrument, "name": group})
        common = {
            "instrument": instrument,
            "id": vid,
            "day_obs": day_obs,
            "physical_filter": physical_filter,
            "exposure_time": _EXPOSURE_TIME,
            "target_name": "drp-campaign",
            "science_program": "drp-campaign",
            "observation_reason": "science",
            "timespan": timespan,
        }
        exposures.append(
            common
            | {
                "group": group,
                "obs_id": f"{instrument}_{vid}",
                "dark_time": _EXPOSURE_TIME,
                "observation_type": "science",
                "seq_num": vid % 100_000,
                "seq_start": vid % 100_000,
                "seq_end": vid % 100_000,
                "tracking_ra": float(row.ra),
                "tracking_dec": float(row.dec),
                "sky_angle": float(row.rotation),
                "has_simulated": True,
                "can_see_sky": True,
            }
        )
        visit_recs.append(
            common | {"name": str(vid), "seq_num": vid % 100_000, "region": _visit_region(polygons)}
        )
        definitions.append({"instrument": instrument, "exposure": vid, "visit": vid})
        memberships.append(
            {"instrument": instrument, "visit_system": VISIT_SYSTEM_ID, "visit": vid}
        )
        for det, poly in zip(plane.detectors, polygons, strict=True):
            vdrs.append(
                {"instrument": instrument, "visit": vid, "detector": det.id, "region": poly}
            )
    # Foreign-key order: day_obs, group, exposure, visit, then the tables that reference them.
    with butler.transaction():
        _sync(butler, "day_obs", list(day_obs_records.values()))
        _sync(butler, "group", groups)
        _sync(butler, "exposure", exposures)
        _sync(butler, "visit", visit_recs)
        _sync(butler, "visit_definition", definitions)
        _sync(butler, "visit_system_membership", memberships)
        _sync(butler, "visit_detector_region", vdrs)


def register_campaign_dimensions(
    butler: Butler,
    spec: CampaignSpec,
    visits_df: pd.DataFrame,
    skymap_name: str | None = None,
    tracts: Iterable[int] = (),
) -> None:
    """Register everything a campaign's graphs need: instrument, skymap, visits.

    Idempotent: existing identical records are skipped (a different definition of an existing
    record raises ``ConflictingDefinitionError``).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    spec : `CampaignSpec`
        Campaign spec (instrument, skymap geometry).
    visits_df : `pandas.DataFrame`
        Columns ``visit, band, ra, dec, rotation``.
    skymap_name : `str`, optional
        Skymap name; ``spec.skymap.name`` by default.
    tracts : iterable of `int`
        Tracts to register (every patch of each): those the plan's overlaps touch.
    """
    instrument_class(spec.instrument)().register(butler.registry)
    register_skymap(butler, spec.skymap, tracts, name=skymap_name)
    register_visits(butler, spec.instrument, visits_df)


# --------------------------------------------------------------------------------- mock datasets
def _mock_dataset_type(
    butler: Butler,
    name: str,
    dimensions: Sequence[str],
    storage_class: str,
    *,
    is_calibration: bool = False,
) -> DatasetType:
    dataset_type = DatasetType(
        name,
        dimensions,
        get_mock_name(storage_class),
        universe=butler.dimensions,
        isCalibration=is_calibration,
    )
    butler.registry.registerDatasetType(dataset_type)
    return dataset_type


def _write_mock_file(path: Path, ref: DatasetRef, size_bytes: int) -> None:
    doc = MockDataset(
        dataset_id=ref.id,
        dataset_type=ref.datasetType.to_simple(),
        data_id=dict(ref.dataId.required),
        run=ref.run,
    ).model_dump_json()
    data = doc.encode()
    if size_bytes > len(data):
        # Trailing whitespace is valid JSON and is dropped on read, so it never reaches the
        # provenance of downstream outputs.
        data += b"\n" + b" " * (size_bytes - len(data) - 1)
    path.write_bytes(data)


def _ingest_mock(
    butler: Butler,
    dataset_type: DatasetType,
    data_ids: Sequence[DataCoordinate],
    run: str,
    size_bytes: int,
) -> list[DatasetRef]:
    """Write one mock file per data ID and ingest them all at once (transfer ``move``)."""
    if not data_ids:
        return []
    register_run(butler, run)
    # Skip data IDs that already have a dataset in the run (reruns are no-ops).
    existing = {
        ref.dataId.required_values
        for ref in butler.query_datasets(dataset_type, collections=run, explain=False, limit=None)
    }
    todo = [d for d in data_ids if d.required_values not in existing]
    if not todo:
        return []
    # Stage inside the datastore root so that "move" is a rename, not a copy.
    (datastore_root,) = (r for r in butler.get_datastore_roots().values() if r is not None)
    staging = Path(datastore_root.ospath) / ".staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        files = []
        for i, data_id in enumerate(todo):
            ref = DatasetRef(dataset_type, data_id, run=run)
            path = staging / f"{i}.json"
            _write_mock_file(path, ref, size_bytes)
            files.append(FileDataset(path=str(path), refs=[ref], formatter=JsonFormatter))
        butler.ingest(*files, transfer="move")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.parent.rmdir()  # only if empty: another ingest may be staging too
        except OSError:
            pass
    return [ref for f in files for ref in f.refs]


def _expanded_data_ids(
    butler: Butler, dimensions: Sequence[str], where: str, bind: Mapping[str, Any]
) -> list[DataCoordinate]:
    with butler.query() as query:
        rows = query.data_ids(dimensions).where(where, bind=dict(bind)).with_dimension_records()
        return list(rows)


def _only_instrument(butler: Butler) -> str:
    names = [rec.name for rec in butler.query_dimension_records("instrument", explain=False)]
    if len(names) != 1:
        raise ValueError(f"expected exactly one instrument in the repository, found {names}")
    return names[0]


def ingest_mock_raws(
    butler: Butler,
    visits: Iterable[int],
    detectors: Iterable[int] | None = None,
    run: str | None = None,
    size_bytes: int = DEFAULT_FILE_SIZE,
    *,
    instrument: str | None = None,
) -> list[DatasetRef]:
    """Ingest one mock raw per (exposure, detector) as a real file in the datastore.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler with the visits' dimension records registered.
    visits : iterable of `int`
        Visit ids (= exposure ids).
    detectors : iterable of `int`, optional
        Detector ids; all of the instrument's by default.
    run : `str`, optional
        RUN collection; ``<instrument>/raw/all`` by default.
    size_bytes : `int`, optional
        Size of each file.
    instrument : `str`, optional
        Instrument name; the repository's only instrument by default.

    Returns
    -------
    refs : `list` [`lsst.daf.butler.DatasetRef`]
        The newly ingested raws (empty when all existed already).
    """
    instrument = instrument or _only_instrument(butler)
    run = run or collections_for(instrument).raw_run
    name, dims, storage_class = RAW_DATASET_TYPE
    dataset_type = _mock_dataset_type(butler, name, dims, storage_class)
    visit_list = sorted({int(v) for v in visits})
    if not visit_list:
        return []
    det_list = (
        sorted({int(d) for d in detectors})
        if detectors is not None
        else [d.id for d in focal_plane(instrument).detectors]
    )
    data_ids = _expanded_data_ids(
        butler,
        dims,
        "instrument = inst AND exposure IN (exposures) AND detector IN (detectors)",
        {"inst": instrument, "exposures": visit_list, "detectors": det_list},
    )
    return _ingest_mock(butler, dataset_type, data_ids, run, size_bytes)


def ingest_mock_calibs(
    butler: Butler,
    instrument: str,
    detectors: Iterable[int] | None = None,
    collection: str | None = None,
    size_bytes: int = DEFAULT_FILE_SIZE,
) -> list[DatasetRef]:
    """Ingest mock bias (per detector) and flat (per physical filter and detector) calibrations.

    They are certified in a CALIBRATION collection over an unbounded timespan (so they cover
    every visit, including ones added later), and ``<instrument>/calib`` is a CHAINED collection
    holding it.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler with the instrument registered.
    instrument : `str`
        Instrument name.
    detectors : iterable of `int`, optional
        Detector ids; all of the instrument's by default.
    collection : `str`, optional
        CALIBRATION collection; ``<instrument>/calib/mock`` by default.
    size_bytes : `int`, optional
        Size of each file.

    Returns
    -------
    refs : `list` [`lsst.daf.butler.DatasetRef`]
        The newly ingested calibrations.
    """
    names = collections_for(instrument)
    collection = collection or names.calib
    run = f"{collection}/unbounded"
    det_list = (
        sorted({int(d) for d in detectors})
        if detectors is not None
        else [d.id for d in focal_plane(instrument).detectors]
    )
    refs: list[DatasetRef] = []
    for name, (dims, storage_class) in CALIB_DATASET_TYPES.items():
        dataset_type = _mock_dataset_type(butler, name, dims, storage_class, is_calibration=True)
        if not det_list:
            continue  # only the dataset types and collections (calibrations arrive later)
        data_ids = _expanded_data_ids(
            butler,
            dims,
            "instrument = inst AND detector IN (detectors)",
            {"inst": instrument, "detectors": det_list},
        )
        refs.extend(_ingest_mock(butler, dataset_type, data_ids, run, size_bytes))
    butler.collections.register(collection, CollectionType.CALIBRATION)
    if refs:
        butler.registry.certify(collection, refs, Timespan(None, None))
    butler.collections.register(names.calib_chain, CollectionType.CHAINED)
    chain = list(butler.collections.get_info(names.calib_chain).children)
    if collection not in chain:
        butler.collections.redefine_chain(names.calib_chain, [*chain, collection])
    return refs


def register_run(butler: Butler, name: str) -> bool:
    """Register a RUN collection atomically, so that a killed process cannot half-create it.

    daf_butler's ``collections.register`` inserts the ``collection`` row and the ``run`` row in
    two separate transactions. A process killed between them (seen with SIGKILL during the
    final job) leaves a RUN collection without its run row: every later registration finds the
    collection and returns, and every dataset insert into it then fails on the foreign key
    (the aggregator's ``FatalWorkerError``), so the site-step could never be resumed. One
    enclosing transaction makes the pair all-or-nothing (SQLite and PostgreSQL alike).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        A writeable repository.
    name : `str`
        The RUN collection.

    Returns
    -------
    registered : `bool`
        Whether it was created now (`False`: it existed).
    """
    with butler.transaction():
        return butler.collections.register(name)


def prepare_graph_outputs(butler: Butler, graph_path: str | Path) -> None:
    """Create a graph's output RUN and output CHAINED collection before it runs, atomically.

    The final job (``butler aggregate-graph``) creates them itself, but in separate
    transactions: the chain is registered, then the graph's inputs are added to it, then the
    run is prepended. A job killed between the first two leaves an output chain without the
    inputs, and since the chain then exists, no later job adds them: every later step at the
    site misses the raws, calibrations and sky map (seen as a resumed step3 trying to move
    the sky map). Made here in one transaction each (`register_run`), they are whole; the
    final job then only prepends its run, an idempotent single change.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The site's repository, writeable.
    graph_path : `str` or `pathlib.Path`
        The predicted graph (its header names the run, the chain and the inputs).
    """
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    with PredictedQuantumGraph.open(str(graph_path)) as reader:
        header = reader.header
    register_run(butler, header.output_run)
    if header.output:
        ensure_output_chain(butler, header.output, header.inputs)


def ensure_output_chain(butler: Butler, output: str, inputs: Sequence[str]) -> bool:
    """Create an output CHAINED collection holding ``inputs`` (flattened), in one transaction.

    What the final job does for a new chain, but all-or-nothing (`prepare_graph_outputs`
    says why). An existing chain is left as it is.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        A writeable repository.
    output : `str`
        The CHAINED collection.
    inputs : sequence of `str`
        The graph's input collections.

    Returns
    -------
    created : `bool`
        Whether the chain was created now.
    """
    with butler.transaction():
        created = butler.collections.register(output, CollectionType.CHAINED)
        if created and inputs:
            # The inputs flattened, as the final job would put them, behind the runs to come.
            flattened = butler.collections.query(list(inputs), flatten_chains=True)
            butler.collections.extend_chain(output, flattened)
    return created


def has_collection(butler: Butler, name: str) -> bool:
    """Whether a collection exists (``collections.query`` raises for a missing plain name).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The repository.
    name : `str`
        Collection name.

    Returns
    -------
    exists : `bool`
    """
    from lsst.daf.butler import MissingCollectionError

    try:
        butler.collections.get_info(name)
    except MissingCollectionError:
        return False
    return True


def certify_calibs(butler: Butler, instrument: str) -> int:
    """Certify the calibrations that arrived in the unbounded calibration RUN (idempotent).

    Replicated calibrations are ingested into their RUN from their sidecars, which carry no
    validity range; the source certified them over an unbounded timespan, so the same is done
    here.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    instrument : `str`
        Instrument name.

    Returns
    -------
    n : `int`
        Calibrations newly certified.
    """
    names = collections_for(instrument)
    run = f"{names.calib}/unbounded"
    if not has_collection(butler, run):
        return 0
    n = 0
    for name in CALIB_DATASET_TYPES:
        refs = butler.query_datasets(name, collections=run, explain=False, limit=None)
        certified = (
            {
                r.id
                for r in butler.query_datasets(
                    name, collections=names.calib, explain=False, limit=None, find_first=False
                )
            }
            if refs
            else set()
        )
        new = [r for r in refs if r.id not in certified]
        if new:
            butler.registry.certify(names.calib, new, Timespan(None, None))
            n += len(new)
    return n


def ingest_mock_skymap(
    butler: Butler, skymap_name: str, size_bytes: int = DEFAULT_FILE_SIZE
) -> None:
    """Ingest the mock ``skyMap`` dataset of a registered skymap into the ``skymaps`` RUN.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler with the skymap registered.
    skymap_name : `str`
        Skymap name.
    size_bytes : `int`, optional
        Size of the file.
    """
    name, dims, storage_class = SKYMAP_DATASET_TYPE
    dataset_type = _mock_dataset_type(butler, name, dims, storage_class)
    data_ids = _expanded_data_ids(butler, dims, "skymap = sm", {"sm": skymap_name})
    _ingest_mock(butler, dataset_type, data_ids, SKYMAP_RUN, size_bytes)


def ingest_mock_datasets(
    butler: Butler,
    dataset_type: DatasetType,
    run: str,
    *,
    where: str,
    bind: Mapping[str, Any] | None = None,
    size_bytes: int = DEFAULT_FILE_SIZE,
) -> list[DatasetRef]:
    """Ingest a mock dataset for every data ID a query returns (tests, benchmarks, backfills).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    dataset_type : `lsst.daf.butler.DatasetType`
        Dataset type with a ``_mock_*`` storage class (e.g. from a resolved pipeline graph);
        registered if needed.
    run : `str`
        RUN collection.
    where : `str`
        Query over the dataset type's dimensions (constrain ``instrument`` and ``skymap``).
    bind : mapping, optional
        Bind values for ``where``.
    size_bytes : `int`, optional
        Size of each file.

    Returns
    -------
    refs : `list` [`lsst.daf.butler.DatasetRef`]
        The new datasets.
    """
    butler.registry.registerDatasetType(dataset_type)
    data_ids = _expanded_data_ids(butler, list(dataset_type.dimensions.names), where, bind or {})
    return _ingest_mock(butler, dataset_type, data_ids, run, size_bytes)


def define_defaults_chain(butler: Butler, instrument: str) -> str:
    """Create ``<instrument>/defaults`` = raws + calibrations + skymaps (idempotent).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    instrument : `str`
        Instrument name.

    Returns
    -------
    name : `str`
        The chain's name: the input collection of every graph.
    """
    names = collections_for(instrument)
    # Register the raw run even at sites that have no raw yet: transfers land in it later.
    register_run(butler, names.raw_run)
    butler.collections.register(names.calib_chain, CollectionType.CHAINED)
    register_run(butler, SKYMAP_RUN)
    butler.collections.register(names.defaults, CollectionType.CHAINED)
    butler.collections.redefine_chain(
        names.defaults, [names.raw_run, names.calib_chain, SKYMAP_RUN]
    )
    return names.defaults


# --------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class SiteRepo:
    """One site's repository after population.

    Attributes
    ----------
    site : `str`
        Site name.
    root : `pathlib.Path`
        Repository root.
    input_collection : `str`
        The CHAINED input collection of every graph built there.
    n_raws : `int`
        Raws newly ingested by this call.
    is_hub : `bool`
        Whether the site is the hub.
    """

    site: str
    root: Path
    input_collection: str
    n_raws: int
    is_hub: bool


def _plan_tables(plan: str | Path | MemoryPlan) -> tuple[pd.DataFrame, np.ndarray]:
    """(visits with columns visit, band, ra, dec, rotation; sorted unique tracts) of a plan."""
    if isinstance(plan, MemoryPlan):
        return plan.visits, np.unique(plan.overlaps.tract)
    plan_dir = Path(plan)
    visits = pd.read_parquet(plan_dir / "visits.parquet")
    overlaps_tracts = pd.read_parquet(plan_dir / "overlaps.parquet", columns=["tract"])["tract"]
    return visits, np.unique(overlaps_tracts.to_numpy())


def site_repo_root(workdir: str | Path, site: str) -> Path:
    """Return ``<workdir>/repos/<site>``.

    Parameters
    ----------
    workdir : `str` or `pathlib.Path`
        Work directory of the campaign.
    site : `str`
        Site name.

    Returns
    -------
    root : `pathlib.Path`
        The site's repository root.
    """
    return Path(workdir) / "repos" / site


def populate_site_repos(
    workdir: str | Path,
    spec: CampaignSpec,
    plan: str | Path | MemoryPlan,
    *,
    file_size: int = DEFAULT_FILE_SIZE,
    registry_db: str | None = None,
    sites: Sequence[str] | None = None,
) -> dict[str, SiteRepo]:
    """Create and populate one repository per site under ``<workdir>/repos/<site>/``.

    Every site gets the whole campaign's dimension records, the calibrations, the ``skyMap``
    dataset and the ``<instrument>/defaults`` chain; only the hub gets the raws (every visit,
    every detector). Idempotent: a rerun adds nothing.

    Parameters
    ----------
    workdir : `str` or `pathlib.Path`
        Campaign work directory.
    spec : `CampaignSpec`
        Campaign spec.
    plan : `str`, `pathlib.Path` or `MemoryPlan`
        A plan directory written by ``drp-campaign plan`` or an in-memory plan.
    file_size : `int`, optional
        Size of every mock raw and calibration file in bytes.
    registry_db : `str`, optional
        PostgreSQL URL shared by all the sites' registries (one schema each); SQLite if `None`.
    sites : sequence of `str`, optional
        Only these sites (default: all of the spec's).

    Returns
    -------
    repos : `dict` [`str`, `SiteRepo`]
        Site name -> repository.
    """
    visits, tracts = _plan_tables(plan)
    out: dict[str, SiteRepo] = {}
    for site in sites or spec.site_names:
        out[site] = populate_repo(
            site_repo_root(workdir, site),
            spec,
            visits,
            tracts,
            with_raws=site == spec.hub,
            file_size=file_size,
            registry_db=registry_db,
            site=site,
        )
    return out


def populate_repo(
    root: str | Path,
    spec: CampaignSpec,
    visits: pd.DataFrame,
    tracts: Sequence[int] | np.ndarray,
    *,
    with_raws: bool,
    file_size: int = DEFAULT_FILE_SIZE,
    registry_db: str | None = None,
    site: str = "",
    with_calibs: bool = True,
) -> SiteRepo:
    """Create (or reopen) one repository with the campaign's records, calibrations and skymap.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Repository root.
    spec : `CampaignSpec`
        Campaign spec.
    visits : `pandas.DataFrame`
        The campaign's visits (``visit, band, ra, dec, rotation``).
    tracts : sequence of `int`
        Tracts to register (with all their patches).
    with_raws : `bool`
        Ingest every visit's raws (the hub, or a single-site reference).
    file_size : `int`, optional
        Size of every mock file in bytes.
    registry_db : `str`, optional
        PostgreSQL URL; SQLite if `None`.
    site : `str`, optional
        Site name recorded in the result.
    with_calibs : `bool`, optional
        Ingest the calibrations; `False` for a site that receives them by replication (its
        calibration collections are still defined, empty).

    Returns
    -------
    repo : `SiteRepo`
    """
    visits = visits[["visit", "band", "ra", "dec", "rotation"]]
    tract_list = [int(t) for t in tracts]
    names = collections_for(spec.instrument)
    root = Path(root)
    with create_repo(root, registry_db=registry_db) as butler:
        register_campaign_dimensions(butler, spec, visits, spec.skymap.name, tract_list)
        if with_calibs:
            ingest_mock_calibs(butler, spec.instrument, size_bytes=file_size)
        else:
            # The dataset types and the (empty) CALIBRATION collection in the calib chain, so
            # replicated calibrations can be certified on arrival.
            ingest_mock_calibs(butler, spec.instrument, detectors=[], size_bytes=file_size)
        ingest_mock_skymap(butler, spec.skymap.name, size_bytes=file_size)
        # The raw dataset type exists everywhere: transfers land in it, and a graph built
        # before they arrive is reported as empty rather than as an unknown dataset type.
        raw_name, raw_dims, raw_storage_class = RAW_DATASET_TYPE
        _mock_dataset_type(butler, raw_name, raw_dims, raw_storage_class)
        n_raws = 0
        if with_raws:
            n_raws = len(
                ingest_mock_raws(
                    butler,
                    visits["visit"].tolist(),
                    run=names.raw_run,
                    size_bytes=file_size,
                    instrument=spec.instrument,
                )
            )
        define_defaults_chain(butler, spec.instrument)
    return SiteRepo(site, root, names.defaults, n_raws, site == spec.hub)


def copy_raws(
    hub_root: str | Path, site_root: str | Path, instrument: str, visits: Sequence[int]
) -> int:
    """Copy the raws of ``visits`` from the hub's repository into a site's (same dataset IDs).

    A direct ``transfer_from`` between repositories on one file system: the embedded stand-in for
    raw distribution through Rucio and the Replica Monitor. Idempotent.

    Parameters
    ----------
    hub_root, site_root : `str` or `pathlib.Path`
        Repository roots.
    instrument : `str`
        Instrument name.
    visits : sequence of `int`
        Visits (one exposure each, same id) whose raws the site needs.

    Returns
    -------
    n : `int`
        Raws found at the hub for those visits.
    """
    if len(visits) == 0:
        return 0
    defaults = collections_for(instrument).defaults
    with open_repo(hub_root, writeable=False) as hub:
        refs = hub.query_datasets(
            "raw",
            collections=defaults,
            where="instrument = inst AND exposure IN (visits)",
            bind={"inst": instrument, "visits": [int(v) for v in visits]},
            limit=None,
        )
        with open_repo(site_root) as dst:
            dst.transfer_from(hub, refs, transfer="copy")
    return len(refs)


def site_has(butler: Butler, ref: Any, collections: Sequence[str]) -> bool:
    """Whether a site's repo holds ``ref``, or the same dataset made there (e.g. its skyMap)."""
    from lsst.daf.butler import MissingCollectionError, MissingDatasetTypeError

    if butler.get_dataset(ref.id) is not None:
        return True
    if ref.datasetType.isCalibration():
        return False  # calibrations travel with their UUIDs (distribute_inputs)
    try:
        return butler.find_dataset(ref.datasetType, ref.dataId, collections=collections) is not None
    except (MissingDatasetTypeError, MissingCollectionError):
        return False
