"""Thin Prefect tasks over `drp_campaign.campaign.CampaignRun` (one per coarse unit of work).

Prefect costs 12-24 ms per task and ~1.3 s per subflow here, so tasks are per (step, site,
stage), never per quantum or file; the fine-grained work runs on the Dask client inside them.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from .runtime import campaign_run


@task(name="plan", task_run_name="plan {spec_path}")
def plan_campaign(
    spec_path: str, workdir: str, dask_address: str | None = None, workers: int = 2
) -> dict[str, Any]:
    """Plan the campaign into ``<workdir>/plan`` with Dask (skipped when the ledger has it)."""
    return campaign_run(spec_path, workdir, dask_address=dask_address).plan(dask_address, workers)


@task(name="setup-site", task_run_name="setup {site}")
def setup_site(spec_path: str, workdir: str, site: str) -> dict[str, Any]:
    """Create a site's Butler repository and RSEs."""
    return campaign_run(spec_path, workdir).setup_site(site)


@task(name="distribute-inputs", task_run_name="distribute raws and calibrations")
def distribute_inputs(spec_path: str, workdir: str) -> dict[str, Any]:
    """Replicate calibrations and each site's raws; ingest them on arrival."""
    return campaign_run(spec_path, workdir).distribute_inputs()
