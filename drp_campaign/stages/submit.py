"""Stage ``submit``: the workload service runs the group's graph; a rerun polls, never resubmits.

The run id is recorded before the wait, so a rerun after a crash polls the same run. A local
run whose process died mid-way is resubmitted (quanta with outputs are skipped); a failed run
is restarted; a cancelled one is left to `resume_cancelled`, which starts a fresh attempt.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.butler import prepare_graph_outputs
from ..backends.interfaces import TERMINAL_STATES, WorkloadState
from .errors import GroupFailure

if TYPE_CHECKING:
    from ..campaign import CampaignRun
    from ..model.units import WorkUnit

__all__ = ["resume_cancelled", "submit_and_wait"]


def submit_and_wait(run: CampaignRun, unit: WorkUnit) -> dict[str, Any]:
    """Submit the group's BPS file and graph (once) and wait for the run to end.

    Returns
    -------
    figures : `dict`
        ``run_id``, ``wait_s`` and the quanta that succeeded per task ``labels``.

    Raises
    ------
    GroupFailure
        If the run did not succeed: names the group, its failing labels and quanta, and the
        command that reruns it.
    """
    service = run.workloads[unit.site]
    bps = run.figures(unit, "bps")
    built = run.figures(unit, "build")
    ledger, key = run.ledger, (unit.step, unit.site)
    run_id = ledger.name(*key, "run_id", group=unit.name)
    status = service.status(run_id) if run_id else None
    local = type(service).__name__ == "LocalService"
    if status is None or (local and status.state == WorkloadState.RUNNING):
        # Never submitted, or a local run whose process died: (re)submit. A remote run that
        # is still RUNNING is polled below, never submitted twice. The output run and chain
        # are created here, atomically, so that the final job's own (non-atomic)
        # registrations find them whole even if a kill interrupts that job.
        with run.chain_lock, run.butler(unit.site) as butler:
            prepare_graph_outputs(butler, built["graph"])
        run_id = service.submit(Path(bps["file"]), Path(built["graph"]))
        ledger.set_name(*key, "run_id", run_id, group=unit.name)
    elif status.state == WorkloadState.FAILED:
        run_id = service.restart(run_id)  # type: ignore[arg-type]
        ledger.set_name(*key, "run_id", run_id, group=unit.name)
    assert run_id is not None
    t0 = time.monotonic()
    delay = run.poll_s
    while True:
        status = service.status(run_id)
        if status.state in TERMINAL_STATES:
            break
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    if status.state != WorkloadState.SUCCEEDED:
        labels = ", ".join(
            f"{lab.label}: {lab.failed}/{lab.total} failed (exit codes {list(lab.exit_codes)})"
            for lab in status.failed_labels
        )
        cancelled = status.state == WorkloadState.CANCELLED
        raise GroupFailure(
            unit,
            "submit",
            f"run {run_id} {status.state.value}: {labels or status.message}"
            + (f"\n{status.message}" if labels and status.message else "")
            + (
                f"\nRerun the group to submit it afresh as attempt {unit.attempt + 1}: "
                if cancelled
                else "\nOnce fixed, rerun the group: "
            )
            + unit.rerun_hint(),
        )
    return {
        "run_id": run_id,
        "wait_s": time.monotonic() - t0,
        "labels": {lab.label: lab.succeeded for lab in status.labels},
    }


def resume_cancelled(run: CampaignRun, unit: WorkUnit) -> WorkUnit:
    """A rerun after the group's run was cancelled submits it afresh, as a new attempt.

    A cancelled run cannot be resumed (neither PanDA nor BPS restarts it), and rerunning the
    group is how the operator says it should run after all.

    Returns
    -------
    unit : `WorkUnit`
        ``unit`` itself, or the group's new attempt.
    """
    run_id = run.ledger.name(unit.step, unit.site, "run_id", group=unit.name)
    if run_id is None or run.ledger.is_done(unit.step, unit.site, "submit", group=unit.name):
        return unit
    if run.workloads[unit.site].status(run_id).state != WorkloadState.CANCELLED:
        return unit
    fresh = run.new_attempt(unit, keep=("stage",))
    run.progress(
        f"{unit.label}: run {run_id} was cancelled; submitting attempt {fresh.attempt} "
        f"as {fresh.output_run}"
    )
    return fresh
