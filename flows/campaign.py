"""The campaign's Prefect flows: they only sequence and fan out.

``drp-campaign`` (plan, set up sites, distribute inputs, every step in order, verify, report)
-> ``drp-step`` (one step at all or some sites: the rerun unit) -> ``drp-site-step`` (one step
at one site, each stage a task). ``drp-plan`` plans with Dask. Parameters are names and paths,
never secrets: credentials come from each site's `DataFacility` Block, loaded in the tasks.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from drp_campaign.campaign import SiteStepFailed, SiteStepResult
from drp_campaign.ledger import SiteStepBusy
from tasks.campaign import (
    distribute_inputs,
    plan_campaign,
    preflight_task,
    replan_campaign,
    retire_lost_sites,
    setup_site,
)
from tasks.runtime import campaign_run

from .tuning import no_heartbeat, stage_task

__all__ = ["drp_campaign_flow", "drp_plan", "drp_replan", "drp_site_step", "drp_step"]


@flow(name="drp-plan", flow_run_name="plan {spec}")
def drp_plan(
    spec: str, workdir: str, dask_address: str | None = None, workers: int = 2
) -> dict[str, Any]:
    """Plan a campaign with Dask into ``<workdir>/plan`` (a coarse task driving a Dask client).

    Parameters
    ----------
    spec : `str`
        Campaign spec path.
    workdir : `str`
        Work directory.
    dask_address : `str`, optional
        An existing Dask scheduler; by default a local cluster on 127.0.0.1.
    workers : `int`
        Workers of the local cluster.
    """
    return plan_campaign(spec, workdir, dask_address, workers)


@flow(name="drp-replan", flow_run_name="replan {spec} without {without}")
def drp_replan(
    spec: str, workdir: str, without: list[str], reason: str | None = None
) -> dict[str, Any]:
    """Re-plan a campaign without sites lost for good, then cancel their open runs.

    The next plan revision gives the lost sites' patches and visits to the others, keeps what
    they published, and cuts their unpublished work into new groups at the new owners. Rerun
    ``drp-campaign`` (or ``drp-step``) afterwards to finish on it.

    Parameters
    ----------
    spec : `str`
        Campaign spec path (every site, the lost ones too).
    workdir : `str`
        Work directory.
    without : `list` [`str`]
        The lost sites (``-p without='["UKDF"]'``).
    reason : `str`, optional
        Why, for the ledger and the report.
    """
    info = replan_campaign(spec, workdir, without, reason)
    retired = retire_lost_sites(spec, workdir)
    get_run_logger().info(
        "plan revision %s without %s: %s tract(s) and %s visit(s) moved; open runs %s",
        info["revision"],
        ", ".join(info["without"]),
        len(info["moved"]["tracts"]),
        len(info["moved"]["visits"]),
        retired or "none",
    )
    return {"revision": info, "retired": retired}


def _campaign_name(spec: str) -> str:
    from drp_campaign.model.spec import load_spec

    try:
        return load_spec(spec).campaign
    except Exception:  # a bad spec fails in the flow itself, with the full message
        return spec


def _step_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    sites = params.get("sites")
    where = ", ".join(sites) if sites else "all sites"
    return f"{_campaign_name(params['spec'])}: {params['step']} @ {where}"


def _site_step_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    group = f" #{params['group']}" if params.get("group") else ""
    return f"{_campaign_name(params['spec'])}: {params['step']} @ {params['site']}{group}"


def _campaign_run_name() -> str:
    from prefect.runtime import flow_run

    return _campaign_name(flow_run.parameters["spec"])


def _phase_runner(phase: str, label: str, fn: Any) -> Any:
    # One Prefect task per phase of a group (build, run), named for the UI like
    # "build step1@FrDF#003"; never one per quantum. The ledger makes each idempotent (so the
    # task has no Prefect cache key, and is made once: flows/tuning.py).
    return stage_task(phase, f"{phase} {label}")(fn)()


def _subflow(fn: Any, *args: Any) -> Any:
    """Call a flow as a subflow of the running one, without its own heartbeat.

    A subflow runs in its parent's process, whose heartbeat already tells the server that the
    process is alive. Its own heartbeat thread sleeps in 1-s steps and the engine joins it at
    the subflow's exit: up to a second per subflow, on the critical path of every step (the
    step's flow waits for its sites' subflows, the campaign for the step's). Flows started
    on their own (a deployment run of ``drp-step`` or ``drp-site-step``) keep theirs.
    """
    with no_heartbeat():  # the settings object is built once (flows/tuning.py)
        return fn(*args)


def _cancel_submitted_run(flow: Any, flow_run: Any, state: Any) -> None:
    """On cancellation of a site-step, cancel its run in the workload system too (PanDA)."""
    params = flow_run.parameters
    run = campaign_run(params["spec"], params["workdir"])
    step, site = params["step"], params["site"]
    for group in run.ledger.groups(step, site):
        run_id = run.ledger.name(step, site, "run_id", group=group)
        if run_id and not run.ledger.is_done(step, site, "submit", group=group):
            run.workloads[site].cancel(run_id)
            run.ledger.fail(
                step, site, "submit", f"cancelled with the flow run (run {run_id})", group=group
            )


@flow(
    name="drp-site-step",
    flow_run_name=_site_step_run_name,
    on_cancellation=[_cancel_submitted_run],
)
def drp_site_step(
    spec: str,
    step: str,
    site: str,
    workdir: str,
    fresh: bool = False,
    group: str | None = None,
) -> dict[str, Any]:
    """Run one step at one site, group by group: stage inputs, BPS file, graph, submit and
    wait, publish, arrive (two tasks per group: build, run).

    Parameters
    ----------
    spec : `str`
        Campaign spec path.
    step : `str`
        Step name.
    site : `str`
        Site name.
    workdir : `str`
        Work directory.
    fresh : `bool`, optional
        Start over as a new attempt (new output run, graph and BPS directory) instead of
        resuming; refused for a group whose products are published. A cancelled run is
        resubmitted as a new attempt without it.
    group : `str`, optional
        Only this group (``g003``, as ``drp-campaign status`` and the ledger name it).
    """
    run = campaign_run(spec, workdir)
    if site not in run.sites_of(step):
        raise ValueError(
            run.lost_site_message(site)
            or f"{step} runs at {', '.join(run.sites_of(step))} only (placement "
            f"'{run.spec.step(step).placement}'), not at {site}"
        )
    groups = [group] if group else None
    if fresh:
        attempts = run.forget_site_step(step, site, groups)
        get_run_logger().info(
            "%s at %s: starting over: %s",
            step,
            site,
            ", ".join(f"{g} as attempt {n}" for g, n in attempts.items()),
        )
    result = run.run_site_step(step, site, runner=_phase_runner, groups=groups)
    return vars(result)


def _site_step_in_thread(spec: str, step: str, site: str, workdir: str) -> Any:
    try:
        return _subflow(drp_site_step, spec, step, site, workdir)
    except (SiteStepFailed, SiteStepBusy) as exc:
        return exc


@flow(name="drp-step", flow_run_name=_step_run_name)
def drp_step(spec: str, step: str, workdir: str, sites: list[str] | None = None) -> dict[str, Any]:
    """Run one step at all (or the given) sites concurrently; the unit of reruns.

    A gathered step runs at the hub only. Sites that fail do not stop the others; the flow
    fails at the end naming every failed site and its cause.

    Parameters
    ----------
    spec : `str`
        Campaign spec path.
    step : `str`
        Step name.
    workdir : `str`
        Work directory.
    sites : `list` [`str`], optional
        Only these sites (default: every site that runs the step).
    """
    logger = get_run_logger()
    run = campaign_run(spec, workdir)
    targets = run.sites_of(step)
    if sites:
        lost = [m for s in sites if (m := run.lost_site_message(s))]
        if lost:
            raise ValueError("; ".join(lost))
        unknown = sorted(set(sites) - set(run.spec.site_names))
        if unknown:
            raise ValueError(f"unknown site(s) {unknown}; the spec has {run.spec.site_names}")
        targets = [s for s in targets if s in sites]
    if run.lost:
        retire_lost_sites(spec, workdir)  # once per revision (the ledger); never waits
    # Sites run in threads, each with a copy of this flow's context so that its subflow run is
    # recorded as a child of this one.
    with ThreadPoolExecutor(max_workers=max(len(targets), 1)) as pool:
        futures = {
            site: pool.submit(
                contextvars.copy_context().run, _site_step_in_thread, spec, step, site, workdir
            )
            for site in targets
        }
        outcomes = {site: f.result() for site, f in futures.items()}
    failures = {s: o for s, o in outcomes.items() if isinstance(o, BaseException)}
    results = {s: o for s, o in outcomes.items() if not isinstance(o, BaseException)}
    for site, result in results.items():
        logger.info(
            "%s at %s: %s",
            step,
            site,
            "nothing to do"
            if result["skipped"]
            else f"{result['n_quanta']} quanta in {result['groups']} group(s)",
        )
    _publish_ledger(run)
    if failures:
        lines = [f"{site}: {exc}" for site, exc in failures.items()]
        raise RuntimeError(
            f"{step} failed at {len(failures)} site(s); the others finished. Rerun with "
            f"`prefect deployment run 'drp-step/default' -p step={step} -p "
            f"sites='{sorted(failures)}'` once fixed.\n" + "\n".join(lines)
        )
    return {"step": step, "sites": results}


def _publish_ledger(run: Any) -> None:
    rows = [
        {
            "step": r.step,
            "site": r.site,
            "group": r.group,
            "stage": r.stage,
            "state": r.state,
            "seconds": round(r.seconds, 2) if r.seconds is not None else None,
            "error": (r.error or "")[:200],
        }
        for r in run.ledger.records()
    ]
    try:
        create_table_artifact(
            key=f"{run.spec.campaign}-ledger", table=rows, description="Campaign ledger"
        )
    except Exception as exc:  # an artifact is a view: never fail the work for it
        get_run_logger().warning("could not publish the ledger artifact: %s", exc)


@flow(name="drp-campaign", flow_run_name=_campaign_run_name)
def drp_campaign_flow(
    spec: str,
    workdir: str,
    steps: list[str] | None = None,
    dask_address: str | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Run a whole campaign: preflight, plan, set up sites, distribute inputs, every step, report.

    Parameters
    ----------
    spec : `str`
        Campaign spec path.
    workdir : `str`
        Work directory.
    steps : `list` [`str`], optional
        Only these steps (default: all, in the spec's order).
    dask_address : `str`, optional
        An existing Dask scheduler for planning.
    verify : `bool`
        Compare the hub's products with a single-site reference run and write the report.
    """
    from tasks.report import report_task

    # Every site checked before anything is planned, written or moved (PreflightFailed).
    preflight_task(spec, workdir, dask_address)
    _subflow(drp_plan, spec, workdir, dask_address)
    run = campaign_run(spec, workdir)
    for site in run.spec.site_names:
        setup_site(spec, workdir, site)
    distribute_inputs(spec, workdir)
    if run.lost:
        retire_lost_sites(spec, workdir)
    results: dict[str, Any] = {}
    todo = list(steps or run.spec.step_names)
    progress = _progress_artifact(run.spec.campaign)
    for i, step in enumerate(todo, start=1):
        results[step] = _subflow(drp_step, spec, step, workdir)
        if progress is not None:
            update_progress_artifact(progress, 100.0 * i / len(todo))
    report = report_task(spec, workdir, verify)
    try:
        create_markdown_artifact(
            key=f"{run.spec.campaign}-milestone",
            markdown=report["markdown"],
            description="RTN-057 milestone report",
        )
    except Exception as exc:
        get_run_logger().warning("could not publish the report artifact: %s", exc)
    return {"steps": list(results), "report": report["path"], "passed": report["passed"]}


def _progress_artifact(campaign: str) -> Any:
    try:
        return create_progress_artifact(
            0.0, key=f"{campaign}-progress", description="Steps done at every site"
        )
    except Exception as exc:  # a view, never a reason to fail the campaign
        get_run_logger().warning("could not create the progress artifact: %s", exc)
        return None


def site_step_result(data: dict[str, Any]) -> SiteStepResult:
    """Rebuild a `SiteStepResult` from a flow's return value."""
    return SiteStepResult(**data)
