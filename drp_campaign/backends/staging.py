"""The staging probe, run in a Dask worker: which inputs of a group's graph a site lacks.

The probe builds the group's graph at the hub (which holds every published product), reads
its overall inputs and looks each one up in the site's repository. It runs where graphs are
built, in a worker process: a probe graph of a DR1 group holds tens of thousands of quanta,
which the orchestrating process should never load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .butler import open_repo, site_has
from .qgraph import GraphRequest, build_request

__all__ = ["MissingInput", "ProbeRequest", "overall_inputs", "probe_missing"]


@dataclass(frozen=True)
class ProbeRequest:
    """What `probe_missing` needs (picklable).

    Attributes
    ----------
    graph : `GraphRequest`
        The group's graph, built at the hub.
    site_repo : `str`
        The site's repository.
    site_inputs : `tuple` [`str`]
        The collections the site's own graph will read.
    hub_root : `str`
        The hub's repository root (file paths are returned relative to it).
    """

    graph: GraphRequest
    site_repo: str
    site_inputs: tuple[str, ...]
    hub_root: str


@dataclass(frozen=True)
class MissingInput:
    """An input the site lacks: its file, relative to the hub's root, and its RUN."""

    path: str
    run: str


def probe_missing(request: ProbeRequest) -> list[MissingInput]:
    """The inputs of the group's graph that the site does not hold.

    Raises
    ------
    drp_campaign.backends.qgraph.EmptyGraphError
        If the group's graph at the hub is empty.
    """
    import lsst.pipe.base.tests.mocks  # noqa: F401  (the emulated tasks' storage classes)
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraph

    from . import zipfix

    zipfix.apply()
    build_request(request.graph)
    graph = PredictedQuantumGraph.read_execution_quanta(request.graph.out_file)
    needed = overall_inputs(graph)
    with open_repo(request.site_repo, writeable=False) as butler:
        missing = [ref for ref in needed if not site_has(butler, ref, request.site_inputs)]
    if not missing:
        return []
    root = Path(request.hub_root)
    out = []
    with open_repo(request.graph.repo_root, writeable=False) as hub:
        for ref in missing:
            expanded = hub.get_dataset(ref.id)
            assert expanded is not None, ref
            path = Path(hub.getURI(expanded).ospath).relative_to(root)
            out.append(MissingInput(str(path), str(ref.run)))
    return out


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
