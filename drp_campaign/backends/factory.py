"""The one factory that picks each backend from plain settings (never from globals).

Settings come from the sites' Prefect Blocks (loaded in ``tasks/runtime.py``) or are absent, in
which case the embedded defaults are used under the work directory. Clients are created here,
when a campaign run is assembled, never at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..model.spec import CampaignSpec
from .interfaces import DataCatalog, WorkloadService

__all__ = ["make_campaign_run", "make_catalog", "make_workload"]


def make_catalog(workdir: str | Path, rucio: Mapping[str, Any] | None = None) -> DataCatalog:
    """The campaign's data catalog: Rucio when settings are given, else the embedded one.

    Parameters
    ----------
    workdir : `str` or `pathlib.Path`
        Work directory (the embedded catalog's database, the Rucio event cursor).
    rucio : mapping, optional
        Rucio client settings (host, auth_host, account, vo, auth_type, username, password or
        token).

    Returns
    -------
    catalog : `DataCatalog`
    """
    if rucio is not None:
        from .rucio import RucioCatalog, rucio_client

        return RucioCatalog(rucio_client(rucio), state_path=Path(workdir) / "rucio-events.sqlite")
    from .local.catalog import EmbeddedCatalog

    return EmbeddedCatalog(Path(workdir) / "catalog")


def make_workload(
    site: str,
    workdir: str | Path,
    client: Any,
    panda: Mapping[str, Any] | None = None,
    *,
    retry: Mapping[str, Any] | None = None,
) -> WorkloadService:
    """A site's workload service: PanDA when settings are given, else the local executor.

    Parameters
    ----------
    site : `str`
        Site name.
    workdir : `str` or `pathlib.Path`
        Work directory (the local executor's run states).
    client : `distributed.Client`
        Dask client of the local executor.
    panda : mapping, optional
        PanDA settings (`PandaSettings.from_mapping`: panda_url, panda_url_ssl, cache_url,
        auth, auth_vo, id_token, verify_host, config_root, run_temp_space, idds_server).
    retry : mapping, optional
        ``retries`` and ``backoff_s`` of the PanDA calls (`PandaWorkload`'s defaults if not).

    Returns
    -------
    service : `WorkloadService`
    """
    if panda is not None:
        from .panda import PandaSettings, PandaWorkload

        # BPS writes its submit directories under work_dir, not wherever the flow runs.
        return PandaWorkload(
            PandaSettings.from_mapping(site, panda),
            work_dir=Path(workdir) / "bps" / site,
            **dict(retry or {}),
        )
    from .local.workload import LocalService

    return LocalService(client, Path(workdir) / "workload" / site)


def make_campaign_run(
    spec: CampaignSpec,
    workdir: str | Path,
    client: Any,
    *,
    rucio: Mapping[str, Any] | None = None,
    panda: Mapping[str, Mapping[str, Any] | None] | None = None,
    panda_retry: Mapping[str, Mapping[str, Any]] | None = None,
    repos: Mapping[str, str | None] | None = None,
    **kwargs: Any,
) -> Any:
    """Assemble a `drp_campaign.campaign.CampaignRun` with the chosen backends.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign.
    workdir : `str` or `pathlib.Path`
        Work directory.
    client : `distributed.Client`
        Dask client.
    rucio : mapping, optional
        Rucio settings (the hub's): use Rucio instead of the embedded catalog.
    panda : mapping, optional
        Site -> PanDA settings, for the sites that use PanDA.
    panda_retry : mapping, optional
        Site -> ``retries`` and ``backoff_s`` of its PanDA calls.
    repos : mapping, optional
        Site -> Butler repository (its Block's ``butler_repo``); a site without one uses the
        embedded default's ``<workdir>/repos/<site>`` (what `blocks.embedded_data_facility`
        names), and the run's errors say so.
    **kwargs
        Passed to `CampaignRun` (poll intervals, progress...).

    Returns
    -------
    run : `drp_campaign.campaign.CampaignRun`
    """
    from ..campaign import CampaignRun

    catalog = make_catalog(workdir, rucio)
    # The embedded catalog has no daemons: waiting callers drive its transfer worker.
    pump = getattr(catalog, "process_transfers", None)
    workloads = {
        site: make_workload(
            site, workdir, client, (panda or {}).get(site), retry=(panda_retry or {}).get(site)
        )
        for site in spec.site_names
    }
    from ..seed import embedded_repos
    from .repos import EMBEDDED_SOURCE

    defaults = embedded_repos(spec, workdir)
    given = {s: r for s, r in (repos or {}).items() if r}
    sources = {s: EMBEDDED_SOURCE for s in spec.site_names if s not in given}
    return CampaignRun(
        spec,
        workdir,
        repos={s: str(given.get(s) or defaults[s]) for s in spec.site_names},
        repo_sources={**sources, **dict(kwargs.pop("repo_sources", None) or {})},
        catalog=catalog,
        workloads=workloads,
        client=client,
        pump=pump,
        **kwargs,
    )
