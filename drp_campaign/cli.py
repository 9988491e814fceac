"""The ``drp-campaign`` command."""

from __future__ import annotations

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


def _load(spec_path: Path) -> Any:
    try:
        return load_spec(spec_path)
    except SpecError as exc:
        # The message names file, key, value and fix; a traceback would only hide it.
        err_console.print(
            f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True
        )
        raise typer.Exit(EXIT_USAGE) from None


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
    from .planner import run_plan

    campaign = _load(spec)
    t0 = time.perf_counter()
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
            dask_address=dask_address,
            workers=workers,
            chunk_visits=chunk,
            progress=progress,
        )
    _print_summary(result.summary, time.perf_counter() - t0, out)


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
    console.print(f"wrote {out}/ in {seconds:.1f} s")


@app.command()
def validate(spec: Annotated[Path, typer.Argument(help="Campaign spec YAML.")]) -> None:
    """Check a campaign spec and print what it asks for."""
    campaign = _load(spec)
    console.print(
        f"{spec}: OK: campaign {campaign.campaign}, {len(campaign.sites)} sites "
        f"({', '.join(campaign.site_names)}), hub {campaign.hub}, "
        f"{len(campaign.steps)} steps ({', '.join(campaign.step_names)})"
    )


def main() -> None:
    """Entry point of the ``drp-campaign`` script."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
