"""One step at one site: its groups run through their stages, graphs built ahead of execution.

Every group goes through two phases, each one coarse unit for the orchestrator (one Prefect
task each, named like ``build step1@FrDF#003``): ``build`` (stage its inputs, write its BPS file,
build its graph) and ``run`` (submit and wait, publish, arrive). Groups run in
threads: while the first ones run, the next ones build their graphs on the Dask client. At most
``in_flight`` groups of a site are submitted at once (a real WMS queue is the limit), and at
most as many more are building ahead, so a site-step of thousands of groups never holds
thousands of threads or graphs. A group that fails does not stop the others; the site-step
fails at the end naming every failed group, its stage, its cause and its rerun command.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..ledger import StageState
from . import bps, build, inputs, publish, submit
from .errors import GroupFailure, Skip

if TYPE_CHECKING:
    from ..campaign import CampaignRun, SiteStepResult
    from ..model.units import WorkUnit

__all__ = ["PHASES", "STAGES", "GroupFailure", "PhaseRunner", "run_group", "run_site_step"]

#: The stages of a group, in order, and the function that does each.
STAGES: Mapping[str, Callable[[CampaignRun, WorkUnit], dict[str, Any]]] = {
    "stage": inputs.stage_inputs,
    "bps": bps.write_submit,
    "build": build.build_graph,
    "submit": submit.submit_and_wait,
    "publish": publish.publish,
    "arrive": publish.arrive,
}
#: The phases of a group (one orchestrator task each) and the stages each runs. Two, not one
#: per stage: at DR1 a campaign has thousands of groups, and each task run costs the
#: orchestrator and its database.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("build", ("stage", "bps", "build")),
    ("run", ("submit", "publish", "arrive")),
)

#: ``runner(phase, label, fn)`` runs one phase's work ``fn()``; the flows make it a task.
PhaseRunner = Callable[[str, str, Callable[[], dict[str, Any]]], dict[str, Any]]


@dataclass
class GroupOutcome:
    """What one group did: its figures per stage, or that it had nothing to do."""

    unit: WorkUnit
    skipped: bool = False
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)


def _direct(phase: str, label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    return fn()


def run_group(
    run: CampaignRun,
    unit: WorkUnit,
    runner: PhaseRunner = _direct,
    slots: threading.Semaphore | None = None,
) -> GroupOutcome:
    """Run every stage of one group that the ledger does not have as done.

    Parameters
    ----------
    run : `CampaignRun`
        The campaign.
    unit : `WorkUnit`
        The group.
    runner : callable, optional
        Runs each phase (the flows pass one that makes it a Prefect task).
    slots : `threading.Semaphore`, optional
        Held while the group is submitted: the site's bound on groups in flight.

    Returns
    -------
    outcome : `GroupOutcome`

    Raises
    ------
    GroupFailure
        Naming the group, the stage and the cause.
    """
    try:
        unit = submit.resume_cancelled(run, unit)
    except Exception as exc:
        raise GroupFailure(unit, "submit", f"{type(exc).__name__}: {exc}") from exc
    outcome = GroupOutcome(unit)

    def phase_work(stages: Sequence[str]) -> dict[str, Any]:
        done: dict[str, Any] = {}
        for stage in stages:
            record = run.ledger.get(unit.step, unit.site, stage, group=unit.name)
            if record is not None and record.state == StageState.SKIPPED:
                return {"skipped": record.figures.get("reason", "nothing to do")}
            work = functools.partial(STAGES[stage], run, unit)
            try:
                if slots is not None and stage == "submit":
                    with slots:  # the site's bound on groups in flight
                        done[stage] = run.run_stage(
                            unit.step, unit.site, stage, work, group=unit.name
                        )
                else:
                    done[stage] = run.run_stage(unit.step, unit.site, stage, work, group=unit.name)
            except Skip as skip:  # recorded SKIPPED by run_stage: the phase itself succeeds
                return {"skipped": str(skip)}
            except GroupFailure:
                raise
            except Exception as exc:
                raise GroupFailure(unit, stage, f"{type(exc).__name__}: {exc}") from exc
        return done

    for phase, stages in PHASES:
        try:
            figures = runner(phase, unit.label, functools.partial(phase_work, stages))
        except GroupFailure:
            raise
        except Exception as exc:  # the runner's own (the orchestrator's): named like a stage's
            raise GroupFailure(unit, phase, f"{type(exc).__name__}: {exc}") from exc
        if "skipped" in figures:
            run.progress(f"{unit.label}: nothing to do ({figures['skipped']})")
            outcome.skipped = True
            return outcome
        outcome.figures.update(figures)
    return outcome


def run_site_step(
    run: CampaignRun,
    step: str,
    site: str,
    runner: PhaseRunner | None = None,
    groups: Sequence[str] | None = None,
) -> SiteStepResult:
    """Run one step at one site: every group (or the named ones), at most ``in_flight`` at once.

    Parameters
    ----------
    run : `CampaignRun`
        The campaign.
    step, site : `str`
        The site-step.
    runner : callable, optional
        Runs each group's phases (default: call them).
    groups : sequence of `str`, optional
        Only these groups (``g003``): an operator's rerun of one group.

    Returns
    -------
    result : `SiteStepResult`

    Raises
    ------
    drp_campaign.campaign.SiteStepFailed
        When any group failed, after every other group finished; names each failed group.
    drp_campaign.ledger.SiteStepBusy
        If another live process is running the same site-step.
    ValueError
        If a named group is not one of the site-step's.
    """
    from ..campaign import SiteStepFailed, SiteStepResult

    result = SiteStepResult(step, site)
    with run.ledger.claim(step, site):
        units = run.units(step, site)
        if groups is not None:
            unknown = sorted(set(groups) - {u.name for u in units})
            if unknown:
                raise ValueError(
                    f"{step} at {site} has no group {', '.join(unknown)}; its groups are "
                    f"{', '.join(u.name for u in units) or 'none'} (plan/groups.json)"
                )
            units = [u for u in units if u.name in set(groups)]
        if not units:
            reason = f"no visit or patch of the campaign is assigned to {site}"
            run.ledger.start(step, site, "groups")
            run.ledger.finish(step, site, "groups", {"reason": reason}, skipped=True)
            run.progress(f"{step} {site}: nothing to do ({reason})")
            result.skipped = True
            return result
        in_flight = run.groups_in_flight(site)
        slots = threading.Semaphore(in_flight)
        # Groups building ahead are bounded too: at most as many as may run at once.
        workers = min(len(units), 2 * in_flight)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{step}@{site}") as pool:
            futures = [
                pool.submit(
                    contextvars.copy_context().run,
                    run_group,
                    run,
                    unit,
                    runner or _direct,
                    slots,
                )
                for unit in units
            ]
            outcomes: list[GroupOutcome | BaseException] = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except Exception as exc:  # every group finishes before the site-step fails
                    outcomes.append(exc)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    done = [o for o in outcomes if isinstance(o, GroupOutcome)]
    result.groups = len(units)
    result.groups_skipped = sum(o.skipped for o in done)
    for o in done:
        staged = o.figures.get("stage", {})
        result.staged_files += int(staged.get("files", 0))
        result.staged_bytes += int(staged.get("bytes", 0))
        result.n_quanta += int(o.figures.get("build", {}).get("n_quanta", 0))
        published = o.figures.get("publish", {})
        result.published_files += int(published.get("files", 0))
        result.published_bytes += int(published.get("bytes", 0))
    result.skipped = not failures and result.groups_skipped == len(units)
    for record in run.ledger.records(step, site):
        if record.seconds is not None:
            result.stages_s[record.stage] = result.stages_s.get(record.stage, 0.0) + record.seconds
    if failures:
        first = failures[0]
        stage = first.stage if isinstance(first, GroupFailure) else "submit"
        lines = [str(f) for f in failures]
        hints = [f.unit.rerun_hint() for f in failures if isinstance(f, GroupFailure)]
        # One failure reads as before groups (its cause first); the cause is chained too, so
        # callers can tell a refused token from a failed run.
        head = f"{first.cause}\n" if len(failures) == 1 and isinstance(first, GroupFailure) else ""
        raise SiteStepFailed(
            step,
            site,
            stage,
            head
            + f"{len(failures)} of {len(units)} group(s) failed; the others finished.\n"
            + "\n".join(lines)
            + ("\nRerun: " + "\n       ".join(dict.fromkeys(hints)) if hints else ""),
            groups=[f.unit.name for f in failures if isinstance(f, GroupFailure)],
        ) from (first.__cause__ or first)
    return result
