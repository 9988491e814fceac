"""The ``drp-campaign`` command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .model.spec import SpecError, load_spec

app = typer.Typer(
    name="drp-campaign",
    help="Plan and run multi-site Rubin Data Release Processing campaigns.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

#: Exit code for a bad spec or bad arguments (the operator must fix an input).
EXIT_USAGE = 2


def _spec_error(exc: SpecError) -> typer.Exit:
    # The message names file, key, value and fix; a traceback would only hide it.
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(EXIT_USAGE)


def _load(spec_path: Path) -> Any:
    try:
        return load_spec(spec_path)
    except SpecError as exc:
        raise _spec_error(exc) from None


def _checked(spec_path: Path) -> tuple[Any, Any]:
    """Load the spec and check what it refers to (`drp_campaign.preflight.preflight`).

    Returns the spec and its visit table; exits 2 on any problem, before anything is written.
    """
    from .preflight import preflight

    campaign = _load(spec_path)
    try:
        return campaign, preflight(campaign, spec_path)
    except SpecError as exc:
        raise _spec_error(exc) from None


@app.callback()
def _root() -> None:
    """Plan and run multi-site Rubin Data Release Processing campaigns."""


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Campaign spec YAML.")],
    out: Annotated[Path, typer.Option("--out", help="Plan directory to write.")],
    dask_address: Annotated[
        str | None, typer.Option("--dask-address", help="Existing Dask scheduler address.")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Local Dask workers (1 = in-process).")
    ] = 1,
    chunk: Annotated[
        int | None, typer.Option("--chunk", min=1, help="Visits per Dask task (default: auto).")
    ] = None,
) -> None:
    """Plan a campaign: patch partition, visit homes, overlap PVIs, bytes per link."""
    campaign, visits = _checked(spec)
    t0 = time.perf_counter()
    try:
        result = _plan_with_progress(campaign, visits, out, dask_address, workers, chunk)
    except SpecError as exc:
        # A registry survey is read here, not at load: its repository, instrument or query can
        # still be wrong, and the operator fixes them in the spec as any other spec error.
        err_console.print(
            f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True
        )
        raise typer.Exit(EXIT_USAGE) from None
    _print_summary(result.summary, time.perf_counter() - t0, out)


def _plan_with_progress(
    campaign: Any,
    visits: Any,
    out: Path,
    dask_address: str | None,
    workers: int,
    chunk: int | None,
) -> Any:
    from .planner import run_plan

    with Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = run_plan(
            campaign,
            out,
            visits=visits,
            dask_address=dask_address,
            workers=workers,
            chunk_visits=chunk,
            progress=progress,
        )
    return result


def _gb(b: float) -> str:
    return f"{b / 1e9:,.1f} GB"


def _print_summary(s: dict[str, Any], seconds: float, out: Path) -> None:
    c = s["counts"]
    b = s["bytes"]
    table = Table(title=f"Plan of {s['campaign']} ({s['skymap']['name']}, {s['instrument']})")
    for col in ("site", "target share", "visits", "single-visit share", "coadd share", "tracts"):
        table.add_column(col, justify="right" if col != "site" else "left")
    for site, w in s["work_share"].items():
        tr = s["partition"]["tracts"][site]
        table.add_row(
            site + (" (hub)" if site == s["hub"] else ""),
            f"{w['target']:.1%}",
            f"{c['visits_per_site'][site]:,}",
            f"{w['single_visit']:.1%}",
            f"{w['coadd']:.1%}",
            f"{len(tr) if isinstance(tr, list) else tr:,}",
        )
    console.print(table)
    console.print(
        f"{c['visits']:,} visits, {c['visit_detectors']:,} PVIs, {c['overlaps']:,} detector-patch"
        f" overlaps, {c['patches']:,} patches in {c['tracts']:,} tracts; "
        f"{c['transfers']:,} PVI transfers."
    )
    console.print(
        f"bytes between sites: planned {_gb(b['planned'])}, lower bound {_gb(b['lower_bound'])}"
        f" (ratio {b['planned_over_lower_bound']:.3f}), naive round-robin "
        f"{_gb(b['naive_round_robin'])}"
    )
    for link, v in b["links"].items():
        console.print(f"  {link}: {_gb(v)}")
    if s["partition"]["note"]:
        console.print(f"[yellow]partition:[/] {s['partition']['note']}")
    t = s["targets"]
    if not t["single_visit_shares_within_5pct"]:
        console.print(
            f"[yellow]shares:[/] single-visit shares deviate by up to "
            f"{t['max_single_visit_share_deviation']:.1%} (target 5 %)"
        )
    groups = s.get("groups") or {}
    if groups:
        largest = max(groups, key=lambda key: groups[key])
        console.print(
            f"groups: {sum(groups.values()):,} in {len(groups)} site-steps (most: {largest}, "
            f"{groups[largest]}); see groups.json"
        )
    console.print(f"wrote {out}/ in {seconds:.1f} s")


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="Campaign spec YAML.")]) -> None:
    """Check a campaign spec, its visits and its pipeline, and print what it asks for."""
    campaign, visits = _checked(spec)
    console.print(
        f"{spec}: OK: campaign {campaign.campaign}, {len(visits):,} visits, "
        f"{len(campaign.sites)} sites "
        f"({', '.join(campaign.site_names)}), hub {campaign.hub}, "
        f"{len(campaign.steps)} steps ({', '.join(campaign.step_names)})"
    )


@app.command()
def preflight(
    spec: Annotated[Path, typer.Argument(help="Campaign spec YAML.")],
    workdir: Annotated[Path, typer.Option("--workdir", help="Work directory.")] = Path("demo"),
    dask_address: Annotated[
        str | None, typer.Option("--dask-address", help="The Dask scheduler the run will use.")
    ] = None,
    token_margin_hours: Annotated[
        float,
        typer.Option("--token-margin-hours", min=0, help="How long PanDA tokens must last."),
    ] = 12.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the rows to this JSON file.")
    ] = None,
) -> None:
    """Check every site before anything moves: one row per (site, check); exit 1 on a FAIL.

    Reads the sites' DataFacility Blocks from PREFECT_API_URL (none saved: the embedded
    default under WORKDIR).
    """
    from tasks.runtime import preflight_campaign

    from .model.preflight import Status

    campaign = _load(spec)
    with err_console.status(f"preflight of {campaign.campaign} ({len(campaign.sites)} sites)"):
        report = preflight_campaign(
            spec, workdir, dask_address=dask_address, token_margin_hours=token_margin_hours
        )
    colour = {Status.PASS: "green", Status.FAIL: "bold red", Status.SKIP: "yellow"}
    table = Table(title=f"Preflight of {campaign.campaign}", show_lines=False)
    for col in ("site", "check", "status", "value", "fix"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(
            c.site, c.check, f"[{colour[c.status]}]{c.status}[/]", c.value, c.fix, style=None
        )
    # Wide enough for a path and a fix per row even when piped (rich assumes 80 columns).
    out = console if console.is_terminal else Console(width=max(console.width, 200))
    out.print(table)
    out.print(report.summary(), highlight=False)
    if json_out is not None:
        json_out.write_text(json.dumps(report.rows(), indent=1) + "\n")
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def seed(
    spec: Annotated[Path, typer.Argument(help="Campaign spec YAML (a preset or CSV survey).")],
    repo: Annotated[
        Path | None, typer.Option("--repo", help="The hub repository to seed (created).")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Seed the embedded default instead: the hub at <workdir>/repos/<hub> and an "
            "empty Butler at <workdir>/repos/<site> for every other site.",
        ),
    ] = None,
    file_size: Annotated[
        int, typer.Option("--file-size", min=0, help="Bytes of each mock file (0: the default).")
    ] = 0,
    registry_db: Annotated[
        str | None,
        typer.Option("--registry-db", help="PostgreSQL URL for the registries (SQLite if not)."),
    ] = None,
) -> None:
    """Play the observatory: write the spec's visits, raws, calibrations and skymap into a hub.

    Not part of a campaign: a real hub holds these already. The campaign then runs against the
    seeded repositories exactly as against an operator's.
    """
    from .backends.butler import DEFAULT_FILE_SIZE
    from .seed import seed_embedded, seed_hub

    campaign = _load(spec)
    if (repo is None) == (workdir is None):
        err_console.print("[bold red]error:[/] give exactly one of --repo DIR or --workdir DIR")
        raise typer.Exit(EXIT_USAGE)
    if campaign.survey.is_registry:
        # The seed makes the visits the spec describes; a registry survey reads existing ones.
        err_console.print(
            f"[bold red]error:[/] {spec}: survey: its visits come from a registry "
            f"({campaign.survey.butler}), which already holds them: nothing to seed. Fix: seed "
            "from a spec whose survey is a preset or a visits CSV, then plan from the seeded "
            "hub with 'survey: {butler: <hub>}'.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_USAGE)
    size = file_size or DEFAULT_FILE_SIZE
    t0 = time.perf_counter()
    if repo is not None:
        result = seed_hub(campaign, repo.absolute(), file_size=size, registry_db=registry_db)
    else:
        assert workdir is not None
        result = seed_embedded(campaign, workdir, file_size=size, registry_db=registry_db)
    console.print(
        f"seeded {result.hub}: {result.visits} visits, {result.raws} new raws, "
        f"{result.tracts} tracts of {campaign.skymap.name} ({time.perf_counter() - t0:.1f} s)"
        + (
            "; empty site repositories: " + ", ".join(f"{s} {p}" for s, p in result.sites.items())
            if result.sites
            else ""
        )
    )


def _need_server() -> None:
    import os

    if not os.environ.get("PREFECT_API_URL"):
        err_console.print(
            "[bold red]error:[/] PREFECT_API_URL is not set. drp-campaign runs against a real "
            "Prefect server (ephemeral mode loses run records): start one with `make serve` "
            "(then `source <workdir>/prefect/env.sh`), or use `drp-campaign demo`, which starts "
            "and stops its own."
        )
        raise typer.Exit(EXIT_USAGE)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Campaign spec YAML.")],
    workdir: Annotated[Path, typer.Option("--workdir", help="Work directory.")] = Path("demo"),
    steps: Annotated[
        list[str] | None, typer.Option("--step", help="Only this step (repeatable).")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare with a single-site run.")
    ] = True,
    prefect: Annotated[
        bool,
        typer.Option(
            "--prefect/--no-prefect",
            help="Run through the Prefect flows (default), or the plain driver (embedded "
            "backends, no server: benchmarks and fault tests).",
        ),
    ] = True,
) -> None:
    """Run a whole campaign (the drp-campaign flow) on the Prefect server of PREFECT_API_URL."""
    # Checked here, before any site is set up or any raw moves; the plan stage checks again
    # for runs that do not start from this command (served deployments).
    campaign, _ = _checked(spec)
    if steps:
        unknown = sorted(set(steps) - set(campaign.step_names))
        if unknown:
            err_console.print(
                f"[bold red]error:[/] unknown step(s) {unknown}; {spec} has {campaign.step_names}"
            )
            raise typer.Exit(EXIT_USAGE)
    from .backends.repos import RepoError
    from .preflight import PreflightFailed

    try:
        if prefect:
            _need_server()
            from flows.campaign import drp_campaign_flow

            result = drp_campaign_flow(
                str(spec.absolute()), str(workdir.absolute()), steps, None, verify
            )
        else:
            result = _run_plain(campaign, workdir, steps, verify)
    except PreflightFailed as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        err_console.print("run 'drp-campaign preflight' for every row; nothing was moved")
        raise typer.Exit(1) from None
    except RepoError as exc:
        # A repository the Blocks name that is missing or lacks what the campaign reads: the
        # message names the repository, what is wrong and the fix.
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    console.print(f"report: {result['report']}")
    if not result["passed"]:
        err_console.print("[bold red]the milestone report has failures[/] (see the report)")
        raise typer.Exit(1)


def _run_plain(
    campaign: Any, workdir: Path, steps: list[str] | None, verify: bool
) -> dict[str, Any]:
    """The campaign without Prefect: the same stages, ledger and report."""
    from .backends.factory import make_campaign_run
    from .planner import dask_client
    from .report.milestone import write_milestone
    from .verify import reference_and_compare

    def say(message: str) -> None:
        err_console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", highlight=False)

    with dask_client(workers=2) as client:
        run = make_campaign_run(campaign, workdir, client, progress=say)
        run.run_all(steps)
        verification = reference_and_compare(run) if verify else None
        report = write_milestone(run, verification, workdir / "report")
    # Without verification the equality is unknown: the five tests decide.
    return {
        "report": str(report.markdown_path),
        "passed": report.passed if verify else report.tests_passed,
    }


@app.command()
def replan(
    spec: Annotated[
        Path, typer.Argument(help="Campaign spec YAML (every site, the lost one too).")
    ],
    without: Annotated[
        list[str],
        typer.Option("--without", help="The site lost for good (repeatable)."),
    ],
    workdir: Annotated[Path, typer.Option("--workdir", help="Work directory.")] = Path("demo"),
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why, for the ledger and the report.")
    ] = None,
) -> None:
    """Re-plan the campaign without a lost site: its patches and visits go to the others.

    Writes the next plan revision beside the others (<workdir>/plan-r<n>): everything the
    remaining sites own or did keeps its place; what the lost site had not published is redone
    at the new owners. Rerun the campaign (or the step) afterwards to finish on the new plan.
    """
    from .replan import ReplanError
    from .replan import replan as write_revision

    campaign = _load(spec)
    try:
        info = write_revision(campaign, workdir, list(without), reason=reason, spec_label=str(spec))
    except ReplanError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    moved = info["moved"]
    table = Table(title=f"plan revision {info['revision']}: without {', '.join(info['without'])}")
    for col in ("what", "moved"):
        table.add_column(col)
    tracts: dict[str, list[str]] = {}
    for tract, change in moved["tracts"].items():
        tracts.setdefault(f"{change['from']} -> {change['to']}", []).append(tract)
    for link, ids in tracts.items():
        table.add_row(f"tracts {link}", ", ".join(ids))
    homes: dict[str, list[str]] = {}
    for visit, change in moved["visits"].items():
        homes.setdefault(f"{change['from']} -> {change['to']}", []).append(visit)
    for link, ids in homes.items():
        table.add_row(
            f"visits {link}",
            f"{len(ids)}: " + ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else ""),
        )
    table.add_row("kept (published)", ", ".join(info["kept"]) or "none")
    table.add_row(
        "redone",
        "; ".join(f"{k} {', '.join(v)}" for k, v in info["redone_groups"].items()) or "nothing",
    )
    b = info["bytes"]
    table.add_row(
        "bytes (planned)",
        f"overlap PVIs {b['planned']:,} (first plan {b['first_plan_planned']:,}); raws at most "
        f"{b['raws_at_most']:,}; extra {b['extra']:,}",
    )
    console.print(table)
    if info["note"]:
        console.print(f"[yellow]note:[/] {info['note']}")
    console.print(
        f"wrote {workdir / ('plan-r' + str(info['revision']))}; finish the campaign with "
        f"`drp-campaign run {spec} --workdir {workdir}` (or `prefect deployment run "
        "'drp-campaign/default'`)"
    )


@app.command()
def status(
    workdir: Annotated[Path, typer.Option("--workdir", help="Work directory.")] = Path("demo"),
    step: Annotated[str | None, typer.Option("--step", help="Only this step.")] = None,
    site: Annotated[str | None, typer.Option("--site", help="Only this site.")] = None,
) -> None:
    """Print the campaign ledger: every (step, site, group, stage), its state, time, error."""
    from .ledger import Ledger

    path = workdir / "ledger.sqlite"
    if not path.exists():
        err_console.print(f"[bold red]error:[/] no ledger at {path}: nothing has run there yet")
        raise typer.Exit(EXIT_USAGE)
    ledger = Ledger(path)
    table = Table(title=f"campaign ledger ({path})")
    for col in ("step", "site", "group", "stage", "state", "seconds", "attempts", "detail"):
        table.add_column(col)
    colours = {"DONE": "green", "SKIPPED": "cyan", "RUNNING": "yellow", "FAILED": "red"}
    for r in ledger.records(step, site):
        detail = r.error or ", ".join(
            f"{k}={v}" for k, v in r.figures.items() if isinstance(v, (int, float, str))
        )
        table.add_row(
            r.step,
            r.site,
            r.group,
            r.stage,
            f"[{colours.get(r.state, 'white')}]{r.state}[/]",
            f"{r.seconds:.1f}" if r.seconds is not None else "",
            str(r.attempts),
            detail[:90],
        )
    console.print(table)
    from .replan import current_revision

    revision = current_revision(workdir)
    if revision.number:
        console.print(
            f"plan revision {revision.number} ({revision.plan_dir.name}): without "
            f"{', '.join(revision.lost)}: {revision.info.get('reason', '')}"
        )
    groups = revision.plan_dir / "groups.json"
    if groups.exists():
        console.print(_group_table(ledger, json.loads(groups.read_text()), step, site))


def _group_table(
    ledger: Any, groups: dict[str, list[Any]], step: str | None, site: str | None
) -> Table:
    """Per site-step: its planned groups and how many are done, running, failed, waiting."""
    from .ledger import StageState

    table = Table(title="groups per site-step (groups.json of the current plan)")
    for col in ("site-step", "groups", "done", "running", "failed", "waiting", "failed groups"):
        table.add_column(col)
    for key, planned in groups.items():
        step_name, _, site_name = key.partition("@")
        if (step and step_name != step) or (site and site_name != site):
            continue
        states: dict[str, set[str]] = {str(g["group"]): set() for g in planned}
        ended: dict[str, bool] = dict.fromkeys(states, False)
        for r in ledger.records(step_name, site_name):
            if r.group in states:
                states[r.group].add(r.state)
                ended[r.group] |= (r.stage == "arrive" and r.done) or r.state == StageState.SKIPPED
        failed = sorted(g for g, s in states.items() if StageState.FAILED in s and not ended[g])
        running = [
            g
            for g, s in states.items()
            if StageState.RUNNING in s and not ended[g] and g not in failed
        ]
        done = sum(ended.values())
        table.add_row(
            key,
            str(len(states)),
            str(done),
            str(len(running)),
            f"[red]{len(failed)}[/]" if failed else "0",
            str(len(states) - done - len(running) - len(failed)),
            ", ".join(failed)[:60],
        )
    return table


def _mount_subcommands() -> None:
    # The blocks commands talk to the Prefect API (the blocks package imports prefect); typer
    # needs the sub-apps at start-up, so they are imported here, not in every module.
    from blocks.cli import app as blocks_app

    from .cli_panda import app as panda_app

    app.add_typer(
        blocks_app, name="blocks", help="Prefect Blocks of the sites (settings, secrets)."
    )
    app.add_typer(panda_app, name="panda", help="PanDA: ping a site's server, report its runs.")


_mount_subcommands()


def main() -> None:
    """Entry point of the ``drp-campaign`` script."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
