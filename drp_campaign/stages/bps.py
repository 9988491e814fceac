"""Stage ``bps``: a group's BPS submit file, rendered from its `WorkUnit`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..model.bps import SiteStepSubmit, render_submit_yaml

if TYPE_CHECKING:
    from ..campaign import CampaignRun
    from ..model.units import WorkUnit

__all__ = ["write_submit"]


def write_submit(run: CampaignRun, unit: WorkUnit) -> dict[str, Any]:
    """Render and write the group's BPS submit file (atomically).

    Returns
    -------
    figures : `dict`
        ``file``: the submit file's path.
    """
    site_spec = run.spec.sites[unit.site]
    workload: Literal["local", "panda"] = (
        "panda" if type(run.workloads[unit.site]).__name__ == "PandaWorkload" else "local"
    )
    submit = SiteStepSubmit(
        campaign=unit.campaign,
        step=unit.step,
        subset=unit.subset,
        site=unit.site,
        compute_site=site_spec.compute_site,
        cloud=site_spec.cloud,
        pipeline_yaml=run.pipeline_uri,
        butler_config=run.repo_uri(unit.site),
        data_query=unit.where,
        input_collections=run.input_collections(unit.site),
        output_run=unit.output_run,
        output_collection=unit.output_collection,
        workload=workload,
        submit_path=str(run.workdir / unit.submit_path),
        payload=unit.payload_name,
    )
    path = run.workdir / unit.submit_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_submit_yaml(submit))
    tmp.replace(path)
    return {"file": str(path)}


def submit_file(run: CampaignRun, unit: WorkUnit) -> Path:
    """Where the group's submit file is (written by `write_submit`)."""
    return run.workdir / unit.submit_file
