"""Stage ``stage``: move to the site exactly the inputs a group's graph needs and lacks.

Where the step may read inputs held elsewhere (`drp_campaign.model.staging.needs_probe`),
the group's graph is first built at the hub (which holds every published product) and its
overall inputs compared with the site's datasets; the missing ones (overlap PVIs before a
tract step, a gathered step's per-visit outputs, other sites' coadd catalogs) are attached to
one catalog dataset ruled to the site and ingested on arrival.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends.interfaces import DID, rse_name
from ..backends.qgraph import EmptyGraphError, GraphRequest
from ..backends.staging import ProbeRequest, probe_missing
from .errors import Skip

if TYPE_CHECKING:
    from ..campaign import CampaignRun
    from ..model.units import WorkUnit

__all__ = ["stage_inputs"]


def stage_inputs(run: CampaignRun, unit: WorkUnit) -> dict[str, Any]:
    """Stage the group's missing inputs at its site and wait until they are ingested.

    Returns
    -------
    figures : `dict`
        ``files``, ``bytes`` moved and the ``runs`` they came from.

    Raises
    ------
    Skip
        If the group's graph at the hub is empty (nothing to do).
    """
    from ..campaign import campaign_output, staged_collection

    if unit.site == run.hub:
        return {"files": 0, "bytes": 0, "runs": []}
    if unit.group.revision == 0 and not run.needs_probe(unit.step):
        # Everything the step reads is a campaign input or was made at this site. Not so for a
        # re-plan's group: its visits were homed at the lost site, whose published products
        # (and raws) are at the hub only.
        return {"files": 0, "bytes": 0, "runs": [], "probe": False}
    # Everything published (if anything yet) and the campaign's inputs.
    hub_inputs = [run.input_chain()]
    with run.butler(run.hub, writeable=False) as hub:
        if campaign_output(run.spec.campaign) in hub.collections.query("*"):
            hub_inputs.insert(0, campaign_output(run.spec.campaign))
    graph = GraphRequest(
        repo_root=run.repo_uri(run.hub),
        pipeline_yaml=run.pipeline_uri,
        subset=unit.subset,
        where=unit.where,
        input_collections=tuple(hub_inputs),
        output_run=unit.probe_run,
        out_file=str(run.workdir / unit.probe_path),
        site=unit.site,
        output=None,
    )
    request = ProbeRequest(
        graph,
        run.repo_uri(unit.site),
        tuple(run.input_collections(unit.site)),
        str(run.repo(run.hub)),
    )
    try:
        missing = run.client.submit(probe_missing, request, pure=False).result()
    except EmptyGraphError as err:
        raise Skip(f"nothing to do: {err}") from err
    if not missing:
        return {"files": 0, "bytes": 0, "runs": [], "probe": True}
    dids = [DID(run.scope, m.path) for m in missing]
    dataset = DID(run.scope, unit.staged_dataset)
    run.catalog.add_dataset(dataset)
    run.catalog.attach(dataset, dids)
    run.catalog.close(dataset)
    rule = run.catalog.add_rule(dataset, rse_name(unit.site, "butler"))
    run.ledger.set_name(unit.step, unit.site, "stage_rule", rule, group=unit.name)
    n = run.wait_until_arrived(unit.site, [rule])
    runs = sorted({m.run for m in missing})
    run.add_to_chain(unit.site, staged_collection(run.spec.campaign, unit.site), runs)
    files = run.catalog.list_dataset_files(dataset)
    return {"files": n, "bytes": sum(f.bytes for f in files), "runs": runs, "probe": True}
