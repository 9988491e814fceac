"""The verification and milestone-report task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from .runtime import campaign_run


@task(name="report", task_run_name="verify and report")
def report_task(spec: str, workdir: str, verify: bool = True) -> dict[str, Any]:
    """Run the single-site reference (if ``verify``), compare, and write the milestone report.

    Returns
    -------
    report : `dict`
        ``path`` of ``milestone.md``, ``passed`` (every test PASS and equal), ``markdown``.
    """
    from drp_campaign.report.milestone import write_milestone
    from drp_campaign.verify import reference_and_compare

    run = campaign_run(spec, workdir)
    verification = None
    if verify:
        verification = reference_and_compare(run)
    result = write_milestone(run, verification, Path(workdir) / "report")
    return {
        "path": str(result.markdown_path),
        "passed": result.passed if verify else result.tests_passed,
        "markdown": result.markdown,
    }
