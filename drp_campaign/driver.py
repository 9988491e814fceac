"""The plain driver (no Prefect): every step of a campaign at one site, the "single-site reference".

A multi-site run must produce exactly what this produces from the same pipeline and data; tests and
benchmarks use it as the yardstick. Each step is what a site-step does in production: build the
graph against the repository, write its init-outputs, run every quantum through the quantum-backed
butler on Dask workers, then aggregate the outputs into the repository. Steps are idempotent: a
step whose run is already in the output chain is skipped, so a rerun after a crash resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .backends.butler import DEFAULT_FILE_SIZE, collections_for, open_repo, populate_repo
from .backends.local.workload import (
    QuantumFailure,
    QuantumOutcome,
    aggregate,
    execute_graph,
    pre_exec_init,
)
from .backends.qgraph import build_graph, step_query
from .model.focalplane import focal_plane
from .model.plan import visit_tracts
from .model.sky import sky_map_for
from .model.spec import CampaignSpec

__all__ = [
    "ReferenceResult",
    "StepResult",
    "copy_hub_inputs",
    "reference_collection",
    "run_single_site",
]

StepProgress = Callable[[str, str], None]


@dataclass(frozen=True)
class StepResult:
    """Figures of one step."""

    step: str
    run: str
    n_quanta: int
    per_task: dict[str, int]
    build_s: float
    exec_s: float
    aggregate_s: float
    skipped: bool = False


@dataclass
class ReferenceResult:
    """The reference repository and what each step did."""

    repo: Path
    output: str
    steps: list[StepResult] = field(default_factory=list)
    setup_s: float = 0.0
    wall_s: float = 0.0

    @property
    def n_quanta(self) -> int:
        """Quanta executed over all steps (skipped steps count zero)."""
        return sum(s.n_quanta for s in self.steps if not s.skipped)


def reference_collection(campaign: str) -> str:
    """The CHAINED collection holding every output of the single-site reference."""
    return f"{campaign}/reference"


def _tracts_of(spec: CampaignSpec, visits: pd.DataFrame) -> list[int]:
    return visit_tracts(sky_map_for(spec.skymap), focal_plane(spec.instrument), visits)


def _chain(root: Path, name: str) -> list[str]:
    from lsst.daf.butler import MissingCollectionError

    with open_repo(root, writeable=False) as butler:
        try:
            return list(butler.collections.get_info(name).children)
        except MissingCollectionError:
            return []


def run_single_site(
    spec: CampaignSpec,
    root: str | Path,
    visits: pd.DataFrame,
    client: Any,
    *,
    file_size: int = DEFAULT_FILE_SIZE,
    registry_db: str | None = None,
    progress: StepProgress | None = None,
    quantum_progress: Callable[[int, int, QuantumOutcome], None] | None = None,
    hub: str | None = None,
    tracts: Sequence[int] | None = None,
) -> ReferenceResult:
    """Run every step of ``spec`` on all ``visits`` in one repository.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign (its steps, pipeline, instrument and skymap; sites are ignored).
    root : `str` or `pathlib.Path`
        Repository root (created if missing).
    visits : `pandas.DataFrame`
        Visits (``visit, band, ra, dec, rotation``).
    client : `distributed.Client`
        Dask client whose process workers execute the quanta.
    file_size : `int`, optional
        Size of the mock input files.
    registry_db : `str`, optional
        PostgreSQL URL for the registry; SQLite if `None`.
    progress : callable, optional
        ``progress(step, stage)`` as each stage starts.
    quantum_progress : callable, optional
        Passed to :func:`~drp_campaign.backends.local.workload.execute_graph`.
    hub : `str`, optional
        A campaign's hub repository: the reference's inputs are copied from it (the same
        datasets, by UUID, that the campaign distributes: `copy_hub_inputs`). Without it,
        the repository is seeded with the mock inputs (a standalone yardstick).
    tracts : sequence of `int`, optional
        The tracts the visits touch (the campaign's plan knows them, for any instrument); by
        default computed from our focal-plane model of ``spec.instrument``.

    Returns
    -------
    result : `ReferenceResult`

    Raises
    ------
    QuantumFailure
        When a step has failed quanta (the message names them); earlier steps stay done.
    """
    t0 = time.perf_counter()
    root = Path(root)
    pipeline = spec.pipeline.uri
    output = reference_collection(spec.campaign)
    if hub is None:
        populate_repo(
            root,
            spec,
            visits,
            _tracts_of(spec, visits),
            with_raws=True,
            file_size=file_size,
            registry_db=registry_db,
            site="reference",
        )
        defaults = collections_for(spec.instrument).defaults
    else:
        defaults = copy_hub_inputs(spec, hub, root, visits, registry_db=registry_db, tracts=tracts)
    result = ReferenceResult(repo=root, output=output, setup_s=time.perf_counter() - t0)
    where = step_query(spec.instrument, spec.skymap.name)
    for step in spec.steps:
        run = f"{output}/{step.name}"
        chain = _chain(root, output)
        if run in chain:
            result.steps.append(StepResult(step.name, run, 0, {}, 0.0, 0.0, 0.0, skipped=True))
            continue
        # Later steps read earlier outputs through the chain (which ends with the defaults).
        inputs = [output] if chain else [defaults]
        graph = root / "graphs" / f"{step.name}.qg"
        if progress:
            progress(step.name, "build")
        t = time.perf_counter()
        summary = build_graph(
            root,
            pipeline,
            step.subset,
            where,
            inputs,
            run,
            graph,
            site="reference",
            output=output,
        )
        build_s = time.perf_counter() - t
        if progress:
            progress(step.name, "execute")
        t = time.perf_counter()
        pre_exec_init(graph, root)
        report = execute_graph(graph, root, client, progress=quantum_progress)
        exec_s = time.perf_counter() - t
        if not report.ok:
            raise QuantumFailure(report)
        if progress:
            progress(step.name, "aggregate")
        t = time.perf_counter()
        aggregate(graph, root)
        result.steps.append(
            StepResult(
                step.name,
                run,
                summary.n_quanta,
                summary.per_task,
                build_s,
                exec_s,
                time.perf_counter() - t,
            )
        )
    result.wall_s = time.perf_counter() - t0
    return result


def copy_hub_inputs(
    spec: CampaignSpec,
    hub: str,
    root: str | Path,
    visits: pd.DataFrame,
    *,
    registry_db: str | None = None,
    tracts: Sequence[int] | None = None,
) -> str:
    """Make a repository holding every input of the campaign, copied from its hub (idempotent).

    The same adoption as a site's setup (dimension records, the input collections mirrored,
    the campaign's input chain) and then, in one ``transfer_from``, every raw of ``visits``,
    every calibration the pipeline reads (certified as at the hub) and every extra input.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign.
    hub : `str`
        The hub's repository.
    root : `str` or `pathlib.Path`
        The new repository (created if missing).
    visits : `pandas.DataFrame`
        The campaign's visits.
    registry_db : `str`, optional
        PostgreSQL URL; SQLite if `None`.
    tracts : sequence of `int`, optional
        The tracts the visits touch; by default from our focal-plane model.

    Returns
    -------
    inputs : `str`
        The input chain to build the first step's graph from.
    """
    from .backends.butler import create_repo
    from .backends.pipeline import pipeline_inputs
    from .backends.repos import (
        adopt_repo,
        calib_associations,
        certify_associations,
        classify_inputs,
        ensure_chain,
        mirror_collections,
    )
    from .model.bps import input_chain

    inputs = spec.input_collections
    ids = [int(v) for v in visits["visit"]]
    label = f"the reference repository {root}"
    with (
        open_repo(hub, writeable=False) as source,
        create_repo(root, registry_db=registry_db) as dst,
    ):
        kinds = classify_inputs(
            source,
            inputs,
            pipeline_inputs(spec.pipeline.uri, [s.subset for s in spec.steps]),
        )
        adopt_repo(
            dst,
            source,
            instrument=spec.instrument,
            visits=ids,
            skymap=spec.skymap.name,
            tracts=list(tracts) if tracts is not None else _tracts_of(spec, visits),
            label=label,
        )
        mirror_collections(source, dst, inputs.all, label=label)
        associations = calib_associations(source, inputs.calibs, kinds.calibs)
        refs = list({ref.id: ref for ref, _, _ in associations}.values())
        refs += [
            ref
            for name in kinds.extra
            for ref in source.query_datasets(
                name, collections=list(inputs.extra), explain=False, limit=None
            )
        ]
        refs += [
            ref
            for name in kinds.raws
            for ref in source.query_datasets(
                name,
                collections=inputs.raws,
                where="instrument = inst AND visit IN (visits)",
                bind={"inst": spec.instrument, "visits": ids},
                explain=False,
                limit=None,
            )
        ]
        dst.transfer_from(source, refs, transfer="copy", register_dataset_types=True)
        certify_associations(dst, associations)
        ensure_chain(dst, input_chain(spec.campaign), inputs.all)
    return input_chain(spec.campaign)
