"""The one place a campaign's runtime is assembled: Blocks loaded, backends chosen, clients made.

Flows and tasks get a `drp_campaign.campaign.CampaignRun` from `campaign_run`, cached per
process and (spec, work directory): the Dask cluster, the catalog and the workload services are
created once, on first use, never at import. Each site's `DataFacility` Block says which
backends it uses; a site without a Block uses the embedded defaults under the work directory.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from drp_campaign.backends.factory import make_campaign_run
from drp_campaign.campaign import CampaignRun
from drp_campaign.model.spec import CampaignSpec, load_spec

__all__ = [
    "campaign_run",
    "close_all",
    "dask_client",
    "load_facilities",
    "preflight_campaign",
    "site_repos",
]

_LOG = logging.getLogger(__name__)
_LOCK = threading.RLock()
_RUNS: dict[tuple[str, str], CampaignRun] = {}
_CLIENTS: dict[str | None, tuple[Any, contextlib.ExitStack]] = {}
DEFAULT_WORKERS = 2


def dask_client(address: str | None = None, workers: int = DEFAULT_WORKERS) -> Any:
    """The process's Dask client: the cluster at ``address``, else a local one on 127.0.0.1.

    Local workers are single-threaded processes (the Butler is not thread-safe), started once
    and shared by every task of this process.
    """
    from drp_campaign.planner import dask_client as make_client

    with _LOCK:
        if address not in _CLIENTS:
            stack = contextlib.ExitStack()
            client = stack.enter_context(make_client(address, workers=max(workers, 2)))
            _CLIENTS[address] = (client, stack)
        return _CLIENTS[address][0]


def load_facilities(spec: CampaignSpec, *, keep_errors: bool = False) -> dict[str, Any]:
    """Each site's `DataFacility` Block, or `None` where none was saved (embedded defaults).

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign.
    keep_errors : `bool`
        Return the exception of a Block that does not load (preflight reports it) instead
        of raising it.
    """
    try:
        from blocks import load_data_facility
    except ImportError:  # pragma: no cover - the blocks package ships with the project
        return dict.fromkeys(spec.site_names)
    out: dict[str, Any] = {}
    for site in spec.site_names:
        try:
            out[site] = load_data_facility(spec.campaign, site)
        except Exception as err:
            # Only a missing block means "embedded defaults"; a block that no longer
            # validates, or one saved for another site, is an operator error to report.
            text = str(err).lower()
            if isinstance(err, ValueError) and ("unable to find" in text or "not found" in text):
                _LOG.debug("no DataFacility block for %s (%s): embedded defaults", site, err)
                out[site] = None
            elif keep_errors:
                out[site] = err
            else:
                raise
    return out


def site_repos(
    spec: CampaignSpec, workdir: str | Path, facilities: dict[str, Any]
) -> tuple[dict[str, str], dict[str, str]]:
    """Each site's Butler repository and where it is named (its Block, or the embedded default).

    Returns
    -------
    repos, sources : `dict` [`str`, `str`]
        Site -> repository URI; site -> ``Block data-facility/...`` or the embedded default.
    """
    from drp_campaign.backends.repos import EMBEDDED_SOURCE
    from drp_campaign.model.naming import data_facility_block
    from drp_campaign.seed import embedded_repos

    defaults = embedded_repos(spec, workdir)
    repos, sources = {}, {}
    for site in spec.site_names:
        f = facilities.get(site)
        named = f is not None and not isinstance(f, BaseException)
        repos[site] = str(f.butler_repo) if f is not None and named else defaults[site]
        sources[site] = (
            f"Block {data_facility_block(spec.campaign, site)}" if named else EMBEDDED_SOURCE
        )
    return repos, sources


def preflight_campaign(
    spec_path: str | Path,
    workdir: str | Path,
    *,
    dask_address: str | None = None,
    token_margin_hours: float = 12.0,
) -> Any:
    """Preflight every site of a campaign as its run would see them (the current plan revision).

    Returns
    -------
    report : `drp_campaign.model.preflight.PreflightReport`
    """
    from datetime import timedelta

    from drp_campaign.model.replan import revised_spec
    from drp_campaign.preflight import preflight_sites
    from drp_campaign.replan import current_revision

    revision = current_revision(workdir)
    spec = revised_spec(load_spec(spec_path), revision.lost)
    facilities = load_facilities(spec, keep_errors=True)
    repos, sources = site_repos(spec, workdir, facilities)
    return preflight_sites(
        spec,
        workdir,
        facilities,
        repos=repos,
        blocks=sources,
        dask_address=dask_address,
        token_margin=timedelta(hours=token_margin_hours),
        spec_path=spec_path,
        plan_dir=revision.plan_dir,
    )


def campaign_run(
    spec_path: str | Path, workdir: str | Path, *, dask_address: str | None = None
) -> CampaignRun:
    """The `CampaignRun` of a spec and work directory in this process (created once).

    Parameters
    ----------
    spec_path : `str` or `pathlib.Path`
        The campaign spec.
    workdir : `str` or `pathlib.Path`
        The work directory.
    dask_address : `str`, optional
        A Dask scheduler to use instead of a local cluster.

    Returns
    -------
    run : `CampaignRun`
    """
    key = (str(Path(spec_path).absolute()), str(Path(workdir).absolute()))
    with _LOCK:
        if key in _RUNS:
            return _RUNS[key]
        spec = load_spec(spec_path)
        wd = Path(workdir).absolute()
        facilities = load_facilities(spec)
        hub = facilities.get(spec.hub)
        rucio = (
            hub.rucio.client_settings()
            if hub is not None and getattr(hub, "catalog_backend", "embedded") == "rucio"
            else None
        )
        on_panda = {
            site: f.panda
            for site, f in facilities.items()
            if f is not None and getattr(f, "workload_backend", "local") == "panda"
        }
        # Where each site's repository is: its Block, nothing else (DESIGN.md section 10).
        repos, sources = site_repos(spec, wd, facilities)
        run = make_campaign_run(
            spec,
            wd,
            dask_client(dask_address),
            repos=repos,
            repo_sources=sources,
            in_flight={s: f.groups_in_flight for s, f in facilities.items() if f is not None},
            rucio=rucio,
            panda={site: c.panda_settings(site) for site, c in on_panda.items()},
            panda_retry={site: c.retry_policy() for site, c in on_panda.items()},
        )
        _RUNS[key] = run
        return run


@atexit.register
def close_all() -> None:
    """Close the cached Dask clusters (at exit, or between tests)."""
    with _LOCK:
        _RUNS.clear()
        for _, stack in _CLIENTS.values():
            with contextlib.suppress(Exception):
                stack.close()
        _CLIENTS.clear()
