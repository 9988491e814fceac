"""Stage ``stage``: move to the site exactly the inputs a group's graph needs and lacks.

Where the step may read inputs held elsewhere (`drp_campaign.model.staging.needs_probe`),
the group's graph is first built at the hub (which holds every published product) and its
overall inputs compared with the site's datasets; the missing ones (overlap PVIs before a
tract step, a gathered step's per-visit outputs, other sites' coadd catalogs) are attached to
one catalog dataset ruled to the site and ingested on arrival.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.interfaces import DID, rse_name
from ..backends.qgraph import EmptyGraphError, GraphRequest, build_request
from .errors import Skip

if TYPE_CHECKING:
    from ..campaign import CampaignRun
    from ..model.units import WorkUnit

__all__ = ["overall_inputs", "stage_inputs"]


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
    from ..campaign import campaign_output, site_has, staged_collection

    if unit.site == run.hub:
        return {"files": 0, "bytes": 0, "runs": []}
    if not run.needs_probe(unit.step):
        # Everything the step reads is a campaign input or was made at this site.
        return {"files": 0, "bytes": 0, "runs": [], "probe": False}
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    from ..backends import zipfix

    zipfix.apply()
    probe_file = run.workdir / unit.probe_path
    # Everything published (if anything yet) and the campaign's inputs.
    hub_inputs = [run.input_chain()]
    with run.butler(run.hub, writeable=False) as hub:
        if campaign_output(run.spec.campaign) in hub.collections.query("*"):
            hub_inputs.insert(0, campaign_output(run.spec.campaign))
    request = GraphRequest(
        repo_root=run.repo_uri(run.hub),
        pipeline_yaml=run.pipeline_uri,
        subset=unit.subset,
        where=unit.where,
        input_collections=tuple(hub_inputs),
        output_run=unit.probe_run,
        out_file=str(probe_file),
        site=unit.site,
        output=None,
    )
    try:
        run.client.submit(build_request, request, pure=False).result()
    except EmptyGraphError as err:
        raise Skip(f"nothing to do: {err}") from err
    import lsst.pipe.base.tests.mocks  # noqa: F401

    graph = PredictedQuantumGraph.read_execution_quanta(str(probe_file))
    needed = {ref.id: ref for ref in overall_inputs(graph)}
    site_inputs = run.input_collections(unit.site)
    with run.butler(unit.site, writeable=False) as butler:
        have = {i for i, ref in needed.items() if site_has(butler, ref, site_inputs)}
    missing = [ref for i, ref in needed.items() if i not in have]
    if not missing:
        return {"files": 0, "bytes": 0, "runs": [], "probe": True}
    with run.butler(run.hub, writeable=False) as hub:
        dids = []
        for ref in missing:
            expanded = hub.get_dataset(ref.id)
            assert expanded is not None
            uri = hub.getURI(expanded)
            dids.append(DID(run.scope, str(Path(uri.ospath).relative_to(run.repo(run.hub)))))
    dataset = DID(run.scope, unit.staged_dataset)
    run.catalog.add_dataset(dataset)
    run.catalog.attach(dataset, dids)
    run.catalog.close(dataset)
    rule = run.catalog.add_rule(dataset, rse_name(unit.site, "butler"))
    run.ledger.set_name(unit.step, unit.site, "stage_rule", rule, group=unit.name)
    n = run.wait_until_arrived(unit.site, [rule])
    runs = sorted({ref.run for ref in missing})
    run.add_to_chain(unit.site, staged_collection(run.spec.campaign, unit.site), runs)
    files = run.catalog.list_dataset_files(dataset)
    return {"files": n, "bytes": sum(f.bytes for f in files), "runs": runs, "probe": True}


def overall_inputs(graph: Any) -> list[Any]:
    """The input refs (prerequisites included) of a graph that no quantum of it produces."""
    produced: set[Any] = set()
    consumed: dict[Any, Any] = {}
    for quantum in graph.build_execution_quanta().values():
        for refs in quantum.outputs.values():
            produced.update(ref.id for ref in refs)
        for refs in quantum.inputs.values():
            for ref in refs:
                consumed[ref.id] = ref
    return [ref for i, ref in consumed.items() if i not in produced]
