"""A site lost for good after step2: re-plan without it, finish, and compare (issue 13).

In a fresh work directory, the demo spec (``deployments/campaigns/dc2-test-med-1-demo.yaml``:
LSSTComCam, 8 visits, 3 sites, 5 steps; ``--visits N`` for another size) is seeded (the
observatory's part, not timed), then, on a real local Prefect server (``--no-prefect``: the
plain driver, as ``--quick`` does):

1. ``drp-campaign run SPEC --step step1 --step step2 --no-verify``: the first two steps
   everywhere, published to the hub;
2. the lost site's repository is renamed away (its storage is gone; nothing may touch it);
3. ``drp-campaign replan SPEC --without SITE`` (timed: ``replan_s``);
4. ``drp-campaign run SPEC`` (with verification and the report): the campaign finishes at the
   other sites on the new plan (timed: ``finish_s``, the process start to exit).

Figures (JSON keys), from the plan summaries and ``report/milestone.json``:

- ``first_plan_planned_bytes``: the overlap PVIs the first plan predicts (nominal bytes);
  ``revision_planned_bytes``: the same for the revision; ``raws_at_most_bytes``: raws the
  revision may need to move (nominal);
- ``failover_files``, ``failover_bytes``: what the redone groups staged (measured, the demo's
  mock files);
- ``moved_bytes``, ``planned_bytes``: the report's measured (overlap PVIs at nominal size) and
  planned bytes for the whole campaign; ``mock_bytes_moved``: every mock file it moved;
  ``moved_tracts``, ``rehomed_visits``, ``kept_groups``, ``redone_groups``;
- ``finish_s``, ``replan_s``, ``first_steps_s``; ``ledger_finish_s``: from the re-plan to the
  last campaign stage in the ledger (``finish_s`` also holds the single-site reference run,
  the comparison and the report); ``equal_to_single_site``, ``missing``,
  ``duplicated``; ``load_average`` before and after (``noisy`` when above the cores).

Usage: python benchmarks/failover.py [--quick] [--visits N] [--lost SITE] [--no-prefect]
[--keep] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _campaign import ROOT, demo_spec, load_average, log_tail, prefect_server, run_cli, seed_repos

CORES = os.cpu_count() or 1


def measure(visits: int, lost: str, prefect: bool, keep: bool) -> dict[str, Any]:
    """Run the failover campaign once; return its figures."""
    base = Path(tempfile.mkdtemp(prefix="failover-"))
    try:
        spec = demo_spec(base, visits)
        workdir = base / "work"
        seed_repos(spec, workdir)
        log = base / "campaign.log"
        load0 = load_average()
        mode = [] if prefect else ["--no-prefect"]

        def campaign(env: dict[str, str] | None) -> dict[str, Any]:
            first = run_cli(
                ["run", str(spec), "--workdir", str(workdir), "--step", "step1", "--step",
                 "step2", "--no-verify", *mode], log, env,
            )  # fmt: skip
            if first.rc not in (0, 1):
                raise RuntimeError(f"steps 1-2 failed (exit {first.rc}):\n{log_tail(log)}")
            repo = workdir / "repos" / lost
            repo.rename(repo.with_name(f"{lost}.lost"))  # its storage is gone for good
            why = f"{lost} lost after step2 (benchmark)"
            replan = run_cli(["replan", str(spec), "--workdir", str(workdir), "--without", lost,
                              "--reason", why], log, env)  # fmt: skip
            if replan.rc != 0:
                raise RuntimeError(f"replan failed (exit {replan.rc}):\n{log_tail(log)}")
            finish = run_cli(["run", str(spec), "--workdir", str(workdir), *mode], log, env)
            report = workdir / "report" / "milestone.json"
            if finish.rc not in (0, 1) or not report.exists():
                raise RuntimeError(f"the rest failed (exit {finish.rc}):\n{log_tail(log)}")
            return {
                "first_steps_s": round(first.wall_s, 1),
                "replan_s": round(replan.wall_s, 2),
                "finish_s": round(finish.wall_s, 1),
            }

        if prefect:
            with prefect_server(base / "prefect") as server:
                times = campaign(server.env)
        else:
            times = campaign(None)
        load1 = load_average()
        report = json.loads((workdir / "report" / "milestone.json").read_text())
        first = json.loads((workdir / "plan" / "summary.json").read_text())
        (revision,) = report["revisions"]
        return {
            "visits": visits,
            "lost": lost,
            "prefect": prefect,
            **times,
            "first_plan_planned_bytes": first["bytes"]["planned"],
            "revision_planned_bytes": revision["bytes"]["planned"],
            "raws_at_most_bytes": revision["bytes"]["raws_at_most"],
            "failover_files": revision["measured"]["staged_files"],
            "failover_bytes": revision["measured"]["staged_bytes"],
            "moved_bytes": report["bytes"]["moved"],
            "mock_bytes_moved": report["bytes"]["mock_bytes_moved"],
            "ledger_finish_s": revision["measured"]["finish_s"],
            "planned_bytes": report["bytes"]["planned"],
            "moved_tracts": revision["moved"]["tracts"],
            "rehomed_visits": revision["moved"]["visits"],
            "kept_groups": revision["kept"],
            "redone_groups": revision["redone_groups"],
            "equal_to_single_site": report["equal_to_single_site"],
            "missing": report["missing"],
            "duplicated": report["duplicated"],
            "tests": {t["name"]: t["status"] for t in report["tests"]},
            "load_average": {"before": load0, "after": load1},
            "noisy": max(load0, load1) > CORES,
            "workdir": str(workdir) if keep else None,
        }
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--visits", type=int, default=8, help="visits of the demo spec (8)")
    ap.add_argument("--lost", default="UKDF", help="the site lost after step2 (UKDF)")
    ap.add_argument("--quick", action="store_true", help="the plain driver, no Prefect server")
    ap.add_argument("--no-prefect", action="store_true", help="the plain driver")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "failover.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    fig = measure(args.visits, args.lost, not (args.quick or args.no_prefect), args.keep)
    fig["benchmark_s"] = round(time.perf_counter() - t0, 1)
    print(
        f"{fig['visits']} visits, {fig['lost']} lost after step2 "
        f"({'Prefect' if fig['prefect'] else 'plain driver'}):\n"
        f"  tracts moved {fig['moved_tracts']}\n  visits re-homed {fig['rehomed_visits']}\n"
        f"  kept {fig['kept_groups']}\n  redone {fig['redone_groups']}\n"
        f"  failover moved {fig['failover_files']} files, {fig['failover_bytes']:,} bytes "
        f"(mock); overlap PVIs planned: first plan {fig['first_plan_planned_bytes']:,}, "
        f"revision {fig['revision_planned_bytes']:,} (nominal)\n"
        f"  whole campaign: moved {fig['moved_bytes']:,}, planned {fig['planned_bytes']:,} "
        f"(nominal); mock files {fig['mock_bytes_moved']:,} bytes\n"
        f"  replan {fig['replan_s']} s; finish after it {fig['finish_s']} s with the reference "
        f"and report, {fig['ledger_finish_s']} s of campaign stages "
        f"(steps 1-2 before: {fig['first_steps_s']} s)\n"
        f"  equal to single site: {fig['equal_to_single_site']} (missing {fig['missing']}, "
        f"duplicated {fig['duplicated']}); tests {fig['tests']}\n"
        f"  load average {fig['load_average']['before']:.2f} -> "
        f"{fig['load_average']['after']:.2f} on {CORES} cores"
        + (" (NOISY)" if fig["noisy"] else "")
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fig, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
