"""Butler ``Instrument`` classes for the campaign's instruments, built from our focal plane model.

The real instrument classes (``lsst.obs.lsst.LsstCam`` and friends) live in obs_lsst, which is not
on PyPI. These small subclasses of `lsst.pipe.base.Instrument` register the same kind of records
(instrument, detectors, physical filters, the one-to-one visit system) from
`drp_campaign.model.focalplane`, so the Butler and the planner agree on every detector, and so

    butler register-instrument REPO drp_campaign.backends.instrument.MockLSSTCam

works exactly as it does with obs_lsst.

Physical filters use obs_lsst's names for each camera (DC2 imSim ``u_sim_1.4``..``y_sim_1.4``,
LSSTCam ``u_24``, ``g_6``, ..., LSSTComCam ``u_02``, ``g_01``, ...), one per band ``ugrizy``; see
`PHYSICAL_FILTERS`.
"""

from __future__ import annotations

from typing import ClassVar

from lsst.daf.butler import DataId, Formatter, FormatterV2, Registry
from lsst.pipe.base import Instrument

from ..model.focalplane import focal_plane

__all__ = [
    "INSTRUMENT_CLASSES",
    "PHYSICAL_FILTERS",
    "VISIT_SYSTEM_ID",
    "VISIT_SYSTEM_NAME",
    "MockInstrumentBase",
    "MockLSSTCam",
    "MockLSSTCamImSim",
    "MockLSSTComCam",
    "instrument_class",
    "physical_filter_for_band",
]

#: band -> physical filter name, per instrument (obs_lsst's names).
PHYSICAL_FILTERS: dict[str, dict[str, str]] = {
    "LSSTCam-imSim": {b: f"{b}_sim_1.4" for b in "ugrizy"},
    "LSSTCam": {"u": "u_24", "g": "g_6", "r": "r_57", "i": "i_39", "z": "z_20", "y": "y_10"},
    "LSSTComCam": {"u": "u_02", "g": "g_01", "r": "r_03", "i": "i_06", "z": "z_03", "y": "y_04"},
}

#: The one visit system we define: one exposure per visit (obs_lsst's id 0, "one-to-one").
VISIT_SYSTEM_ID = 0
VISIT_SYSTEM_NAME = "one-to-one"

# Upper bounds recorded in the instrument record (packers use them). LSSTCam-style visit ids are
# day_obs * 100000 + seq_num (~2.03e12), imSim ids are small integers; one bound fits both.
_VISIT_MAX = 2**44
_DETECTOR_MAX = 256


class MockInstrumentBase(Instrument):
    """An `lsst.pipe.base.Instrument` whose detectors come from our focal plane model.

    Subclasses set `instrument_name`; `Instrument.from_string` instantiates them with no argument,
    which is what ``butler register-instrument`` does.

    Parameters
    ----------
    collection_prefix : `str`, optional
        Prefix of the instrument's collection names; the instrument name by default.
    """

    instrument_name: ClassVar[str] = ""

    def __init__(self, collection_prefix: str | None = None) -> None:
        super().__init__(collection_prefix=collection_prefix)

    @classmethod
    def getName(cls) -> str:  # noqa: N802 (pipe_base's API)
        """Return the instrument name used in data IDs."""
        return cls.instrument_name

    def register(self, registry: Registry, *, update: bool = False) -> None:
        """Insert the instrument, filter, detector and visit-system records.

        Parameters
        ----------
        registry : `lsst.daf.butler.Registry`
            Registry of a writeable Butler.
        update : `bool`, optional
            Replace existing records that differ (otherwise they raise
            ``ConflictingDefinitionError``). Existing identical records are kept: idempotent.
        """
        name = self.getName()
        plane = focal_plane(name)
        with registry.transaction():
            registry.syncDimensionData(
                "instrument",
                {
                    "name": name,
                    "visit_max": _VISIT_MAX,
                    "exposure_max": _VISIT_MAX,
                    "detector_max": _DETECTOR_MAX,
                    "visit_system": VISIT_SYSTEM_ID,
                    "class_name": f"{type(self).__module__}.{type(self).__qualname__}",
                },
                update=update,
            )
            for band, physical_filter in PHYSICAL_FILTERS[name].items():
                registry.syncDimensionData(
                    "physical_filter",
                    {"instrument": name, "name": physical_filter, "band": band},
                    update=update,
                )
            for det in plane.detectors:
                registry.syncDimensionData(
                    "detector",
                    {
                        "instrument": name,
                        "id": det.id,
                        "full_name": det.name,
                        "raft": det.raft,
                        "name_in_raft": det.sensor,
                        "purpose": "SCIENCE",
                    },
                    update=update,
                )
            registry.syncDimensionData(
                "visit_system",
                {"instrument": name, "id": VISIT_SYSTEM_ID, "name": VISIT_SYSTEM_NAME},
                update=update,
            )

    def getRawFormatter(self, dataId: DataId) -> type[Formatter | FormatterV2]:  # noqa: N802, N803
        """Return the formatter of raw files.

        Our raws are mock datasets (JSON written through the mocks' formatter), never ingested
        from FITS files, so raw ingest through ``RawIngestTask`` is not supported.
        """
        from lsst.daf.butler.formatters.json import JsonFormatter

        return JsonFormatter


class MockLSSTCam(MockInstrumentBase):
    """LSSTCam: 189 science detectors."""

    instrument_name = "LSSTCam"


class MockLSSTCamImSim(MockInstrumentBase):
    """LSSTCam-imSim (DC2): the LSSTCam focal plane, imSim filter names."""

    instrument_name = "LSSTCam-imSim"


class MockLSSTComCam(MockInstrumentBase):
    """LSSTComCam: one raft, 9 detectors."""

    instrument_name = "LSSTComCam"


INSTRUMENT_CLASSES: dict[str, type[MockInstrumentBase]] = {
    cls.instrument_name: cls for cls in (MockLSSTCam, MockLSSTCamImSim, MockLSSTComCam)
}


def instrument_class(name: str) -> type[MockInstrumentBase]:
    """Return the instrument class for an instrument name.

    Parameters
    ----------
    name : `str`
        ``LSSTCam``, ``LSSTCam-imSim`` or ``LSSTComCam``.

    Returns
    -------
    cls : `type` [`MockInstrumentBase`]
        The class (its dotted path is what ``butler register-instrument`` takes).

    Raises
    ------
    ValueError
        For an unknown instrument.
    """
    try:
        return INSTRUMENT_CLASSES[name]
    except KeyError:
        raise ValueError(
            f"unknown instrument {name!r}; use one of {', '.join(INSTRUMENT_CLASSES)}"
        ) from None


def physical_filter_for_band(instrument: str, band: str) -> str:
    """Return the physical filter name of a band for an instrument.

    Parameters
    ----------
    instrument : `str`
        Instrument name.
    band : `str`
        One of ``ugrizy``.

    Returns
    -------
    physical_filter : `str`
        e.g. ``r_sim_1.4`` for LSSTCam-imSim.
    """
    return PHYSICAL_FILTERS[instrument][band]
