"""Stage ``build``: a group's QuantumGraph, built against the site's own repository.

The graph is built in a Dask worker process (the Butler and the pipeline imports stay out of
the orchestrating process, and several groups build at once), saved in the site's storage and
registered in the catalog with a rule to the hub (provenance). A kill between the
registration and the ledger's record leaves a registered graph: the rerun reuses that file
(checked against the catalog's size and checksum) instead of building another graph under the
same name, whose new quantum ids would no longer match the registered file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..backends.interfaces import DID, DIDNotFound, NewFile, file_adler32, rse_name
from ..backends.qgraph import EmptyGraphError, GraphRequest, build_request, read_summary
from .errors import Skip

if TYPE_CHECKING:
    from pathlib import Path

    from ..campaign import CampaignRun
    from ..model.units import WorkUnit

__all__ = ["build_graph", "graph_file"]


def graph_file(run: CampaignRun, unit: WorkUnit) -> Path:
    """Where the group's graph is saved: inside the site's storage, so that it can ship."""
    return run.repo(unit.site) / unit.graph_path


def build_graph(run: CampaignRun, unit: WorkUnit) -> dict[str, Any]:
    """Build (or, after a kill, reuse) the group's graph and ship it to the hub.

    Returns
    -------
    figures : `dict`
        ``n_quanta``, ``per_task``, ``build_s``, ``graph`` (path) and ``graph_did``.

    Raises
    ------
    Skip
        If the group's graph is empty (nothing to do).
    """
    path = graph_file(run, unit)
    did = DID(run.scope, unit.graph_path)
    registered = _registered(run, did)
    if registered is not None and path.exists() and registered == _identity(path):
        summary = run.client.submit(read_summary, str(path), pure=False).result()
    else:
        request = GraphRequest(
            repo_root=run.repo_uri(unit.site),
            pipeline_yaml=run.pipeline_uri,
            subset=unit.subset,
            where=unit.where,
            input_collections=tuple(run.input_collections(unit.site)),
            output_run=unit.output_run,
            out_file=str(path),
            site=unit.site,
            output=unit.output_collection,
        )
        try:
            summary = run.client.submit(build_request, request, pure=False).result()
        except EmptyGraphError as err:
            raise Skip(f"nothing to do: {err}") from err
        if registered is not None:
            # Registered with other bytes: only possible if the file was rebuilt outside the
            # campaign. Never overwrite a catalog entry; the operator decides.
            raise RuntimeError(
                f"{unit.label}: the catalog holds {did} with another size or checksum than "
                f"{path}; start the group afresh (fresh=true) to build it under a new name"
            )
        run.catalog.register_replicas(
            rse_name(unit.site, "butler"), [NewFile(did.scope, did.name, *_identity(path))]
        )
    if unit.site != run.hub:
        rule = run.catalog.add_rule(did, rse_name(run.hub, "butler"))
        run.ledger.set_name(unit.step, unit.site, "graph_rule", rule, group=unit.name)
    return {
        "n_quanta": summary.n_quanta,
        "per_task": summary.per_task,
        "build_s": summary.seconds,
        "graph": str(path),
        "graph_did": str(did),
    }


def _identity(path: Path) -> tuple[int, str]:
    return path.stat().st_size, file_adler32(path)


def _registered(run: CampaignRun, did: DID) -> tuple[int, str] | None:
    """The (bytes, adler32) the catalog holds for the graph file, or `None` if none."""
    try:
        info = run.catalog.get_did(did)
    except DIDNotFound:
        return None
    return int(info.bytes or 0), str(info.adler32 or "")
