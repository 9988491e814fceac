"""The RTN-057 milestone report: five tests with measured figures, pictures, and the verdict.

Everything is measured from what the campaign left: the ledger (stages, times, figures), the
data catalog (datasets, replicas) and the sites' Butler repositories. Nothing is assumed from
the plan except what the plan promised (the overlap PVIs, the bytes), which is checked against
what actually moved.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.butler import has_collection
from ..backends.interfaces import DID, ReplicaState, file_adler32, rse_name
from ..ledger import CAMPAIGN, StageState
from ..model.transfers import NOMINAL_BYTES

__all__ = ["DR1_VISITS_PER_DAY", "MilestoneResult", "TestResult", "write_milestone"]

#: What DR1 needs sustained (DESIGN.md section 9): ~1,000-1,600 visits per day.
DR1_VISITS_PER_DAY = (1000, 1600)


@dataclass
class TestResult:
    """One of RTN-057's five tests."""

    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        """The ``tests`` entry of ``milestone.json``."""
        return {
            "name": self.name,
            "status": "PASS" if self.passed else "FAIL",
            "figures": self.figures,
            "detail": self.detail,
        }


@dataclass
class MilestoneResult:
    """Where the report went and whether everything passed."""

    markdown_path: Path
    json_path: Path
    passed: bool  # the five tests PASS and the outputs equal the single-site run's
    markdown: str
    data: dict[str, Any]
    tests_passed: bool = False  # the five tests PASS (equality not considered)


def _raw_distribution(run: Any) -> TestResult:
    # The homes the raws were distributed to: a re-plan's groups stage what they need.
    distribute = run.ledger.get(CAMPAIGN, CAMPAIGN, "distribute")
    visits = run.visits(int(distribute.figures.get("revision", 0)) if distribute else None)
    raws = run.spec.input_collections.raws
    raw_types = run.campaign_inputs().raws
    per_site: dict[str, Any] = {}
    ok = bool(raw_types)

    def query(butler: Any, site_visits: list[int]) -> list[Any]:
        return [
            ref
            for name in raw_types
            if site_visits
            for ref in butler.query_datasets(
                name,
                collections=raws,
                where="instrument = inst AND visit IN (v)",
                bind={"inst": run.spec.instrument, "v": site_visits},
                explain=False,
                limit=None,
            )
        ]

    for site in run.spec.site_names:
        site_visits = [
            int(v)
            for v in (visits.visit if site == run.hub else visits.loc[visits.site == site].visit)
        ]
        # What the site should hold is what the hub holds for its visits.
        with run.butler(run.hub, writeable=False) as hub:
            expected = len(query(hub, site_visits))
        with run.butler(site, writeable=False) as butler:
            refs = query(butler, site_visits)
            on_disk = sum(1 for r in refs if Path(butler.getURI(r).ospath).exists())
        per_site[site] = {"expected": expected, "ingested": len(refs), "on_disk": on_disk}
        ok &= expected == len(refs) == on_disk
    return TestResult(
        "raw inputs distributed",
        ok,
        per_site,
        "every site's raws (its visits; all at the hub) are in its storage and its Butler",
    )


def _graph_distribution(run: Any) -> TestResult:
    rows: dict[str, Any] = {}
    ok = True
    for step in run.spec.step_names:
        for site in run.sites_of(step):
            row = {"groups": 0, "built": 0, "no_work": 0, "quanta": 0, "shipped_to_hub": 0}
            for unit in run.units(step, site):
                row["groups"] += 1
                build = run.ledger.get(step, site, "build", group=unit.name)
                stage = run.ledger.get(step, site, "stage", group=unit.name)
                if any(r is not None and r.state == StageState.SKIPPED for r in (build, stage)):
                    row["no_work"] += 1
                    continue
                if build is None or build.state != StageState.DONE:
                    continue
                row["built"] += 1
                row["quanta"] += int(build.figures.get("n_quanta", 0))
                at_site = run.repo(site) / unit.graph_path
                at_hub = run.repo(run.hub) / unit.graph_path
                if at_hub.exists() and at_site.exists():
                    row["shipped_to_hub"] += file_adler32(at_hub) == file_adler32(at_site)
            rows[f"{step}@{site}"] = row
            ok &= row["no_work"] + row["shipped_to_hub"] == row["groups"]
    return TestResult(
        "processing graphs distributed",
        ok,
        rows,
        "each group's QuantumGraph was built at its site and its file reached the hub intact",
    )


def _products(run: Any, site: str, run_name: str) -> set[Any]:
    with run.butler(site, writeable=False) as butler:
        if not has_collection(butler, run_name):
            return set()
        return {
            ref.id
            for dt in butler.registry.queryDatasetTypes()
            if run.is_product(dt.name)
            for ref in butler.query_datasets(dt, collections=run_name, explain=False, limit=None)
        }


def _output_tests(run: Any) -> tuple[TestResult, TestResult]:
    registration: dict[str, Any] = {}
    distribution: dict[str, Any] = {}
    reg_ok = dist_ok = True
    hub_rse = rse_name(run.hub, "butler")
    for step in run.spec.step_names:
        for site in run.sites_of(step):
            key = f"{step}@{site}"
            reg: dict[str, Any] = {"groups": 0, "butler": 0, "catalog": 0}
            dist = {"published": 0, "replicas_at_hub": 0, "ingested_at_hub": 0}
            for unit in run.units(step, site):
                publish = run.ledger.get(step, site, "publish", group=unit.name)
                if publish is None or publish.state != StageState.DONE:
                    skipped = any(
                        (r := run.ledger.get(step, site, s, group=unit.name)) is not None
                        and r.state == StageState.SKIPPED
                        for s in ("stage", "build")
                    )
                    if not skipped:
                        reg_ok = dist_ok = False
                        reg.setdefault("unpublished", []).append(unit.name)
                    continue
                reg["groups"] += 1
                run_name = str(publish.figures["run"])
                dataset = DID.parse(str(publish.figures["dataset"]))
                files = run.catalog.list_dataset_files(dataset)
                in_butler = _products(run, site, run_name)
                reg["butler"] += len(in_butler)
                reg["catalog"] += len(files)
                reg_ok &= len(in_butler) == len(files)
                at_hub_catalog = sum(
                    1
                    for r in run.catalog.list_replicas(dataset)
                    if r.rse == hub_rse and r.state == ReplicaState.AVAILABLE
                )
                at_hub_butler = len(in_butler & _products(run, run.hub, run_name))
                dist["published"] += len(files)
                dist["replicas_at_hub"] += at_hub_catalog
                dist["ingested_at_hub"] += at_hub_butler
                dist_ok &= len(files) == at_hub_catalog == at_hub_butler
            registration[key] = reg
            distribution[key] = dist
    return (
        TestResult(
            "output products registered",
            reg_ok,
            registration,
            "every product in a site's Butler is registered in the data catalog (and no more)",
        ),
        TestResult(
            "output products distributed",
            dist_ok,
            distribution,
            "every published product has a replica at the hub and is ingested in its Butler",
        ),
    )


def _rate(run: Any, cores: int) -> TestResult:
    visits = run.visits()
    records = [r for r in run.ledger.records() if r.step != CAMPAIGN]
    per_site: dict[str, Any] = {}
    for site in run.spec.site_names:
        mine = [r for r in records if r.site == site]
        submit = [r for r in mine if r.stage == "submit" and r.seconds is not None]
        builds = [r for r in mine if r.stage == "build" and r.state == StageState.DONE]
        quanta = sum(int(r.figures.get("n_quanta", 0)) for r in builds)
        exec_s = sum(r.seconds or 0.0 for r in submit)
        busy_s = sum(r.seconds or 0.0 for r in mine if r.seconds is not None)
        n_visits = int((visits.site == site).sum())
        per_site[site] = {
            "visits": n_visits,
            "quanta": quanta,
            "quanta_per_s": round(quanta / exec_s, 2) if exec_s else None,
            "visits_per_hour": round(n_visits / busy_s * 3600, 1) if busy_s else None,
        }
    starts = [r.started for r in run.ledger.records() if r.started and r.stage != "reference"]
    ends = [
        r.finished
        for r in run.ledger.records()
        if r.finished and r.stage not in ("reference", "plan")
    ]
    wall = (max(ends) - min(starts)) if starts and ends else 0.0
    total_quanta = sum(s["quanta"] for s in per_site.values())
    exec_total = sum(
        r.seconds or 0.0 for r in records if r.stage == "submit" and r.seconds is not None
    )
    visits_per_hour = len(visits) / wall * 3600 if wall else 0.0
    per_core_day = visits_per_hour * 24 / max(cores, 1)
    figures = {
        "per_site": per_site,
        "wall_s": round(wall, 1),
        "visits_per_hour": round(visits_per_hour, 1),
        "quanta_per_s": round(total_quanta / exec_total, 2) if exec_total else 0.0,
        "cores": cores,
        "visits_per_day_per_core": round(per_core_day, 1),
        "dr1_needs_visits_per_day": list(DR1_VISITS_PER_DAY),
    }
    return TestResult(
        "processing rate",
        visits_per_hour * 24 >= DR1_VISITS_PER_DAY[1],
        figures,
        "with the emulated pipeline the work per quantum is tiny, so this measures the "
        "orchestration's own throughput (planning excluded): PASS when it alone could sustain "
        f"DR1's {DR1_VISITS_PER_DAY[1]:,} visits/day on this machine's {cores} cores, i.e. the "
        "orchestrator is not what limits the rate",
    )


def _bytes(run: Any) -> tuple[dict[str, Any], dict[tuple[str, str], int]]:
    """Planned vs moved overlap PVIs, and the measured site-to-site matrix (bytes)."""
    import pandas as pd

    summary = json.loads((run.plan_dir / "summary.json").read_text())
    plan_bytes = summary.get("bytes", {})
    planned_pvis = pd.read_parquet(run.plan_dir / "transfers.parquet")
    matrix: dict[tuple[str, str], int] = {}
    moved_pvis: set[tuple[int, int, str]] = set()
    pvi_type = run.spec.pvi  # the pipeline's PVI dataset type, as the spec names it
    staged = [  # one catalog dataset per group that staged something
        (site, DID(run.scope, unit.staged_dataset))
        for step in run.spec.step_names
        for site in run.sites_of(step)
        for unit in run.units(step, site)
        if (stage := run.ledger.get(step, site, "stage", group=unit.name)) is not None
        and stage.figures.get("files")
    ]
    for site, dataset in staged:
        for f in run.catalog.list_dataset_files(dataset):
            # Product names start with their RUN: <campaign>/<step>/<site>/<group>/...
            parts = f.name.split("/")
            src = parts[2] if len(parts) > 3 and parts[0] == run.spec.campaign else run.hub
            if src in run.lost:  # made there before it was lost: it came from the hub
                src = run.hub
            matrix[(src, site)] = matrix.get((src, site), 0) + f.bytes
            if pvi_type and (f"/{pvi_type}/" in f"/{f.name}/" or parts[4:5] == [pvi_type]):
                moved_pvis.add((*_visit_detector(run, f.name), site))
    for site in run.spec.site_names:
        publish_total = 0
        for r in run.ledger.records(site=site):
            if r.stage == "publish" and r.done and site != run.hub:
                publish_total += int(r.figures.get("bytes", 0))
        if publish_total:
            matrix[(site, run.hub)] = matrix.get((site, run.hub), 0) + publish_total
    distribute = run.ledger.get(CAMPAIGN, CAMPAIGN, "distribute")
    if distribute is not None:
        for site, fig in distribute.figures.items():
            if isinstance(fig, dict):
                b = int(fig.get("raw_bytes", 0)) + int(fig.get("calib_bytes", 0))
                matrix[(run.hub, site)] = matrix.get((run.hub, site), 0) + b
    planned_set = {
        (int(r.visit), int(r.detector), str(r.dst_site)) for r in planned_pvis.itertuples()
    }
    # Every PVI is published to the hub anyway, so the hub's overlap needs are met by
    # publication: a planned PVI bound for the hub has moved when the hub holds it.
    hub_pvis = _hub_pvis(run)
    moved_pvis |= {(v, d, s) for v, d, s in planned_set if s == run.hub and (v, d) in hub_pvis}
    pvi = NOMINAL_BYTES["pvi"]
    out = {
        "planned": int(plan_bytes.get("planned", 0)),
        "lower_bound": int(plan_bytes.get("lower_bound", 0)),
        "moved": len(moved_pvis) * int(pvi),
        "moved_overlap_pvis": len(moved_pvis),
        "planned_overlap_pvis": len(planned_set),
        "overlap_pvis_as_planned": moved_pvis == planned_set,
        "unplanned_pvis": len(moved_pvis - planned_set),
        "missed_pvis": len(planned_set - moved_pvis),
        "mock_bytes_moved": sum(matrix.values()),
    }
    return out, matrix


def _hub_pvis(run: Any) -> set[tuple[int, int]]:
    """(visit, detector) of every PVI in the hub's published products."""
    from ..campaign import campaign_output

    if run.spec.pvi is None:
        return set()
    with run.butler(run.hub, writeable=False) as butler:
        if campaign_output(run.spec.campaign) not in butler.collections.query("*"):
            return set()
        refs = butler.query_datasets(
            run.spec.pvi,
            collections=campaign_output(run.spec.campaign),
            instrument=run.spec.instrument,
            explain=False,
            limit=None,
        )
    return {(int(r.dataId["visit"]), int(r.dataId["detector"])) for r in refs}


def _visit_detector(run: Any, name: str) -> tuple[int, int]:
    """(visit, detector) of a PVI from the sidecar metadata of its catalog entry."""
    meta = run.catalog.get_metadata(DID(run.scope, name))
    sidecar = json.loads(meta["rubin_sidecar"]) if meta.get("rubin_sidecar") else {}
    data_id = sidecar.get("dataId", {}).get("dataId", sidecar.get("dataId", {}))
    return int(data_id["visit"]), int(data_id["detector"])


def _revisions(run: Any) -> list[dict[str, Any]]:
    """Each plan revision: what it moved (planned) and what its redone groups moved (measured)."""
    out = []
    for number in range(1, run.revision.number + 1):
        record = run.ledger.get(CAMPAIGN, CAMPAIGN, "replan", group=f"r{number}")
        if record is None or not record.done:
            continue
        info = dict(record.figures)
        measured: dict[str, Any] = {
            "groups": 0, "done": 0, "staged_files": 0, "staged_bytes": 0, "quanta": 0
        }  # fmt: skip
        for step in run.spec.step_names:
            for site in run.sites_of(step):
                for unit in run.units(step, site):
                    if unit.group.revision != number:
                        continue
                    measured["groups"] += 1
                    stage = run.ledger.get(step, site, "stage", group=unit.name)
                    if stage is not None and stage.done:
                        measured["staged_files"] += int(stage.figures.get("files", 0))
                        measured["staged_bytes"] += int(stage.figures.get("bytes", 0))
                    build = run.ledger.get(step, site, "build", group=unit.name)
                    if build is not None and build.done:
                        measured["quanta"] += int(build.figures.get("n_quanta", 0))
                    arrive = run.ledger.get(step, site, "arrive", group=unit.name)
                    skipped = any(r.state == StageState.SKIPPED for r in
                                  run.ledger.records(step, site, group=unit.name))  # fmt: skip
                    measured["done"] += bool(skipped or (arrive is not None and arrive.done))
        ends = [
            r.finished
            for r in run.ledger.records()
            if r.finished and record.finished and r.finished >= record.finished
            and r.stage not in ("reference", "report")
        ]  # fmt: skip
        measured["finish_s"] = round(max(ends) - record.finished, 1) if ends else None
        retire = run.ledger.get(CAMPAIGN, CAMPAIGN, "retire", group=f"r{number}")
        info["measured"] = measured
        info["retired"] = dict(retire.figures) if retire is not None else None
        out.append(info)
    return out


def _plots(run: Any, out_dir: Path, matrix: dict[tuple[str, str], int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .plots import SITE_COLOURS

    files = []
    partition = run.plan_dir / "partition.png"
    if partition.exists():
        shutil.copyfile(partition, out_dir / "partition.png")
        files.append("partition.png")
    for number in range(1, run.revision.number + 1):
        picture = run.workdir / f"plan-r{number}" / "replan.png"
        if picture.exists():
            shutil.copyfile(picture, out_dir / f"replan-r{number}.png")
            files.append(f"replan-r{number}.png")
    # Timeline: one row per site (the lost ones too), one bar per step.
    sites = run.base_spec.site_names
    steps = run.spec.step_names
    records = [r for r in run.ledger.records() if r.started and r.finished]
    if records:
        t0 = min(r.started for r in records)
        fig, ax = plt.subplots(figsize=(9, 1.2 + 0.6 * len(sites)))
        for i, site in enumerate(sites):
            for j, step in enumerate(steps):
                mine = [r for r in records if r.step == step and r.site == site]
                if not mine:
                    continue
                start = min(r.started for r in mine) - t0
                end = max(r.finished for r in mine) - t0
                ax.barh(
                    i,
                    end - start,
                    left=start,
                    color=SITE_COLOURS[j % len(SITE_COLOURS)],
                    edgecolor="black",
                    height=0.6,
                    label=step if i == 0 else None,
                )
            setup = [r for r in records if r.site == site and r.step == CAMPAIGN]
            for r in setup:
                ax.barh(i, r.finished - r.started, left=r.started - t0, color="#dddddd", height=0.3)
        ax.set_yticks(range(len(sites)), sites)
        ax.set_xlabel("seconds since the campaign started")
        ax.set_title(f"{run.spec.campaign}: steps per site (grey: setup)")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=False))
        # Outside the axes: the bars of the last step sit where a legend inside would go.
        ax.legend(uniq.values(), uniq.keys(), loc="upper left", bbox_to_anchor=(1.01, 1),
                  fontsize=8)  # fmt: skip
        fig.tight_layout()
        fig.savefig(out_dir / "timeline.png", dpi=110)
        plt.close(fig)
        files.append("timeline.png")
    # Transfer matrix (measured bytes of the mock files).
    grid = np.zeros((len(sites), len(sites)))
    for (src, dst), b in matrix.items():
        if src in sites and dst in sites:
            grid[sites.index(src), sites.index(dst)] += b
    # The demo's mock files are small: pick the unit that shows every link's figure.
    scale, unit = (1e6, "MB") if grid.max() >= 10e6 else (1e3, "kB")
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(grid / scale, cmap="viridis")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xlabel("to")
    ax.set_ylabel("from")
    top = grid.max() or 1.0
    for i in range(len(sites)):
        for j in range(len(sites)):
            colour = "black" if grid[i, j] > 0.6 * top else "white"  # readable on yellow
            ax.text(j, i, f"{grid[i, j] / scale:.1f}", ha="center", va="center", color=colour)
    fig.colorbar(im, label=f"{unit} moved")
    ax.set_title("Data moved between sites (measured)")
    fig.tight_layout()
    fig.savefig(out_dir / "transfer_matrix.png", dpi=110)
    plt.close(fig)
    files.append("transfer_matrix.png")
    return files


def _markdown(run: Any, data: dict[str, Any], tests: list[TestResult], files: list[str]) -> str:
    lines = [f"# Milestone report: {run.spec.campaign}", ""]
    lines.append(
        f"Sites: {', '.join(run.spec.site_names)} (hub {run.hub}); steps: "
        f"{', '.join(run.spec.step_names)}; {len(run.visits())} visits."
    )
    lines += ["", "| # | test | status |", "|---|---|---|"]
    for i, t in enumerate(tests, start=1):
        lines.append(f"| {i} | {t.name} | **{'PASS' if t.passed else 'FAIL'}** |")
    lines += ["", f"**Equal to a single-site run:** {data['equal_to_single_site']}"]
    if data.get("verification"):
        lines.append(f"({data['verification']})")
    lines += [
        f"Missing: {data['missing']}, duplicated: {data['duplicated']}.",
        "",
        "## Bytes",
        "",
        "| | bytes |",
        "|---|---|",
    ]
    b = data["bytes"]
    for key in ("planned", "moved", "lower_bound"):
        lines.append(f"| {key} | {b[key]:,} |")
    lines.append(
        f"\nOverlap PVIs moved: {b['moved_overlap_pvis']} (planned {b['planned_overlap_pvis']}; "
        f"exactly the planned set: {b['overlap_pvis_as_planned']}). Nominal PVI size; the demo's "
        f"mock files moved {b['mock_bytes_moved']:,} bytes in all."
    )
    if data.get("plan_revision"):
        lines.append(
            f"After plan revision {data['plan_revision']} the planned set is the revision's; "
            "the lost site's PVIs that its new owners staged from the hub are not in it (a "
            "plan homes each visit at one site), so they count as unplanned."
        )

    def changes(moved: dict[str, dict[str, str]]) -> str:
        return ", ".join(f"{k} ({c['from']} -> {c['to']})" for k, c in moved.items()) or "none"

    for rev in data.get("revisions", []):
        m, b = rev["measured"], rev["bytes"]
        lines += [
            "",
            f"## Plan revision {rev['revision']}: without {', '.join(rev['without'])}",
            "",
            f"Why: {rev['reason']}. Tracts re-assigned: "
            + changes(rev["moved"]["tracts"])
            + "; visits re-homed: "
            + changes(rev["moved"]["visits"])
            + ".",
            f"Kept (published before the loss): {', '.join(rev['kept']) or 'nothing'}.",
            "",
            "| | figure |",
            "|---|---|",
            f"| groups redone at the other sites | {m['done']} of {m['groups']} done |",
            f"| files the failover moved (staged for redone groups) | {m['staged_files']:,} |",
            f"| bytes the failover moved (mock files) | {m['staged_bytes']:,} |",
            f"| overlap PVI bytes planned, first plan | {b['first_plan_planned']:,} |",
            f"| overlap PVI bytes planned, this revision | {b['planned']:,} |",
            f"| raw bytes planned at most (nominal) | {b['raws_at_most']:,} |",
            f"| wall time from the re-plan to the campaign's end | {m['finish_s']} s |",
        ]  # fmt: skip
        if rev.get("retired"):
            r = rev["retired"]
            lines.append(
                f"\nOpen runs of the lost site: cancelled {len(r.get('cancelled', []))}, "
                f"unanswered {len(r.get('unanswered', []))}."
            )
    for t in tests:
        lines += ["", f"## {t.name}: {'PASS' if t.passed else 'FAIL'}", "", t.detail, ""]
        lines.append("```json")
        lines.append(json.dumps(t.figures, indent=1, sort_keys=True, default=str))
        lines.append("```")
    lines += ["", "## Pictures", ""]
    lines += [f"![{f}]({f})" for f in files]
    return "\n".join(lines) + "\n"


def write_milestone(run: Any, verification: Any, out_dir: str | Path) -> MilestoneResult:
    """Measure the five tests and write ``milestone.md``, ``milestone.json`` and the PNGs.

    Parameters
    ----------
    run : `drp_campaign.campaign.CampaignRun`
        The campaign (its ledger, catalog and repositories are read).
    verification : `drp_campaign.verify.Verification` or `None`
        The comparison with the single-site reference (`None`: not verified, which fails).
    out_dir : `str` or `pathlib.Path`
        Report directory.

    Returns
    -------
    result : `MilestoneResult`
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cores = len(run.client.scheduler_info().get("workers", {})) or 1
    tests = [
        _raw_distribution(run),
        _graph_distribution(run),
        *_output_tests(run),
        _rate(run, cores),
    ]
    bytes_figures, matrix = _bytes(run)
    rate = tests[4].figures
    data: dict[str, Any] = {
        "campaign": run.spec.campaign,
        "tests": [t.as_json() for t in tests],
        "equal_to_single_site": bool(verification is not None and verification.equal),
        "verification": verification.summary() if verification is not None else "not run",
        "missing": len(verification.missing) if verification is not None else None,
        "duplicated": len(verification.duplicated) if verification is not None else None,
        "bytes": bytes_figures,
        "rate": {"visits_per_hour": rate["visits_per_hour"], "quanta_per_s": rate["quanta_per_s"]},
        "transfer_matrix": {f"{s}->{d}": b for (s, d), b in sorted(matrix.items())},
        "plan_revision": run.revision.number,
        "revisions": _revisions(run),
    }
    files = _plots(run, out, matrix)
    markdown = _markdown(run, data, tests, files)
    md_path, json_path = out / "milestone.md", out / "milestone.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    tests_passed = all(t.passed for t in tests)
    passed = tests_passed and data["equal_to_single_site"]
    return MilestoneResult(md_path, json_path, passed, markdown, data, tests_passed)
