"""A multi-site campaign without Prefect: every stage of every (step, site), resumable.

The Prefect flows (``flows/``) only sequence and fan out the methods of `CampaignRun`; the
work, and the rules that make it safe to repeat, live here and are tested without Prefect.

Stages and what makes each idempotent (the ledger, `drp_campaign.ledger`, records every one):

==========  ===============================================================================
setup       adopts the site's repository (the one its DataFacility Block names): checks the
            hub holds what the campaign reads; copies to the others the dimension records the
            campaign needs and mirrors the hub's input collections; never writes raws or
            calibrations; reruns add nothing.
distribute  what the pipeline reads from the spec's input collections, from the hub to every
            site: each site's raws, the calibrations (certified as at the hub) and the extra
            inputs, ingested on arrival by the Replica Monitor; rules are idempotent,
            ingestion skips what is there.
stage       the inputs a step's graph needs that the site lacks: found by building the site's
            graph at the hub (which holds every published product), minus what the site has;
            moved as one dataset with one rule, ingested on arrival.
bps         the site's BPS submit file.
build       the site's QuantumGraph, built against its own repo on the Dask client.
submit      the workload service runs it; the run id is recorded, and a rerun polls it (a
            local run that died mid-way is resubmitted: quanta with outputs are skipped).
publish     the step's products registered in the catalog, with a rule to the hub.
arrive      closed loop: returns once every product is ingested at the hub.
==========  ===============================================================================
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .backends.butler import open_repo, site_has
from .backends.ingest import (
    ANCILLARY_SCOPE,
    RAW_FILE,
    RAW_SCOPE,
    ReplicaMonitor,
    ensure_site_storage,
    register_datasets,
)
from .backends.interfaces import (
    DID,
    DataCatalog,
    RuleState,
    WorkloadService,
    rse_name,
)
from .backends.pipeline import pipeline_inputs, step_dataflow
from .backends.repos import (
    CampaignInputs,
    adopt_repo,
    calib_associations,
    certify_associations,
    check_hub,
    check_repo,
    classify_inputs,
    ensure_chain,
    mirror_collections,
    repo_root,
)
from .ledger import CAMPAIGN, Ledger
from .model.bps import input_chain, output_collection
from .model.groups import Group, groups_from_document
from .model.naming import data_facility_block
from .model.replan import plan_dirname, revised_spec
from .model.spec import CampaignSpec
from .model.staging import StepFlow, needs_probe
from .model.units import WorkUnit, work_unit
from .replan import Revision, current_revision
from .stages.errors import GroupFailure, Skip

if TYPE_CHECKING:
    from .stages.sitestep import PhaseRunner

__all__ = [
    "DEFAULT_GROUPS_IN_FLIGHT",
    "ArrivalTimeout",
    "CampaignRun",
    "GroupFailure",
    "SiteStepFailed",
    "Skip",
    "campaign_output",
    "is_product",
    "product_filter",
    "staged_collection",
]

#: Groups of a site submitted at once unless its DataFacility Block says otherwise.
DEFAULT_GROUPS_IN_FLIGHT = 2

_LOG = logging.getLogger(__name__)

Progress = Callable[[str], None]
StageRunner = Callable[[str, Callable[[], dict[str, Any]]], dict[str, Any]]


def campaign_output(campaign: str) -> str:
    """The hub's CHAINED collection of every published product: ``<campaign>/output``."""
    return f"{campaign}/output"


def staged_collection(campaign: str, site: str) -> str:
    """The CHAINED collection of the other sites' runs present at ``site``."""
    return f"{campaign}/{site}/staged"


def is_product(dataset_type: str, temporaries: Iterable[str] = ()) -> bool:
    """Whether a dataset type is published to the hub: not a temporary, not bookkeeping.

    Temporaries (the spec's ``temporaries``) never leave the site that made them (DESIGN.md
    section 5). Init-outputs (``*_config``, ``packages``) exist once per run, so they differ
    between a multi-site and a single-site run by design; logs and metadata stay with the run.

    Parameters
    ----------
    dataset_type : `str`
        Dataset type name.
    temporaries : iterable of `str`, optional
        The spec's temporaries.

    Returns
    -------
    product : `bool`
    """
    return not (
        dataset_type in set(temporaries)
        or dataset_type == "packages"
        or dataset_type.endswith(("_config", "_log", "_metadata"))
    )


def product_filter(spec: CampaignSpec) -> Callable[[str], bool]:
    """`is_product` for a spec's temporaries, as a one-argument predicate."""
    temporaries = frozenset(spec.temporaries)
    return functools.partial(is_product, temporaries=temporaries)


class SiteStepFailed(RuntimeError):
    """A site-step failed; the message names step, site, stage (and failed groups) and cause."""

    def __init__(
        self, step: str, site: str, stage: str, cause: str, groups: Sequence[str] = ()
    ) -> None:
        self.step, self.site, self.stage, self.groups = step, site, stage, list(groups)
        super().__init__(f"{step} at {site} failed in stage '{stage}': {cause}")


def _call_within(fn: Callable[[], object], timeout_s: float) -> None:
    """Call ``fn`` in a daemon thread; raise `TimeoutError` if it has not returned in time
    (a service that hangs must not hold the campaign: the thread is left behind)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="call-within")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {timeout_s:g} s")
    if errors:
        raise errors[0]


class ArrivalTimeout(RuntimeError):
    """Files did not arrive (and get ingested) in time; the message names them."""


@dataclass
class SiteStepResult:
    """What one site-step did (figures for the report)."""

    step: str
    site: str
    skipped: bool = False
    n_quanta: int = 0
    staged_files: int = 0
    staged_bytes: int = 0
    published_files: int = 0
    published_bytes: int = 0
    groups: int = 0
    groups_skipped: int = 0
    stages_s: dict[str, float] = field(default_factory=dict)


class CampaignRun:
    """Every stage of a campaign at every site, against a work directory.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign.
    workdir : `str` or `pathlib.Path`
        Work directory: ``plan/``, ``storage/``, ``submit/``, ``ledger.sqlite``, never a
        repository.
    repos : mapping of `str` to `str`
        Each site's Butler repository: its `DataFacility` Block's ``butler_repo`` (a
        directory, a ``butler.yaml``, or any URI daf_butler opens).
    catalog : `DataCatalog`
        The data catalog (embedded or Rucio).
    workloads : mapping of `str` to `WorkloadService`
        The workload service of each site.
    client : `distributed.Client`
        Dask client for graph builds (and the local executor's quanta).
    pump : callable, optional
        Called while waiting for transfers: the embedded catalog's transfer worker
        (``catalog.process_transfers``); `None` when daemons move the files (Rucio).
    poll_s : `float`, optional
        First interval when polling a workload or transfers (doubles up to 30 s).
    arrival_timeout_s : `float`, optional
        How long `wait_until_arrived` waits for files.
    progress : callable, optional
        ``progress(message)`` as stages start and end.
    repo_sources : mapping of `str` to `str`, optional
        Where each site's repository was named (its Block), for errors; by default the site's
        `DataFacility` Block name.
    in_flight : mapping of `str` to `int`, optional
        Groups of each site submitted at once (its Block's ``groups_in_flight``); by default
        `DEFAULT_GROUPS_IN_FLIGHT`.
    """

    def __init__(
        self,
        spec: CampaignSpec,
        workdir: str | Path,
        *,
        repos: Mapping[str, str],
        catalog: DataCatalog,
        workloads: Mapping[str, WorkloadService],
        client: Any,
        pump: Callable[[], object] | None = None,
        poll_s: float = 0.2,
        arrival_timeout_s: float = 600.0,
        progress: Progress | None = None,
        repo_sources: Mapping[str, str] | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> None:
        missing = [s for s in spec.site_names if not repos.get(s)]
        if missing:
            raise ValueError(f"no Butler repository given for site(s) {', '.join(missing)}")
        self.base_spec = spec
        self.repos = {s: str(repos[s]) for s in spec.site_names}
        self.repo_sources = {
            s: (repo_sources or {}).get(s) or f"Block {data_facility_block(spec.campaign, s)}"
            for s in spec.site_names
        }
        self.is_product = product_filter(spec)
        self.workdir = Path(workdir).absolute()
        self.catalog = catalog
        self.workloads = dict(workloads)
        self.client = client
        self.pump = pump
        self.poll_s = poll_s
        self.arrival_timeout_s = arrival_timeout_s
        self.progress = progress or (lambda message: _LOG.info("%s", message))
        self.ledger = Ledger(self.workdir / "ledger.sqlite")
        self._revision: tuple[int, Revision, CampaignSpec] | None = None
        self.scope = spec.campaign[:25]
        self._pump_lock = threading.Lock()
        self.chain_lock = threading.Lock()
        self.in_flight = dict(in_flight or {})
        self._groups: tuple[tuple[str, int], dict[str, list[Group]]] | None = None
        self._dataflow: dict[str, StepFlow] | None = None
        self._monitor_locks: dict[str, threading.Lock] = {s: threading.Lock() for s in spec.sites}
        self._monitors: dict[str, ReplicaMonitor] = {}
        self._inputs: CampaignInputs | None = None
        self._inputs_lock = threading.Lock()

    # ---------------------------------------------------------------------- plan revisions
    def _current(self) -> tuple[Revision, CampaignSpec]:
        # A re-plan renames its directory into the work directory, which changes the work
        # directory's mtime: the revision is looked up again only then (it is read per stage).
        try:
            stamp = self.workdir.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        cached = self._revision
        if cached is None or cached[0] != stamp:
            revision = current_revision(self.workdir)
            cached = (stamp, revision, revised_spec(self.base_spec, revision.lost))
            self._revision = cached
        return cached[1], cached[2]

    @property
    def spec(self) -> CampaignSpec:
        """The campaign as it runs now: the operator's spec without the sites re-planned away
        (`drp_campaign.replan`), their shares renormalised over the others."""
        return self._current()[1]

    @property
    def revision(self) -> Revision:
        """The plan revision the campaign runs on (0 until a site is re-planned away)."""
        return self._current()[0]

    @property
    def plan_dir(self) -> Path:
        """The current plan revision's directory (``plan``, then ``plan-r1``, ...)."""
        return self.revision.plan_dir

    @property
    def lost(self) -> tuple[str, ...]:
        """The sites re-planned away, in the order they were lost."""
        return self.revision.lost

    # ---------------------------------------------------------------------------- helpers
    @property
    def hub(self) -> str:
        """The hub site's name."""
        return self.spec.hub

    def repo(self, site: str) -> Path:
        """A site's repository root directory (its datastore's files, and the graphs)."""
        return repo_root(self.repos[site])

    def repo_uri(self, site: str) -> str:
        """A site's repository as its Block names it: what Butlers and BPS open."""
        return self.repos[site]

    def butler(self, site: str, writeable: bool = True) -> Any:
        """A new Butler on a site's repository."""
        return open_repo(self.repos[site], writeable=writeable)

    def repo_label(self, site: str) -> str:
        """A site's repository for errors: site, URI and the Block that names it."""
        return f"the repository of {site} ({self.repos[site]}, from {self.repo_sources[site]})"

    def check_repositories(self) -> None:
        """Open every site's repository, or raise naming the site, the URI and the Block.

        Runs before anything moves or is submitted (`run_all`, the campaign flow, setup).
        """
        for site in self.spec.site_names:
            check_repo(site, self.repos[site], self.repo_sources[site])

    def input_chain(self) -> str:
        """The campaign's CHAINED input collection at every site: the spec's input collections."""
        return input_chain(self.spec.campaign)

    def visits(self, revision: int | None = None) -> pd.DataFrame:
        """The plan's visits (with their ``site``): the current revision's, or ``revision``'s."""
        where = self.plan_dir if revision is None else self.workdir / plan_dirname(revision)
        return pd.read_parquet(where / "visits.parquet")

    def tracts(self) -> list[int]:
        """Tracts touched by the campaign's visits."""
        overlaps = pd.read_parquet(self.plan_dir / "overlaps.parquet", columns=["tract"])
        return sorted(int(t) for t in overlaps["tract"].unique())

    def sites_of(self, step: str) -> list[str]:
        """Sites that run ``step``: the hub alone for a gathered step, else every site."""
        s = self.spec.step(step)
        return [self.hub] if s.placement == "gather" or s.shard == "none" else self.spec.site_names

    def _monitor(self, site: str) -> ReplicaMonitor:
        if site not in self._monitors:
            self._monitors[site] = ReplicaMonitor(
                self.catalog,
                self.repo(site),
                [rse_name(site, "raw"), rse_name(site, "butler")],
                self.workdir / "monitor" / f"{site}.sqlite",
                butler_uri=self.repo_uri(site),
            )
        return self._monitors[site]

    def run_stage(
        self,
        step: str,
        site: str,
        stage: str,
        fn: Callable[[], Mapping[str, Any] | None],
        *,
        group: str = "",
    ) -> dict[str, Any]:
        """Run ``fn`` as the ledger stage (step, site, group, stage) unless it is done.

        Returns
        -------
        figures : `dict`
            What ``fn`` returned now, or what the ledger kept from the run that did it.
        """
        record = self.ledger.get(step, site, stage, group=group)
        if record is not None and record.done:
            return dict(record.figures)
        self.ledger.start(step, site, stage, group=group)
        self.progress(f"{step} {site}{'#' + group if group else ''}: {stage}")
        try:
            figures = dict(fn() or {})
        except Skip as skip:
            self.ledger.finish(step, site, stage, {"reason": str(skip)}, skipped=True, group=group)
            raise
        except BaseException as exc:  # recorded, then re-raised: the flow decides
            self.ledger.fail(step, site, stage, f"{type(exc).__name__}: {exc}", group=group)
            raise
        self.ledger.finish(step, site, stage, figures, group=group)
        return figures

    # ---------------------------------------------------------------------- campaign stages
    def plan(self, dask_address: str | None = None, workers: int = 2) -> dict[str, Any]:
        """Plan the campaign into ``<workdir>/plan`` with Dask (stage ``plan``).

        Parameters
        ----------
        dask_address : `str`, optional
            Scheduler to plan on; by default this run's client's.
        workers : `int`
            Workers of a local cluster when there is no client.

        Returns
        -------
        figures : `dict`
            The plan summary.
        """
        from .planner import run_plan
        from .preflight import preflight

        def work() -> dict[str, Any]:
            # The first stage of every run: a bad visits CSV, pipeline file or subset stops the
            # campaign here (SpecError, naming the key), before any raw is moved.
            visits = preflight(self.spec)
            address = dask_address
            if address is None and self.client is not None:
                address = self.client.scheduler.address
            result = run_plan(
                self.spec, self.plan_dir, visits=visits, dask_address=address, workers=workers
            )
            return {"out_dir": str(result.out_dir), **result.summary}

        if not (self.plan_dir / "visits.parquet").exists():
            self.ledger.reset(CAMPAIGN, CAMPAIGN, ["plan"])
        return self.run_stage(CAMPAIGN, CAMPAIGN, "plan", work)

    def run_step(self, step: str, sites: Sequence[str] | None = None) -> dict[str, Any]:
        """Run a step at its sites concurrently (threads); raise naming every failed site.

        Returns
        -------
        results : `dict`
            Site -> `SiteStepResult`.
        """
        from concurrent.futures import ThreadPoolExecutor

        targets = [s for s in self.sites_of(step) if sites is None or s in sites]
        with ThreadPoolExecutor(max_workers=max(len(targets), 1)) as pool:
            futures = {s: pool.submit(self.run_site_step, step, s) for s in targets}
            outcomes: dict[str, Any] = {}
            for site, future in futures.items():
                try:
                    outcomes[site] = future.result()
                except Exception as exc:  # every site finishes before the step fails
                    outcomes[site] = exc
        failed = {s: o for s, o in outcomes.items() if isinstance(o, BaseException)}
        if failed:
            raise RuntimeError(
                f"{step} failed at {', '.join(sorted(failed))}:\n"
                + "\n".join(f"{s}: {e}" for s, e in failed.items())
            )
        return outcomes

    def run_all(self, steps: Sequence[str] | None = None) -> dict[str, Any]:
        """The plain driver: plan, set up every site, distribute inputs, run every step.

        Parameters
        ----------
        steps : sequence of `str`, optional
            Only these steps (default: all, in order; empty: set up and distribute only).

        Returns
        -------
        results : `dict`
            Step -> site -> `SiteStepResult`.
        """
        self.check_repositories()
        self.plan()
        for site in self.spec.site_names:
            self.setup_site(site)
        self.distribute_inputs()
        self.retire_lost()
        todo = self.spec.step_names if steps is None else list(steps)
        return {step: self.run_step(step) for step in todo}

    def campaign_inputs(self) -> CampaignInputs:
        """The pipeline's overall inputs, found in the hub's input collections (cached).

        Which dataset types are raws, calibrations or other inputs is read from the pipeline
        and the hub, never named in code (DESIGN.md section 10).
        """
        with self._inputs_lock:
            if self._inputs is None:
                names = pipeline_inputs(self.pipeline_uri, [s.subset for s in self.spec.steps])
                with self.butler(self.hub, writeable=False) as hub:
                    self._inputs = classify_inputs(hub, self.spec.input_collections, names)
            return self._inputs

    def needs_probe(self, step: str) -> bool:
        """Whether a step's groups need the staging probe (`model.staging.needs_probe`)."""
        with self._inputs_lock:
            if self._dataflow is None:
                self._dataflow = step_dataflow(
                    self.pipeline_uri, [s.subset for s in self.spec.steps]
                )
            flows = self._dataflow
        return needs_probe(self.spec, step, flows)

    @property
    def pipeline_uri(self) -> str:
        """The pipeline YAML of the campaign."""
        return self.spec.pipeline.uri

    def setup_site(self, site: str) -> dict[str, Any]:
        """Adopt a site's repository and declare its RSEs (stage ``setup``).

        At the hub: check that it holds the instrument, the plan's visits, the skymap and the
        tracts they touch, and the spec's input collections. Elsewhere: copy from the hub the
        dimension records the campaign needs, mirror the hub's input collections (empty) and
        register the input dataset types. Everywhere: the campaign's input chain. Never writes
        raws or calibrations; a rerun changes nothing.

        Raises
        ------
        drp_campaign.backends.repos.RepoError
            Naming the repository, what is wrong and the fix.
        """

        def work() -> dict[str, Any]:
            for name in {site, self.hub}:
                check_repo(name, self.repos[name], self.repo_sources[name])
            visits = [int(v) for v in self.visits().visit]
            tracts = self.tracts()
            inputs = self.spec.input_collections
            figures: dict[str, Any] = {}
            with self.butler(self.hub, writeable=site == self.hub) as hub:
                check_hub(
                    hub,
                    instrument=self.spec.instrument,
                    visits=visits,
                    skymap=self.spec.skymap,
                    tracts=tracts,
                    inputs=inputs,
                    label=self.repo_label(self.hub),
                )
                if site == self.hub:
                    created = (
                        [self.input_chain()]
                        if ensure_chain(hub, self.input_chain(), inputs.all)
                        else []
                    )
                else:
                    kinds = self.campaign_inputs()
                    with self.butler(site) as dst:
                        figures["records"] = adopt_repo(
                            dst,
                            hub,
                            instrument=self.spec.instrument,
                            visits=visits,
                            skymap=self.spec.skymap.name,
                            tracts=tracts,
                            label=self.repo_label(site),
                        )
                        created = mirror_collections(
                            hub, dst, inputs.all, label=self.repo_label(site)
                        )
                        # Graphs built before an input arrives find its dataset type (an
                        # empty graph, not an unknown type), and arrivals need no new types.
                        for name in (*kinds.raws, *kinds.calibs, *kinds.extra):
                            dst.registry.registerDatasetType(hub.get_dataset_type(name))
                        if ensure_chain(dst, self.input_chain(), inputs.all):
                            created.append(self.input_chain())
            rses = ensure_site_storage(
                self.catalog,
                self.workdir,
                site,
                [RAW_SCOPE, ANCILLARY_SCOPE, self.scope],
                repo_root=self.repo(site),
            )
            return {"collections_created": created, **figures, **rses}

        return self.run_stage(CAMPAIGN, site, "setup", work)

    def distribute_inputs(self) -> dict[str, Any]:
        """Replicate to every site what the pipeline reads from the hub (stage ``distribute``).

        Each site's raws (its visits, from the spec's ``inputs.raws``), and to every site the
        calibrations the pipeline reads (certified on arrival as at the hub: same collections,
        same validity ranges) and its other inputs found in ``inputs.extra`` (the sky map...).

        Returns
        -------
        figures : `dict`
            Files and bytes per site, and the dataset types of each kind.
        """

        def work() -> dict[str, Any]:
            hub_repo = self.repo(self.hub)
            inputs = self.spec.input_collections
            kinds = self.campaign_inputs()
            visits = self.visits()
            hub_raw = rse_name(self.hub, "raw")
            figures: dict[str, Any] = {
                # The plan revision whose homes the raws went to (a later re-plan's groups
                # stage the raws they need themselves).
                "revision": self.revision.number,
                "raw_types": list(kinds.raws),
                "calib_types": list(kinds.calibs),
                "extra_types": list(kinds.extra),
            }
            rules: dict[str, list[str]] = {}
            with self.butler(self.hub, writeable=False) as butler:
                associations = calib_associations(butler, inputs.calibs, kinds.calibs)
                shared = list({ref.id: ref for ref, _, _ in associations}.values())
                extras = [
                    ref
                    for name in kinds.extra
                    for ref in butler.query_datasets(
                        name, collections=list(inputs.extra), explain=False, limit=None
                    )
                ]
                shared += extras
                calib_ds = DID(ANCILLARY_SCOPE, f"{self.spec.campaign}/calibs")
                common_files = register_datasets(
                    self.catalog,
                    butler,
                    shared,
                    repo_root=hub_repo,
                    rse=hub_raw,
                    scope=ANCILLARY_SCOPE,
                    dataset=calib_ds,
                    close=True,
                )
                for site in self.spec.site_names:
                    if site == self.hub:
                        continue
                    site_ds, calib_files = calib_ds, common_files
                    held = self._held_at(site, extras)
                    if held:
                        # A site set up with its own sky map (another UUID under the same data
                        # ID): it keeps it, and gets the other inputs in a dataset of its own.
                        figures.setdefault("held_at_site", {})[site] = len(held)
                        site_ds = DID(ANCILLARY_SCOPE, f"{self.spec.campaign}/calibs/{site}")
                        calib_files = register_datasets(
                            self.catalog,
                            butler,
                            [ref for ref in shared if ref.id not in held],
                            repo_root=hub_repo,
                            rse=hub_raw,
                            scope=ANCILLARY_SCOPE,
                            dataset=site_ds,
                            close=True,
                        )
                    site_visits = sorted(int(v) for v in visits.loc[visits.site == site].visit)
                    raws = [
                        ref
                        for name in kinds.raws
                        if site_visits
                        for ref in butler.query_datasets(
                            name,
                            collections=inputs.raws,
                            where="instrument = inst AND visit IN (visits)",
                            bind={"inst": self.spec.instrument, "visits": site_visits},
                            explain=False,
                            limit=None,
                        )
                    ]
                    raw_ds = DID(RAW_SCOPE, f"{self.spec.campaign}/raws/{site}")
                    raw_files = register_datasets(
                        self.catalog,
                        butler,
                        raws,
                        repo_root=hub_repo,
                        rse=hub_raw,
                        scope=RAW_SCOPE,
                        dataset=raw_ds,
                        close=True,
                        rubin_butler=RAW_FILE,
                    )
                    dst = rse_name(site, "raw")
                    rules[site] = [
                        self.catalog.add_rule(site_ds, dst),
                        self.catalog.add_rule(raw_ds, dst),
                    ]
                    for i, rule in enumerate(rules[site]):
                        self.ledger.set_name(CAMPAIGN, site, f"distribute_rule_{i}", rule)
                    figures[site] = {
                        "raw_files": len(raw_files),
                        "raw_bytes": sum(f.bytes for f in raw_files),
                        "calib_files": len(calib_files),
                        "calib_bytes": sum(f.bytes for f in calib_files),
                    }
            for site, site_rules in rules.items():
                self.wait_until_arrived(site, site_rules)
                with self.butler(site) as butler:
                    certify_associations(butler, associations)
            return figures

        return self.run_stage(CAMPAIGN, CAMPAIGN, "distribute", work)

    def _held_at(self, site: str, refs: Sequence[Any]) -> set[Any]:
        """The refs whose dataset type and data ID the site already holds in the same RUN.

        An operator's site Butler may be set up with its own copy of an extra input (the sky
        map): another dataset under the same data ID, which the hub's could not be ingested
        beside. The site's own is used instead (UUIDs are not compared between runs).
        """
        with self.butler(site, writeable=False) as butler:
            return {
                ref.id
                for ref in refs
                if butler.get_dataset(ref.id) is None and site_has(butler, ref, [ref.run])
            }

    # ------------------------------------------------------------------------ data movement
    def pump_transfers(self) -> None:
        """Let transfers progress once (the embedded worker; a no-op under Rucio's daemons)."""
        if self.pump is None:
            return
        # One pump at a time: concurrent sites share the embedded worker.
        if self._pump_lock.acquire(blocking=False):
            try:
                self.pump()
            finally:
                self._pump_lock.release()

    def ingest_arrivals(self, site: str) -> Any:
        """Run the site's Replica Monitor once (ingest what arrived)."""
        with self._monitor_locks[site]:
            return self._monitor(site).poll()

    def wait_until_arrived(self, site: str, rule_ids: Sequence[str], *, ingest: bool = True) -> int:
        """Return once every file of the rules is at ``site`` and ingested in its Butler.

        Parameters
        ----------
        site : `str`
            Destination site.
        rule_ids : sequence of `str`
            Rules whose files must arrive.
        ingest : `bool`, optional
            Also wait for the Replica Monitor to ingest them (`False` for files that are not
            Butler datasets, such as graphs).

        Returns
        -------
        n : `int`
            Files covered by the rules.

        Raises
        ------
        ArrivalTimeout
            After ``arrival_timeout_s``, or at once when a rule is STUCK; names the files.
        """
        deadline = time.monotonic() + self.arrival_timeout_s
        delay = self.poll_s
        dids: set[str] = set()
        for rule_id in rule_ids:
            rule = self.catalog.get_rule(rule_id)
            dids.update(str(f.did) for f in self.catalog.list_dataset_files(rule.did))
        while True:
            self.pump_transfers()
            got = self.ingest_arrivals(site)
            rules = [self.catalog.get_rule(r) for r in rule_ids]
            missing = sorted(dids - self._monitor(site).done(dids)) if ingest else []
            if not missing and all(r.state == RuleState.OK for r in rules):
                return len(dids)
            stuck = [r for r in rules if r.state == RuleState.STUCK]
            rejected = [(d, why) for d, why in self._monitor(site).rejected() if d in dids]
            if stuck or rejected or time.monotonic() > deadline:
                why = [f"rule {r.id} STUCK: {r.error}" for r in stuck]
                why += [f"{d} rejected on arrival: {reason}" for d, reason in rejected[:5]]
                raise ArrivalTimeout(
                    f"{len(missing)} file(s) not ingested at {site} "
                    f"({'; '.join(why) if why else 'timed out'}): "
                    + ", ".join(missing[:10])
                    + (" ..." if len(missing) > 10 else "")
                )
            # Back off while nothing arrives; poll again soon when something did.
            delay = self.poll_s if got.events else min(delay * 2, 10.0)
            time.sleep(delay)

    # ------------------------------------------------------------------------- site-steps
    def input_collections(self, site: str) -> list[str]:
        """Inputs of a site's next graph: its output chain (or the defaults) and staged runs."""
        own = output_collection(self.spec.campaign, site)
        staged = staged_collection(self.spec.campaign, site)
        with self.butler(site, writeable=False) as butler:
            present = set(butler.collections.query(f"{self.spec.campaign}/{site}/*"))
        inputs = [own if own in present else self.input_chain()]
        if staged in present:
            inputs.append(staged)
        return inputs

    def add_to_chain(self, site: str, chain: str, runs: Iterable[str]) -> None:
        """Put ``runs`` at the front of a CHAINED collection (idempotent, concurrency-safe).

        Sites and groups finish concurrently and each adds its run to the hub's chains: a
        read-modify-write of the chain would lose updates, so the change is one
        ``prepend_chain`` (a registry transaction), serialized in this process as well.
        """
        from lsst.daf.butler import CollectionType

        runs = sorted(set(runs))
        if not runs:
            return
        with self.chain_lock, self.butler(site) as butler:
            butler.collections.register(chain, CollectionType.CHAINED)
            children = set(butler.collections.get_info(chain).children)
            new = [r for r in runs if r not in children]
            if new:
                butler.collections.prepend_chain(chain, new)

    def groups(self, step: str, site: str) -> list[Group]:
        """A site-step's groups, as the plan cut them (``plan/groups.json``)."""
        path = self.plan_dir / "groups.json"
        stamp = (str(path), path.stat().st_mtime_ns)
        with self._inputs_lock:
            if self._groups is None or self._groups[0] != stamp:
                self._groups = (stamp, groups_from_document(json.loads(path.read_text())))
            by_site_step = self._groups[1]
        if site not in self.sites_of(step):
            raise ValueError(
                self.lost_site_message(site)
                or f"{step} runs at {', '.join(self.sites_of(step))}, not at {site}"
            )
        return list(by_site_step.get(f"{step}@{site}", []))

    def attempt(self, step: str, site: str, group: str) -> int:
        """Which fresh submission of a group this is: 0, then 1, 2... after each cancel or
        `forget_site_step` (each attempt has its own output run, graph and BPS directory)."""
        value = self.ledger.name(step, site, "attempt", group=group)
        return int(value) if value else 0

    def unit(self, group: Group) -> WorkUnit:
        """The `WorkUnit` of a group in its current attempt."""
        sizes: dict[int, int] = {}
        if group.patches is not None:
            from .model.sky import sky_map_for

            sky = sky_map_for(self.spec.skymap)
            sizes = {t: int(np.prod(sky[t].num_patches)) for t in group.tracts}
        attempt = self.attempt(group.step, group.site, group.name)
        return work_unit(self.spec, group, attempt, tract_sizes=sizes)

    def units(self, step: str, site: str) -> list[WorkUnit]:
        """Every group of a site-step as a `WorkUnit`, in order."""
        return [self.unit(g) for g in self.groups(step, site)]

    def groups_in_flight(self, site: str) -> int:
        """How many of a site's groups may be submitted at once (its Block's setting)."""
        return max(1, int(self.in_flight.get(site, DEFAULT_GROUPS_IN_FLIGHT)))

    def figures(self, unit: WorkUnit, stage: str) -> dict[str, Any]:
        """The figures a group's finished stage recorded (the next stages read them)."""
        record = self.ledger.get(unit.step, unit.site, stage, group=unit.name)
        if record is None or not record.done:
            raise RuntimeError(f"{unit.label}: stage '{stage}' has not run")
        return dict(record.figures)

    def new_attempt(self, unit: WorkUnit, keep: Sequence[str] = ()) -> WorkUnit:
        """Start a fresh attempt of a group: forget every stage but ``keep``, and every name.

        A new attempt needs new names because the old ones are taken: BPS refuses an existing
        submit directory, PanDA's staging path and the graph's catalog entry are per output
        run, and the old run may hold a cancelled run's partial outputs. Those stay where they
        are, in their own RUN collection, so nothing is mixed or lost.
        """
        step, site, group = unit.step, unit.site, unit.name
        stages = [r.stage for r in self.ledger.records(step, site, group=group)]
        forget = [s for s in stages if s not in keep]
        if forget:
            self.ledger.reset(step, site, forget, group=group)
        self.ledger.delete_names(step, site, group=group)
        self.ledger.set_name(step, site, "attempt", str(unit.attempt + 1), group=group)
        return self.unit(unit.group)

    def run_site_step(
        self,
        step: str,
        site: str,
        runner: PhaseRunner | None = None,
        groups: Sequence[str] | None = None,
    ) -> SiteStepResult:
        """Run every group of one step at one site, skipping what the ledger says is done.

        See `drp_campaign.stages.sitestep.run_site_step`.

        Raises
        ------
        SiteStepFailed
            Naming every failed group, its stage, its cause and its rerun command.
        drp_campaign.ledger.SiteStepBusy
            If another live process is running the same site-step.
        """
        from .stages.sitestep import run_site_step

        return run_site_step(self, step, site, runner, groups)

    # ------------------------------------------------------------------------- lost sites
    def retire_lost(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Cancel the lost sites' open workload runs where their services still answer.

        Runs once per plan revision (stage ``retire``, group ``r<n>``). Each group of a lost
        site submitted and not finished has its run cancelled, or, when the service does not
        answer within ``timeout_s``, abandoned; either way its ``submit`` is marked failed
        with the reason, and nothing waits for it: the re-plan's groups redo its work.

        Returns
        -------
        figures : `dict`
            ``cancelled`` and ``unanswered`` runs (``step@site#group (run id)``).
        """
        revision = self.revision
        if not revision.lost:
            return {}

        def work() -> dict[str, Any]:
            out: dict[str, list[str]] = {"cancelled": [], "unanswered": []}
            for site in revision.lost:
                for step in self.base_spec.step_names:
                    for group in self.ledger.groups(step, site):
                        run_id = self.ledger.name(step, site, "run_id", group=group)
                        if not run_id or self.ledger.is_done(step, site, "submit", group=group):
                            continue
                        label = f"{step}@{site}#{group} (run {run_id})"
                        try:
                            _call_within(
                                functools.partial(self.workloads[site].cancel, run_id), timeout_s
                            )
                            out["cancelled"].append(label)
                        except Exception as exc:  # a lost site's service may not answer
                            out["unanswered"].append(f"{label}: {type(exc).__name__}: {exc}")
                        self.ledger.fail(
                            step,
                            site,
                            "submit",
                            f"{site} lost (plan revision {revision.number}): run {run_id} "
                            "cancelled or abandoned; its work is redone at the other sites",
                            group=group,
                        )
            return out

        return self.run_stage(CAMPAIGN, CAMPAIGN, "retire", work, group=f"r{revision.number}")

    def lost_site_message(self, site: str) -> str | None:
        """Why ``site`` does not run anymore, if it was re-planned away (for errors)."""
        if site not in self.lost:
            return None
        return (
            f"{site} was re-planned away (plan revision {self.revision.number}, "
            f"{self.revision.info.get('reason', 'lost')}); its work runs at "
            f"{', '.join(self.spec.site_names)}"
        )

    # ------------------------------------------------------------------------------ reruns
    def forget_site_step(
        self, step: str, site: str, groups: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Make a site-step's groups run again from scratch, each as a new attempt.

        The next `run_site_step` stages, renders, builds and submits them again, into the new
        attempts' output runs; the previous attempts' outputs stay in theirs.

        Parameters
        ----------
        step, site : `str`
            The site-step.
        groups : sequence of `str`, optional
            Only these groups (default: all of them).

        Returns
        -------
        attempts : `dict` [`str`, `int`]
            Each group's new attempt number.

        Raises
        ------
        ValueError
            If a group's products were published already: a second set would reach the
            hub's ``<campaign>/output`` beside the first.
        drp_campaign.ledger.SiteStepBusy
            If another live process is running the site-step.
        """
        with self.ledger.claim(step, site):  # never under a run in progress
            units = [u for u in self.units(step, site) if groups is None or u.name in groups]
            published = [
                u for u in units if self.ledger.is_done(step, site, "publish", group=u.name)
            ]
            if published:
                raise ValueError(
                    f"{step} at {site}: the products of "
                    + ", ".join(f"{u.label} (run {u.output_run})" for u in published)
                    + " are published already; a fresh attempt would publish them twice. "
                    "Start only the other groups afresh (group=...), or remove those runs "
                    "from the hub's output chain and from the catalog first."
                )
            self.ledger.reset(step, site, group="")  # a site-step skip is decided again
            return {u.name: self.new_attempt(u).attempt for u in units}
