"""The `DataFacility` block: where one site of one campaign keeps its data and how to reach it.

One block document per (campaign, site), named by `data_facility_document_name`
(``data-facility/<campaign>-<site>``). Tasks load it with `load_data_facility`; nothing loads a
block at import time. In the embedded default (`embedded_data_facility`) every site lives under
one work directory: its Butler repository at ``<workdir>/repos/<site>``, its RSEs at
``<workdir>/storage/<RSE>``, and no credentials. A real site names its Butler repository URI, its
RSEs and storage, and nests the `RucioCredentials` and `PandaCredentials` blocks its backends
need.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Self

from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, model_validator

from drp_campaign.backends.interfaces import rse_name
from drp_campaign.model.naming import data_facility_document_name, data_facility_slug

from .credentials import PandaCredentials, RucioCredentials

if TYPE_CHECKING:
    from drp_campaign.model.spec import CampaignSpec

__all__ = [
    "DataFacility",
    "aload_data_facility",
    "data_facility_document_name",
    "data_facility_slug",
    "embedded_data_facility",
    "load_data_facility",
    "load_data_facility_document",
]


class DataFacility(Block):
    """One site of a campaign: its Butler, RSEs, storage, backends and credentials.

    ``catalog_backend`` ``"embedded"`` uses the local SQLite catalog over ``storage_root``;
    ``"rucio"`` needs ``rucio``. ``workload_backend`` ``"local"`` runs graphs on this machine;
    ``"panda"`` needs ``panda``.
    """

    # Validation errors would otherwise quote the raw input, secrets included.
    model_config = ConfigDict(hide_input_in_errors=True)
    _block_type_name: ClassVar[str] = "Data Facility"
    _description: ClassVar[str] = (
        "One Rubin data facility of a drp-campaign campaign: Butler repository, Rucio RSEs, "
        "storage, backends and the credentials they need."
    )

    site: str = Field(min_length=1, description="Site name as in the campaign spec (USDF...).")
    compute_site: str = Field(min_length=1, description="BPS computeSite (SLAC, CC-IN2P3...).")
    cloud: str = Field(min_length=1, description="BPS computeCloud (US, EU).")
    butler_repo: str = Field(min_length=1, description="Butler repository URI or path.")
    raw_rse: str = Field(min_length=1, description="RSE of immutable inputs ({SITE}_RAW_DISK).")
    butler_rse: str = Field(min_length=1, description="RSE of products ({SITE}_BUTLER_DISK).")
    storage_root: str = Field(
        min_length=1,
        description="Directory holding the RSEs' storage; an RSE's root is <storage_root>/<RSE>.",
    )
    catalog_backend: Literal["embedded", "rucio"] = Field(
        default="embedded", description="Data catalog: the embedded SQLite one, or Rucio."
    )
    workload_backend: Literal["local", "panda"] = Field(
        default="local", description="Workload service: local execution, or PanDA."
    )
    groups_in_flight: int = Field(
        default=2,
        ge=1,
        description="Groups of a site-step submitted to the workload service at once.",
    )
    rucio: RucioCredentials | None = Field(
        default=None, description="Rucio credentials (needed by catalog_backend 'rucio')."
    )
    panda: PandaCredentials | None = Field(
        default=None, description="PanDA credentials (needed by workload_backend 'panda')."
    )

    @model_validator(mode="after")
    def _credentials_for_backends(self) -> Self:
        missing: list[str] = []
        if self.catalog_backend == "rucio" and self.rucio is None:
            missing.append(
                "catalog_backend 'rucio' needs a RucioCredentials block in field 'rucio' "
                "(or use catalog_backend 'embedded')"
            )
        if self.workload_backend == "panda" and self.panda is None:
            missing.append(
                "workload_backend 'panda' needs a PandaCredentials block in field 'panda' "
                "(or use workload_backend 'local')"
            )
        if missing:
            raise ValueError(f"data facility {self.site!r}: " + "; ".join(missing))
        return self

    def rse_root(self, rse: str) -> Path:
        """Storage root of one of this site's RSEs: ``<storage_root>/<rse>``.

        Parameters
        ----------
        rse : `str`
            ``raw_rse`` or ``butler_rse``.

        Returns
        -------
        root : `pathlib.Path`
            The directory.
        """
        if rse not in (self.raw_rse, self.butler_rse):
            raise ValueError(
                f"{rse!r} is not an RSE of site {self.site!r} ({self.raw_rse}, {self.butler_rse})"
            )
        return Path(self.storage_root) / rse


def embedded_data_facility(spec: CampaignSpec, site: str, workdir: Path) -> DataFacility:
    """The embedded-default `DataFacility` of a site: everything under one work directory.

    Parameters
    ----------
    spec : `~drp_campaign.model.spec.CampaignSpec`
        The campaign.
    site : `str`
        A site of the campaign.
    workdir : `pathlib.Path`
        Work directory; stored as an absolute path, since tasks run from any directory.

    Returns
    -------
    facility : `DataFacility`
        Butler repository ``<workdir>/repos/<site>``, RSEs ``{SITE}_RAW_DISK`` and
        ``{SITE}_BUTLER_DISK`` under ``<workdir>/storage``, embedded catalog, local workload.
    """
    # Imported here: the butler module loads the LSST stack (~2 s), which only this needs.
    from drp_campaign.backends.butler import site_repo_root

    site_spec = spec.site(site)
    root = Path(workdir).expanduser().resolve()
    return DataFacility(
        site=site,
        compute_site=site_spec.compute_site,
        cloud=site_spec.cloud,
        butler_repo=str(site_repo_root(root, site)),
        raw_rse=rse_name(site, "raw"),
        butler_rse=rse_name(site, "butler"),
        storage_root=str(root / "storage"),
        catalog_backend="embedded",
        workload_backend="local",
    )


def _checked(facility: DataFacility, campaign: str, site: str) -> DataFacility:
    # Two spellings of a site (USDF, usdf) share a document name: catch a block that was saved
    # for the other one instead of running a site's work with another site's settings.
    if facility.site != site:
        raise ValueError(
            f"block data-facility/{data_facility_document_name(campaign, site)} describes site "
            f"{facility.site!r}, not {site!r}; save it again for this site"
        )
    return facility


def load_data_facility_document(name: str) -> DataFacility:
    """Load a `DataFacility` block document by name, synchronously from any context.

    Parameters
    ----------
    name : `str`
        Block document name (see `data_facility_document_name`).

    Returns
    -------
    facility : `DataFacility`
        The block.

    Raises
    ------
    ValueError
        If there is no such document (caused by `prefect.exceptions.ObjectNotFound`) or it
        does not validate.
    """
    # _sync=True: Block.load returns a coroutine when called inside an event loop otherwise.
    facility = DataFacility.load(name, _sync=True)  # type: ignore[call-arg]
    if not isinstance(facility, DataFacility):
        raise TypeError(f"block {name!r} loaded as {type(facility).__name__}")
    return facility


def load_data_facility(campaign: str, site: str) -> DataFacility:
    """Load the `DataFacility` of one site of a campaign from the Prefect API.

    Call it in tasks only: loading needs the API, so never at import time.

    Parameters
    ----------
    campaign : `str`
        Campaign name.
    site : `str`
        Site name from the spec.

    Returns
    -------
    facility : `DataFacility`
        The block, its credentials (if any) nested and still wrapped as secrets.

    Raises
    ------
    ValueError
        If no such block exists (Prefect's message names it), or it is for another site.
    """
    name = data_facility_document_name(campaign, site)
    return _checked(load_data_facility_document(name), campaign, site)


async def aload_data_facility(campaign: str, site: str) -> DataFacility:
    """Asynchronous `load_data_facility`, for async tasks.

    Parameters
    ----------
    campaign : `str`
        Campaign name.
    site : `str`
        Site name from the spec.

    Returns
    -------
    facility : `DataFacility`
        The block.
    """
    name = data_facility_document_name(campaign, site)
    return _checked(await DataFacility.aload(name), campaign, site)
