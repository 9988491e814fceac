"""Thin Prefect tasks over `drp_campaign.campaign.CampaignRun` (one per coarse unit of work).

Prefect costs 12-24 ms per task and ~1.3 s per subflow here, so tasks are per (step, site,
stage), never per quantum or file; the fine-grained work runs on the Dask client inside them.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from drp_campaign.model.spec import load_spec

from .runtime import campaign_run


@task(name="preflight", task_run_name="preflight {spec_path}")
def preflight_task(
    spec_path: str, workdir: str, dask_address: str | None = None, token_margin_hours: float = 12.0
) -> dict[str, Any]:
    """Check every site before anything moves; publish the rows; raise if any check fails.

    Raises
    ------
    drp_campaign.preflight.PreflightFailed
        Naming every failed (site, check) and its fix; the flow stops there.
    """
    from prefect.artifacts import create_table_artifact

    from drp_campaign.preflight import PreflightFailed

    from .runtime import preflight_campaign

    report = preflight_campaign(
        spec_path, workdir, dask_address=dask_address, token_margin_hours=token_margin_hours
    )
    campaign = load_spec(spec_path).campaign
    try:
        create_table_artifact(
            key=f"{campaign}-preflight".lower(),
            table=report.rows(),
            description=f"Preflight of every site: {report.summary()}",
        )
    except Exception as exc:  # a view, never a reason to hide the verdict
        get_run_logger().warning("could not publish the preflight artifact: %s", exc)
    if not report.passed:
        raise PreflightFailed(report)
    get_run_logger().info("preflight: %s", report.summary())
    return {"summary": report.summary(), "rows": report.rows()}


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


@task(name="replan", task_run_name="replan without {without}")
def replan_campaign(
    spec_path: str, workdir: str, without: list[str], reason: str | None = None
) -> dict[str, Any]:
    """Write the next plan revision without the lost sites (`drp_campaign.replan.replan`)."""
    from drp_campaign.replan import replan

    return replan(load_spec(spec_path), workdir, without, reason=reason, spec_label=spec_path)


@task(name="retire-lost-sites", task_run_name="cancel the lost sites' open runs")
def retire_lost_sites(spec_path: str, workdir: str) -> dict[str, Any]:
    """Cancel the lost sites' open workload runs where they still answer; never wait for them."""
    return campaign_run(spec_path, workdir).retire_lost()
