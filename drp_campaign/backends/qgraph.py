"""QuantumGraphs per site and step, built with lsst-pipe-base, one process per build.

A graph is built the way ``pipetask qgraph`` builds it (``AllDimensionsQuantumGraphBuilder`` on a
``PipelineGraph`` resolved against the site's registry) and saved in the current ``.qg`` format
with datastore records attached, which is what quantum-backed-butler execution
(``pipetask pre-exec-init-qbb`` / ``run-qbb``, BPS) needs.

The data query of a step at a site comes from the plan (:func:`step_query`):

- visit-sharded steps: ``instrument = ... AND skymap = ... AND visit IN (the site's visits)``;
- tract-sharded steps: the site's tracts (``tract IN (...)``), or, when the partition splits a
  tract between sites, ``(tract = t AND patch IN (...)) OR ...``;
- gathered steps (placement ``gather`` or shard ``none``): the whole campaign, at the hub.

Every query names ``instrument`` and ``skymap``: the query system refuses a query touching a
dimension that depends on them without constraining them directly.

Butler objects are not thread-safe and keep caches that go stale when another process writes, so
:func:`build_graphs_parallel` gives each build its own process (a Dask worker process, or a
``spawn`` process pool) and a fresh Butler.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..model.bps import output_run

__all__ = [
    "EmptyGraphError",
    "GraphRequest",
    "GraphSummary",
    "build_graph",
    "build_graphs_parallel",
    "step_query",
]


class EmptyGraphError(RuntimeError):
    """A step's graph at a site has no quanta.

    Parameters
    ----------
    step : `str`
        Step (pipeline subset) name.
    site : `str`
        Site name (or the repository root when no site was given).
    where : `str`
        The data query.
    detail : `str`, optional
        What the builder said about why (its log explains missing inputs).
    """

    def __init__(self, step: str, site: str, where: str, detail: str = "") -> None:
        self.step = step
        self.site = site
        self.where = where
        message = (
            f"empty QuantumGraph for step {step!r} at site {site!r} with query {where!r}: no "
            "quantum has all its inputs. Check that the previous steps' outputs are in the input "
            "collections at this site (transfers done and ingested) and that the query selects "
            "the site's visits or patches"
        )
        if detail:
            message += f" ({detail})"
        super().__init__(message)


@dataclass(frozen=True)
class GraphSummary:
    """What a graph build produced.

    Attributes
    ----------
    n_quanta : `int`
        Number of quanta.
    per_task : `dict` [`str`, `int`]
        Quanta per task label (tasks with none are left out).
    file : `pathlib.Path`
        The saved graph (``.qg``).
    seconds : `float`
        Wall time of the build and save, in the building process.
    step : `str`
        Step (subset) name, empty for a whole-pipeline graph.
    site : `str`
        Site name (empty when not given).
    where : `str`
        The data query used.
    """

    n_quanta: int
    per_task: dict[str, int]
    file: Path
    seconds: float = 0.0
    step: str = ""
    site: str = ""
    where: str = ""


@dataclass(frozen=True)
class GraphRequest:
    """Arguments of one :func:`build_graph` call (picklable, for another process).

    Attributes mirror :func:`build_graph`'s parameters.
    """

    repo_root: str
    pipeline_yaml: str
    subset: str | None
    where: str
    input_collections: tuple[str, ...]
    output_run: str
    out_file: str
    site: str = ""
    attach_datastore_records: bool = True
    bind: Mapping[str, Any] = field(default_factory=dict)
    output: str | None = None


def _pipeline_uri(pipeline_yaml: str | Path, subset: str | None) -> str:
    return f"{pipeline_yaml}#{subset}" if subset else str(pipeline_yaml)


def build_graph(
    repo_root: str | Path,
    pipeline_yaml: str | Path,
    subset: str | None,
    where: str,
    input_collections: Sequence[str],
    output_run: str,
    out_file: str | Path,
    *,
    attach_datastore_records: bool = True,
    site: str = "",
    bind: Mapping[str, Any] | None = None,
    output: str | None = None,
) -> GraphSummary:
    """Build one QuantumGraph and save it.

    Parameters
    ----------
    repo_root : `str` or `pathlib.Path`
        The site's Butler repository (opened read-only, fresh, in this process).
    pipeline_yaml : `str` or `pathlib.Path`
        Pipeline YAML file.
    subset : `str` or `None`
        Subset (step) label; `None` builds the whole pipeline.
    where : `str`
        Data query (must constrain ``instrument`` and ``skymap``; see :func:`step_query`).
    input_collections : sequence of `str`
        Input collections, searched in order.
    output_run : `str`
        RUN collection the outputs will be written to.
    out_file : `str` or `pathlib.Path`
        Where to save the graph; should end in ``.qg``.
    attach_datastore_records : `bool`, optional
        Attach the inputs' datastore records (needed by quantum-backed-butler execution).
    site : `str`, optional
        Site name, for error messages and the summary.
    bind : mapping, optional
        Bind values for identifiers in ``where``.
    output : `str`, optional
        CHAINED collection that the final job (aggregation) points at ``output_run`` followed by
        the inputs, as ``pipetask --output`` does.

    Returns
    -------
    summary : `GraphSummary`
        Quanta counts and the file.

    Raises
    ------
    EmptyGraphError
        If the graph has no quanta (names the step, the site and the query).
    """
    # Imported here so that importing this module stays cheap (the planner imports the package);
    # the mocks import registers the _mock_* storage classes in this process.
    import lsst.pipe.base.tests.mocks  # noqa: F401
    from lsst.daf.butler import Butler
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.all_dimensions_quantum_graph_builder import (
        AllDimensionsQuantumGraphBuilder,
    )
    from lsst.pipe.base.quantum_graph_builder import QuantumGraphBuilderError

    start = time.perf_counter()
    step = subset or "<whole pipeline>"
    out_path = Path(out_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with Butler.from_config(str(repo_root), writeable=False) as butler:
        pipeline_graph = Pipeline.from_uri(_pipeline_uri(pipeline_yaml, subset)).to_graph(
            registry=butler.registry
        )
        builder = AllDimensionsQuantumGraphBuilder(
            pipeline_graph,
            butler,
            where=where,
            bind=dict(bind or {}),
            input_collections=list(input_collections),
            output_run=output_run,
        )
        try:
            components = builder.finish(
                output=output,
                metadata={
                    "drp_campaign_step": subset or "",
                    "drp_campaign_site": site,
                    "data_query": where,
                },
                attach_datastore_records=attach_datastore_records,
            )
        except QuantumGraphBuilderError as err:
            # The builder raises (instead of returning an empty graph) when an overall input has
            # no dataset at all, e.g. step3 before the PVIs arrived: the same operator error.
            if "No datasets for overall-input" in str(err):
                raise EmptyGraphError(step, site or str(repo_root), where, str(err)) from err
            raise
    per_task = {label: n for label, n in components.header.n_task_quanta.items() if n}
    n_quanta = sum(per_task.values())
    if n_quanta == 0:
        raise EmptyGraphError(step, site or str(repo_root), where)
    components.write(out_path)
    return GraphSummary(
        n_quanta=n_quanta,
        per_task=per_task,
        file=out_path,
        seconds=time.perf_counter() - start,
        step=subset or "",
        site=site,
        where=where,
    )


def build_request(request: GraphRequest) -> GraphSummary:
    """Build the graph a :class:`GraphRequest` describes (see :func:`build_graph`)."""
    return build_graph(
        request.repo_root,
        request.pipeline_yaml,
        request.subset,
        request.where,
        request.input_collections,
        request.output_run,
        request.out_file,
        attach_datastore_records=request.attach_datastore_records,
        site=request.site,
        bind=request.bind,
        output=request.output,
    )


def _worker_init() -> None:
    # Every process that reads mock datasets (or resolves their storage classes) imports the
    # mocks package once; Butler and pipe_base imports are paid once per worker too.
    import lsst.pipe.base.all_dimensions_quantum_graph_builder  # noqa: F401
    import lsst.pipe.base.tests.mocks  # noqa: F401


def build_graphs_parallel(
    requests: Sequence[GraphRequest],
    client: Any | None = None,
    *,
    max_workers: int | None = None,
) -> list[GraphSummary]:
    """Build several graphs, each in its own process.

    Parameters
    ----------
    requests : sequence of `GraphRequest`
        One per graph (typically one per site for a step).
    client : `distributed.Client`, optional
        A Dask client whose workers are processes: each build is a ``client.submit``. Without
        one, a ``spawn`` `concurrent.futures.ProcessPoolExecutor` runs them.
    max_workers : `int`, optional
        Pool size without a client (default: ``min(len(requests), os.cpu_count())``).

    Returns
    -------
    summaries : `list` [`GraphSummary`]
        In the order of ``requests``.

    Raises
    ------
    EmptyGraphError
        The first empty graph (in request order), after every build has finished.
    """
    if not requests:
        return []
    if client is not None:
        # pure=False and keys unique per call: a rebuild must run again, never return the
        # previous call's futures still held by the scheduler.
        batch = uuid.uuid4().hex[:8]
        futures = [
            client.submit(build_request, req, pure=False, key=f"qgraph-{batch}-{i}-{req.site}")
            for i, req in enumerate(requests)
        ]
        return list(client.gather(futures))
    import os

    workers = max_workers or min(len(requests), os.cpu_count() or 1)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_worker_init
    ) as pool:
        pending = [pool.submit(build_request, req) for req in requests]
        concurrent.futures.wait(pending)
        return [f.result() for f in pending]


# --------------------------------------------------------------------------------- queries
def _int_list(values: Iterable[int]) -> str:
    return ", ".join(str(int(v)) for v in sorted({int(v) for v in values}))


def step_query(
    instrument: str,
    skymap: str,
    *,
    visits: Iterable[int] | None = None,
    patches: pd.DataFrame | None = None,
    tract_sizes: Mapping[int, int] | None = None,
) -> str:
    """Return the data query of a step at a site.

    Parameters
    ----------
    instrument : `str`
        Instrument name.
    skymap : `str`
        Skymap name.
    visits : iterable of `int`, optional
        The site's visits (visit-sharded steps).
    patches : `pandas.DataFrame`, optional
        Columns ``tract, patch``: the site's patches (tract-sharded steps).
    tract_sizes : mapping, optional
        Tract -> number of patches. A tract whose patches are all the site's becomes
        ``tract IN (...)``; other tracts (and all, without this) list their patches.

    ``visits`` and ``patches`` both `None` means the whole campaign (gathered steps).

    Returns
    -------
    where : `str`
        A daf_butler query expression (literal values, so it can go into a BPS ``dataQuery``).

    Raises
    ------
    ValueError
        If the selection is empty (a site with nothing to do should not build a graph).
    """
    terms = [f"instrument = '{instrument}'", f"skymap = '{skymap}'"]
    if visits is not None:
        visit_list = _int_list(visits)
        if not visit_list:
            raise ValueError("no visits selected for this site")
        terms.append(f"visit IN ({visit_list})")
    if patches is not None:
        if patches.empty:
            raise ValueError("no patches selected for this site")
        whole: list[int] = []
        partial: list[str] = []
        for tract, group in patches.groupby("tract", sort=True):
            ids = np.unique(group["patch"].to_numpy())
            if tract_sizes is not None and ids.size == tract_sizes.get(int(tract), -1):
                whole.append(int(tract))
            else:
                partial.append(f"(tract = {int(tract)} AND patch IN ({_int_list(ids)}))")
        parts = []
        if whole:
            parts.append(f"tract IN ({_int_list(whole)})")
        parts.extend(partial)
        terms.append(parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")")
    return " AND ".join(terms)


# --------------------------------------------------------------------------------- plan -> requests
@dataclass(frozen=True)
class SiteSelection:
    """What one site processes according to the plan.

    Attributes
    ----------
    visits : `numpy.ndarray`
        The site's visits (single-visit steps), sorted.
    patches : `pandas.DataFrame`
        Columns ``tract, patch``: the site's patches (coadd steps).
    """

    visits: np.ndarray
    patches: pd.DataFrame


def site_selections(plan: Any, sites: Sequence[str]) -> dict[str, SiteSelection]:
    """Return each site's visits and patches from a plan.

    Parameters
    ----------
    plan : `str`, `pathlib.Path` or `drp_campaign.model.plan.MemoryPlan`
        A plan directory (``visits.parquet`` and ``patches.parquet`` with a ``site`` column) or
        an in-memory plan.
    sites : sequence of `str`
        Site names in spec order (a MemoryPlan stores site indices).

    Returns
    -------
    selections : `dict` [`str`, `SiteSelection`]
        Site -> selection (empty arrays for a site with nothing).
    """
    from ..model.plan import MemoryPlan

    if isinstance(plan, MemoryPlan):
        visit_ids = plan.visits["visit"].to_numpy()
        home = plan.assignment.home
        out = {}
        for i, site in enumerate(sites):
            tracts, patches = plan.partition.patches_of(site)
            out[site] = SiteSelection(
                np.sort(visit_ids[home == i]),
                pd.DataFrame({"tract": tracts.astype(np.int64), "patch": patches.astype(np.int64)}),
            )
        return out
    plan_dir = Path(plan)
    visits = pd.read_parquet(plan_dir / "visits.parquet", columns=["visit", "site"])
    patches = pd.read_parquet(plan_dir / "patches.parquet", columns=["tract", "patch", "site"])
    return {
        site: SiteSelection(
            np.sort(visits.loc[visits["site"] == site, "visit"].to_numpy()),
            patches.loc[patches["site"] == site, ["tract", "patch"]].reset_index(drop=True),
        )
        for site in sites
    }


def step_requests(
    spec: Any,
    plan: Any,
    step: str,
    repos: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    output_runs: Mapping[str, str] | None = None,
    input_collections: Sequence[str] | None = None,
    pipeline_yaml: str | Path | None = None,
) -> list[GraphRequest]:
    """Return the graph requests of one step: one per site, or one at the hub if gathered.

    Parameters
    ----------
    spec : `drp_campaign.model.spec.CampaignSpec`
        Campaign spec (step sharding and placement, instrument, skymap, hub).
    plan : plan directory or `MemoryPlan`
        The campaign plan.
    step : `str`
        Step name in the spec.
    repos : mapping [`str`, path]
        Site -> repository root.
    out_dir : `str` or `pathlib.Path`
        Graphs go to ``<out_dir>/<step>/<site>.qg``.
    output_runs : mapping [`str`, `str`], optional
        Site -> output RUN; default :func:`drp_campaign.model.bps.output_run` (the name the
        BPS submit file carries).
    input_collections : sequence of `str`, optional
        Default ``[<instrument>/defaults]``.
    pipeline_yaml : path, optional
        Default: the spec's pipeline.

    Returns
    -------
    requests : `list` [`GraphRequest`]
        Sites with nothing to do for a sharded step are left out.
    """
    from ..model.sky import sky_map_for

    step_spec = spec.step(step)
    inputs = tuple(input_collections or (f"{spec.instrument}/defaults",))
    yaml_path = str(pipeline_yaml or spec.pipeline.uri)
    gathered = step_spec.placement == "gather" or step_spec.shard == "none"
    sites = [spec.hub] if gathered else list(spec.site_names)
    selections = site_selections(plan, spec.site_names)
    sky = sky_map_for(spec.skymap)
    requests = []
    for site in sites:
        selection = selections[site]
        if gathered:
            where = step_query(spec.instrument, spec.skymap.name)
        elif step_spec.shard == "visit":
            if selection.visits.size == 0:
                continue
            where = step_query(spec.instrument, spec.skymap.name, visits=selection.visits)
        else:
            if selection.patches.empty:
                continue
            sizes = {
                int(t): int(np.prod(sky[int(t)].num_patches))
                for t in selection.patches["tract"].unique()
            }
            where = step_query(
                spec.instrument, spec.skymap.name, patches=selection.patches, tract_sizes=sizes
            )
        run = (output_runs or {}).get(site, output_run(spec.campaign, step, site))
        requests.append(
            GraphRequest(
                repo_root=str(repos[site]),
                pipeline_yaml=yaml_path,
                subset=step_spec.subset,
                where=where,
                input_collections=inputs,
                output_run=run,
                out_file=str(Path(out_dir) / step / f"{site}.qg"),
                site=site,
            )
        )
    return requests


def read_summary(graph_file: str | Path) -> GraphSummary:
    """The `GraphSummary` of a saved graph, from its header (no quantum is read).

    For a graph built by a run that was killed before it recorded the build: the rerun reuses
    the file instead of building a new graph under the same name.
    """
    from lsst.pipe.base.pipeline_graph import TaskImportMode
    from lsst.pipe.base.quantum_graph import PredictedQuantumGraphReader

    with PredictedQuantumGraphReader.open(
        str(graph_file), import_mode=TaskImportMode.DO_NOT_IMPORT
    ) as reader:
        header = reader.header
        per_task = {label: n for label, n in header.n_task_quanta.items() if n}
        metadata = dict(header.metadata or {})
    return GraphSummary(
        n_quanta=sum(per_task.values()),
        per_task=per_task,
        file=Path(graph_file),
        step=str(metadata.get("drp_campaign_step", "")),
        site=str(metadata.get("drp_campaign_site", "")),
        where=str(metadata.get("data_query", "")),
    )
