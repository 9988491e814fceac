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

__all__ = ["campaign_run", "close_all", "dask_client", "load_facilities"]

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


def load_facilities(spec: CampaignSpec) -> dict[str, Any]:
    """Each site's `DataFacility` Block, or `None` where none was saved (embedded defaults)."""
    try:
        from blocks import load_data_facility
    except ImportError:  # pragma: no cover - the blocks package ships with the project
        return dict.fromkeys(spec.site_names)
    out: dict[str, Any] = {}
    for site in spec.site_names:
        try:
            out[site] = load_data_facility(spec.campaign, site)
        except ValueError as err:
            # Only a missing block means "embedded defaults"; a block that no longer
            # validates, or one saved for another site, is an operator error to report.
            if "unable to find" not in str(err).lower() and "not found" not in str(err).lower():
                raise
            _LOG.debug("no DataFacility block for %s (%s): embedded defaults", site, err)
            out[site] = None
    return out


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
        from drp_campaign.model.naming import data_facility_block

        run = make_campaign_run(
            spec,
            wd,
            dask_client(dask_address),
            # Where each site's repository is: its Block, nothing else (DESIGN.md section 10).
            repos={s: f.butler_repo for s, f in facilities.items() if f is not None},
            repo_sources={
                s: f"Block {data_facility_block(spec.campaign, s)}"
                for s, f in facilities.items()
                if f is not None
            },
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
