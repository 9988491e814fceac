"""Checks of what a campaign spec refers to, run before a plan or a run starts.

Loading a spec (`drp_campaign.model.spec.load_spec`) validates the YAML and, cheaply, the header
of a visits CSV; it runs in every flow and task. `preflight` checks the rest once, before
anything is written or moved: every line of the visits CSV (or the preset's visit count), the
pipeline file and the subset of every step. Its errors are `SpecError`, like the loader's, so
``drp-campaign validate``, ``plan`` and ``run`` exit 2 with the key and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from .backends.interfaces import rse_name
from .backends.pipeline import check_pipeline
from .model.preflight import (
    CAMPAIGN_ROW,
    Check,
    PreflightReport,
    Status,
    bytes_into_sites,
    human_bytes,
    token_check,
)
from .model.spec import CampaignSpec, Problem, SpecError, visits_csv_problem
from .model.survey import VisitsCsvError, survey_from_spec
from .model.transfers import NOMINAL_BYTES

__all__ = ["PreflightFailed", "preflight", "preflight_sites", "spec_checks"]


class PreflightFailed(RuntimeError):
    """A preflight with FAIL rows: the campaign stops before anything moves.

    The message lists every failed (site, check), its value and its fix.
    """

    def __init__(self, report: PreflightReport) -> None:
        self.report = report
        lines = [f"preflight failed ({report.summary()}):"]
        lines += [f"  {c.site} {c.check}: {c.value}. Fix: {c.fix}" for c in report.failed]
        super().__init__("\n".join(lines))


def preflight(spec: CampaignSpec, path: str | Path | None = None) -> pd.DataFrame | None:
    """Check the spec's visit table and pipeline; return the visit table.

    Parameters
    ----------
    spec : `CampaignSpec`
        A loaded spec.
    path : `str` or `pathlib.Path`, optional
        The spec file as the operator named it, for the messages; default ``spec.source``.

    Returns
    -------
    visits : `pandas.DataFrame` or `None`
        The campaign's visit table (`drp_campaign.model.survey.survey_from_spec`), so that a
        caller that plans need not read the CSV again; `None` for a registry survey, which the
        planner reads (and checks) itself, in pages.

    Raises
    ------
    SpecError
        Listing every problem: a bad line of the visits CSV (file, line, column and fix) or a
        preset count out of range at ``survey.visits``, a missing or unreadable pipeline at
        ``pipeline.yaml``, a subset the pipeline lacks at ``steps[i].subset``.
    """
    problems: list[Problem] = []
    visits: pd.DataFrame | None = None
    try:
        if not spec.survey.is_registry:
            visits = survey_from_spec(spec)
    except VisitsCsvError as exc:
        problems.append(visits_csv_problem(exc, spec.survey.visits))
    except ValueError as exc:  # make_survey: a count the preset cannot give
        reason, _, fix = str(exc).partition("; fix: ")
        problems.append(
            Problem(
                "survey.visits",
                reason,
                f"{fix}." if fix else "see DESIGN.md section 7.",
                value=spec.survey.visits,
            )
        )
    problems.extend(check_pipeline(spec))
    if problems:
        raise SpecError(problems, path if path is not None else spec.source)
    return visits


# ------------------------------------------------------------------------------ every site
def spec_checks(spec: CampaignSpec, path: str | Path | None = None) -> tuple[list[Check], Any]:
    """The campaign rows of a preflight: the visit table and the pipeline (`preflight`).

    Returns
    -------
    checks : `list` [`Check`]
        One FAIL row per problem (its key, value and fix), else one PASS row each.
    visits : `pandas.DataFrame` or `None`
        The visit table when it was read (see `preflight`).
    """
    try:
        visits = preflight(spec, path)
    except SpecError as err:
        rows = [
            Check(
                CAMPAIGN_ROW,
                "pipeline" if p.key.startswith(("pipeline", "steps")) else "visits",
                Status.FAIL,
                f"{p.key}: {p.reason}",
                p.fix,
            )
            for p in err.problems
        ]
        failed = {r.check for r in rows}
        if "visits" not in failed:
            rows.insert(0, Check(CAMPAIGN_ROW, "visits", Status.PASS, "read"))
        if "pipeline" not in failed:
            rows.append(Check(CAMPAIGN_ROW, "pipeline", Status.PASS, spec.pipeline.yaml))
        return rows, None
    n = "from the hub's registry" if visits is None else f"{len(visits)} visits"
    subsets = ", ".join(s.subset for s in spec.steps)
    return [
        Check(CAMPAIGN_ROW, "visits", Status.PASS, n),
        Check(CAMPAIGN_ROW, "pipeline", Status.PASS, f"{spec.pipeline.yaml}: {subsets}"),
    ], visits


def _probe_write(path: Path) -> str | None:
    """Create and remove a file where ``path`` is (or would be): `None`, or why it failed.

    A real write, not `os.access`: permissions, read-only mounts and quotas all show, for
    root too. Where ``path`` does not exist yet, its nearest existing parent is probed.
    """
    target = _existing(Path(path))
    if not target.is_dir():
        return f"{target} is not a directory"
    try:
        fd, name = tempfile.mkstemp(prefix=".drp-preflight-", dir=target)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"cannot write in {target}: {exc.strerror or exc}"
    return None


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass
class _Site:
    """What one site's rows need, resolved once from its Block (or the embedded default)."""

    name: str
    block: str  # how to name its settings in a fix
    facility: Any  # DataFacility, None (embedded default) or the exception loading it
    repo: str

    @property
    def loaded(self) -> bool:
        return not isinstance(self.facility, BaseException)

    def field(self, name: str, default: Any) -> Any:
        return getattr(self.facility, name, default) if self.facility is not None else default


def _block_row(site: _Site) -> Check:
    if not site.loaded:
        return Check(
            site.name,
            "block",
            Status.FAIL,
            f"{type(site.facility).__name__}: {site.facility}",
            f"save the Block {site.block} again ('drp-campaign blocks' or the Prefect UI), with "
            "the fields its message names",
        )
    if site.facility is None:
        return Check(site.name, "block", Status.PASS, "none saved: the embedded default")
    f = site.facility
    return Check(
        site.name,
        "block",
        Status.PASS,
        f"{site.block}: catalog {f.catalog_backend}, workload {f.workload_backend}",
    )


def _butler_rows(
    site: _Site, spec: CampaignSpec, hub: str, hub_has: dict[str, bool]
) -> list[Check]:
    """``butler``, ``instrument`` and ``skymap`` rows; fills ``hub_has`` at the hub."""
    from .backends.butler import open_repo
    from .backends.repos import RepoUnavailable, repo_root
    from .backends.skymaps import SkymapMismatch, check_registered_skymap

    skip = [
        Check(site.name, "instrument", Status.SKIP, "the repository did not open"),
        Check(site.name, "skymap", Status.SKIP, "the repository did not open"),
    ]
    try:
        butler = open_repo(site.repo, writeable=True)
    except Exception as exc:  # whatever daf_butler raises, the operator needs the same advice
        err = RepoUnavailable(site.name, site.repo, site.block, f"{type(exc).__name__}: {exc}")
        value = f"{site.repo}: {type(exc).__name__}"
        return [Check(site.name, "butler", Status.FAIL, value, str(err)), *skip]
    rows: list[Check] = []
    with butler:
        problem: str | None
        try:
            root: Path | None = repo_root(site.repo)
        except Exception:  # a repository on object storage: nothing local to probe
            root, problem = None, None
        else:
            problem = _probe_write(root) if root is not None else None
        if problem is None:
            where = f"; datastore root {root} writeable" if root is not None else ""
            rows.append(Check(site.name, "butler", Status.PASS, f"{site.repo} opened{where}"))
        else:
            rows.append(
                Check(
                    site.name,
                    "butler",
                    Status.FAIL,
                    f"{site.repo} opened, but {problem}",
                    "give the campaign's account write access to the repository (its registry "
                    f"and datastore), or fix 'butler_repo' in {site.block}",
                )
            )
        instrument = spec.instrument
        found = bool(
            list(butler.query_dimension_records("instrument", instrument=instrument, explain=False))
        )
        if site.name == hub:
            hub_has["instrument"] = found
        rows.append(
            _registered_row(
                site.name,
                "instrument",
                instrument,
                found,
                site.name == hub,
                hub_has.get("instrument"),
                f"register it at the hub ('butler register-instrument {site.repo} "
                "<instrument class>'), or fix 'instrument' in the spec",
            )
        )
        try:
            registered = check_registered_skymap(butler, spec.skymap, site.repo)
        except SkymapMismatch as err:
            rows.append(
                Check(
                    site.name,
                    "skymap",
                    Status.FAIL,
                    f"{spec.skymap.name}: another geometry is registered",
                    str(err),
                )
            )
            return rows
        if site.name == hub:
            hub_has["skymap"] = registered
        rows.append(
            _registered_row(
                site.name,
                "skymap",
                f"{spec.skymap.name} (the spec's hash)",
                registered,
                site.name == hub,
                hub_has.get("skymap"),
                "register the spec's skymap at the hub ('drp-campaign seed' does it for the "
                "demo), or fix 'skymap.name' in the spec",
            )
        )
    return rows


def _registered_row(
    site: str, check: str, what: str, found: bool, is_hub: bool, at_hub: bool | None, fix: str
) -> Check:
    if found:
        return Check(site, check, Status.PASS, f"{what} registered")
    if is_hub:
        return Check(site, check, Status.FAIL, f"{what} not registered at the hub", fix)
    if at_hub:
        return Check(site, check, Status.PASS, f"{what} not yet: setup copies it from the hub")
    return Check(site, check, Status.SKIP, f"{what} not registered here, nor at the hub")


def _rse_rows(site: _Site, catalog: Any, catalog_error: str | None, workdir: Path) -> list[Check]:
    from .backends.ingest import storage_root

    rses = [site.field("raw_rse", rse_name(site.name, "raw"))]
    rses.append(site.field("butler_rse", rse_name(site.name, "butler")))
    if catalog_error is not None:
        return [Check(site.name, f"rse:{r}", Status.SKIP, catalog_error) for r in rses]
    rows: list[Check] = []
    declared = set(catalog.list_rses())
    for rse in rses:
        if rse in declared:
            root = Path(catalog.rse_root(rse))
            if not catalog.rse_writable(rse):
                rows.append(
                    Check(
                        site.name,
                        f"rse:{rse}",
                        Status.FAIL,
                        f"read-only (availability_write is false); storage {root}",
                        f"open it for writing: 'rucio-admin rse update --rse {rse} --setting "
                        "availability_write --value True' (the embedded catalog: "
                        f"set_rse_writable('{rse}', True))",
                    )
                )
                continue
            state = "declared, writable"
        else:
            root = storage_root(workdir, rse)
            state = "not declared yet (setup declares it)"
        problem = _probe_write(root)
        if problem is None:
            rows.append(Check(site.name, f"rse:{rse}", Status.PASS, f"{state}; {root} writeable"))
        else:
            rows.append(
                Check(
                    site.name,
                    f"rse:{rse}",
                    Status.FAIL,
                    f"{state}; {problem}",
                    f"make {root} writeable for the account that moves the files",
                )
            )
    return rows


@dataclass(frozen=True)
class _Catalog:
    """The campaign's catalog, asked ``whoami`` once for every site that shares it."""

    client: Any
    answer: str  # its whoami, or why it did not answer
    ok: bool


def _catalog_row(site: _Site, make: Callable[[Any], Any], shared: _Catalog) -> Check:
    rucio = site.field("rucio", None) if site.field("catalog_backend", "") == "rucio" else None
    try:
        if rucio is None:
            if not shared.ok:
                raise RuntimeError(shared.answer)
            answer = shared.answer
        else:
            answer = make(rucio.client_settings()).whoami()
        return Check(site.name, "catalog", Status.PASS, answer)
    except Exception as exc:
        return Check(
            site.name,
            "catalog",
            Status.FAIL,
            f"{type(exc).__name__}: {exc}",
            f"check the 'rucio' credentials and hosts in {site.block} ('rucio whoami' with "
            "them must answer)",
        )


def _workload_rows(site: _Site, workdir: Path, margin: timedelta, now: datetime) -> list[Check]:
    from .backends.factory import make_workload

    if site.field("workload_backend", "local") != "panda":
        value = "local executor (the run's Dask workers)"
        return [Check(site.name, "workload", Status.PASS, value)]
    creds = site.facility.panda
    url = creds.panda_url
    service = make_workload(
        site.name,
        workdir,
        None,
        creds.panda_settings(site.name),
        # One attempt: preflight reports a dead server at once, the run retries.
        retry={"retries": 1, "backoff_s": 0.0},
    )
    rows: list[Check] = []
    try:
        service.ping()
        rows.append(Check(site.name, "workload", Status.PASS, f"PanDA answered at {url}"))
    except Exception as exc:
        text = " ".join(str(exc).split())
        rows.append(
            Check(
                site.name,
                "workload",
                Status.FAIL,
                f"PanDA at {url}: {text[:300]}",
                f"fix 'panda.panda_url' (and panda_url_ssl, cache_url) in {site.block}, or "
                "start the server; 'drp-campaign-panda ping' must answer",
            )
        )
    expiry = getattr(getattr(service, "settings", None), "token_expiry", None)
    rows.append(
        token_check(
            site.name,
            expiry,
            now,
            margin,
            f"save a fresh ID token in {site.block} ('panda.id_token')",
        )
    )
    return rows


def _dask_row(address: str | None) -> Check:
    if address is None:
        return Check(CAMPAIGN_ROW, "dask", Status.PASS, "a local cluster on 127.0.0.1 (per run)")
    from distributed import Client

    try:
        with Client(address, timeout="10s") as client:
            n = len(client.scheduler_info().get("workers", {}))
    except Exception as exc:
        return Check(
            CAMPAIGN_ROW,
            "dask",
            Status.FAIL,
            f"{address}: {type(exc).__name__}: {exc}",
            "start the scheduler, or pass the address it listens on (--dask-address)",
        )
    if n == 0:
        return Check(
            CAMPAIGN_ROW,
            "dask",
            Status.FAIL,
            f"{address}: no workers",
            "start workers for the scheduler ('dask worker ADDRESS')",
        )
    return Check(CAMPAIGN_ROW, "dask", Status.PASS, f"{address}: {n} workers")


def _space_needed(spec: CampaignSpec, plan_dir: Path, visits: Any) -> tuple[dict[str, int], str]:
    """Bytes per site and where the figure came from (the plan, or the shares)."""
    summary_path = plan_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        per_site = summary["counts"]["visits_per_site"]
        links = summary["bytes"]["links"]
        source = "the plan"
    else:
        n = len(visits) if visits is not None else None
        if n is None:
            return {}, "no plan yet, and the visits are in the hub's registry"
        per_site = {s: round(n * spec.shares[s]) for s in spec.site_names}
        links, source = {}, "the shares (no plan yet: raws only)"
    needed = bytes_into_sites(spec.site_names, spec.hub, _raw_visit_bytes(spec), per_site, links)
    return needed, source


def _raw_visit_bytes(spec: CampaignSpec) -> int:
    """Nominal raw bytes of one visit of the spec's instrument.

    RTN-109's figure is an LSSTCam visit; a camera with fewer detectors (ComCam's 9) scales it
    per detector. An instrument the focal-plane model does not know counts as LSSTCam: the
    larger figure, so a shortfall is never hidden.
    """
    from .model.focalplane import focal_plane

    per_detector = NOMINAL_BYTES["raw_visit"] / focal_plane("LSSTCam").n_detectors
    try:
        detectors = focal_plane(spec.instrument).n_detectors
    except (KeyError, ValueError):
        return NOMINAL_BYTES["raw_visit"]
    return round(per_detector * detectors)


def _space_row(site: _Site, needed: dict[str, int], source: str) -> Check:
    from .backends.repos import repo_root

    if site.name not in needed:
        return Check(site.name, "space", Status.SKIP, source)
    try:
        where = _existing(repo_root(site.repo))
    except Exception as exc:
        return Check(site.name, "space", Status.SKIP, f"not a local repository: {exc}")
    free = shutil.disk_usage(where).free
    need = needed[site.name]
    value = (
        f"{human_bytes(free)} free at {where}; transfers put {human_bytes(need)} there "
        f"(from {source}, RTN-109 nominal sizes)"
    )
    if free < need:
        return Check(
            site.name,
            "space",
            Status.FAIL,
            value,
            f"free {human_bytes(need - free)} at {where}, or lower the site's share",
        )
    return Check(site.name, "space", Status.PASS, value)


def preflight_sites(
    spec: CampaignSpec,
    workdir: str | Path,
    facilities: Mapping[str, Any],
    *,
    repos: Mapping[str, str],
    blocks: Mapping[str, str],
    dask_address: str | None = None,
    token_margin: timedelta = timedelta(hours=12),
    now: datetime | None = None,
    spec_path: str | Path | None = None,
    plan_dir: Path | None = None,
) -> PreflightReport:
    """Check every site of a campaign before anything moves; one row per (site, check).

    Campaign rows: the visit table, the pipeline and its subsets, the Dask scheduler. Per
    site: its Block loads and validates; its Butler repository opens read-write and its
    datastore root takes a file; the instrument and the skymap (the spec's hash) are
    registered (at a site other than the hub, setup copies them from the hub); its two RSEs
    are writable in the catalog and their storage takes a file; its catalog answers
    (``whoami``); its workload service answers (PanDA ``ping``) and the PanDA token outlives
    ``token_margin``; the free space under its repository covers what the transfers put there.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign as it runs now (without the sites a re-plan dropped).
    workdir : `str` or `pathlib.Path`
        Work directory (the embedded catalog, the plan).
    facilities : mapping
        Site -> its `DataFacility` Block, `None` (none saved: the embedded default), or the
        exception that loading it raised.
    repos : mapping
        Site -> its Butler repository (the Block's ``butler_repo`` or the embedded default).
    blocks : mapping
        Site -> how to name where its settings live (the Block, or the embedded default).
    dask_address : `str`, optional
        The scheduler the campaign will use; none: a local cluster per run.
    token_margin : `datetime.timedelta`
        How long a PanDA token must still be valid.
    now : `datetime.datetime`, optional
        The time the margin counts from (default: now).
    spec_path : `str` or `pathlib.Path`, optional
        The spec as the operator named it, for the messages.
    plan_dir : `pathlib.Path`, optional
        The plan to read the bytes per site from (default ``<workdir>/plan``).

    Returns
    -------
    report : `PreflightReport`
        Never a secret in a row: messages come from validation errors that hide their input
        and from servers that never echo credentials.
    """
    from .backends.factory import make_catalog

    wd = Path(workdir).absolute()
    now = now or datetime.now(UTC)
    rows, visits = spec_checks(spec, spec_path)
    rows.append(_dask_row(dask_address))
    sites = [
        _Site(s, blocks[s], facilities.get(s), repos[s])
        for s in sorted(spec.site_names, key=lambda s: s != spec.hub)  # the hub first
    ]
    hub = sites[0]
    hub_rucio = hub.field("rucio", None) if hub.field("catalog_backend", "") == "rucio" else None
    try:
        client = make_catalog(wd, hub_rucio.client_settings() if hub_rucio is not None else None)
        shared = _Catalog(client, client.whoami(), True)
    except Exception as exc:
        why = f"the campaign's catalog did not answer: {type(exc).__name__}: {exc}"
        shared = _Catalog(None, why, False)
    needed, source = _space_needed(spec, plan_dir or wd / "plan", visits)
    hub_has: dict[str, bool] = {}
    for site in sites:
        rows.append(_block_row(site))
        if not site.loaded:
            rows.extend(
                Check(site.name, c, Status.SKIP, "its Block did not load")
                for c in ("butler", "instrument", "skymap", "catalog", "workload", "space")
            )
            continue
        rows.extend(_butler_rows(site, spec, spec.hub, hub_has))
        rows.extend(_rse_rows(site, shared.client, None if shared.ok else shared.answer, wd))
        rows.append(_catalog_row(site, lambda s: make_catalog(wd, s), shared))
        rows.extend(_workload_rows(site, wd, token_margin, now))
        rows.append(_space_row(site, needed, source))
    return PreflightReport(tuple(rows))
