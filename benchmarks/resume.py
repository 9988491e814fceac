"""Crash and resume: the campaign SIGKILLed at 20 points, rerun each time, then verified.

The plain driver (``drp-campaign run SPEC --no-prefect --no-verify``) runs the demo spec
(``deployments/campaigns/dc2-test-med-1-demo.yaml``: LSSTComCam, 3 sites, 5 steps) with 6 visits
(4 with ``--quick``) in a fresh work directory; each run is SIGKILLed (its whole process group:
the driver, its Dask workers, its transfer threads; no cleanup) at the next kill point, then
rerun, until every kill point is passed; a last run goes to the end.

Kill points are deterministic: the campaign's progress is counted in ledger stage transitions (a
stage counts once when it starts and once more when it is done, so the count only grows across
restarts), and the k-th of N kills is due once the count reaches ``k / (N + 2)`` of the whole
campaign's (known from an uninterrupted run of the same spec, or estimated from the spec with
``--quick``), then a seeded random delay of 0-5 s more (so that kills land inside stages, not
only on their boundaries) unless the count gets half a stride further first. A kill point is
never at or below the progress a run starts from: every run advances.

Then ``drp-campaign run SPEC --no-prefect`` (with verification) runs once more: everything is
done, so it runs only the single-site reference, the comparison and the milestone report.

Figures (JSON keys): ``kills`` (that happened), ``equal_to_single_site``, ``missing``,
``duplicated`` (from ``milestone.json``), ``duplicate_rules`` (catalog rules with the same DID and
RSE expression), ``resumed_stage_attempts`` (stages that needed more than one attempt),
``wall_s`` (the killed and resumed runs, end to end, verification excluded),
``uninterrupted_wall_s`` (the same campaign without kills; not with ``--quick`` unless
``--uninterrupted``); detail: each kill's progress and the stages it interrupted, duplicate
submissions and RUN collections, every stage done, the load average before and after.

A resumed run that makes no ledger progress for ``--stall-s`` seconds while a transfer stage
(``distribute``, ``stage``, ``arrive``) runs is stopped and reported with the catalog's request
states (``select state, count(*) from requests group by state``) and who claimed the ACTIVE ones;
the work directory is kept. The benchmark exits 1 when a check fails.

Usage: python benchmarks/resume.py [--quick] [--kills N] [--seed S] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _campaign import (
    CLI,
    ROOT,
    LedgerRow,
    demo_spec,
    ledger_rows,
    load_average,
    rounded,
    seed_repos,
)

from drp_campaign.ledger import pid_alive

CORES = os.cpu_count() or 1
# Stages that wait for the embedded catalog's transfers: where a lost claim would stall a run.
TRANSFER_STAGES = frozenset({"distribute", "stage", "arrive"})
# Stages of one (step, site), in order (drp_campaign.campaign.CampaignRun.run_site_step).
SITE_STEP_STAGES = 6

# ----------------------------------------------------------------------------------------------
# Helpers


def progress(rows: Sequence[LedgerRow]) -> int:
    """Stage transitions so far: one when a stage first starts, one more once it is done."""
    return sum(2 if r[3] in ("DONE", "SKIPPED") else 1 for r in rows)


def expected_progress(spec_path: Path) -> int:
    """A whole campaign's `progress` if no site-step is skipped (an upper bound)."""
    from drp_campaign.model.spec import load_spec

    spec = load_spec(spec_path)
    n_sites = len(spec.site_names)
    site_steps = sum(
        1 if s.placement == "gather" or s.shard == "none" else n_sites for s in spec.steps
    )
    stages = 1 + n_sites + 1 + SITE_STEP_STAGES * site_steps  # plan, setup, distribute, steps
    return 2 * stages


def _running(rows: Sequence[LedgerRow]) -> list[str]:
    return [f"{r[0]}/{r[1]}/{r[2]}" for r in rows if r[3] == "RUNNING"]


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def catalog_requests(workdir: Path) -> dict[str, Any]:
    """The embedded catalog's transfer requests by state, and who holds the ACTIVE ones."""
    path = workdir / "catalog" / "catalog.sqlite3"
    if not path.exists():
        return {"catalog": f"no {path}"}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as c:
        states = dict(c.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())
        owners = c.execute(
            "SELECT claimed_by, COUNT(*), MIN(claimed_at) FROM requests WHERE state='ACTIVE' "
            "GROUP BY claimed_by"
        ).fetchall()
    claims = [
        {
            "claimed_by": owner,
            "requests": n,
            "claimed_s_ago": round(time.time() - since, 1) if since else None,
            "owner_alive": bool(owner) and pid_alive(int(str(owner).split(":")[1])),
        }
        for owner, n, since in owners
    ]
    return {"catalog": str(path), "requests_by_state": states, "active_claims": claims}


# ----------------------------------------------------------------------------------------------
# One run of the driver


@dataclass
class Outcome:
    """How one ``drp-campaign`` process ended."""

    rc: int
    wall_s: float
    killed: bool = False
    progress: int = 0  # at the kill
    interrupted: list[str] = field(default_factory=list)  # stages RUNNING when killed
    stalled: dict[str, Any] | None = None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's process group and wait until every member is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # The Dask workers die with the driver, but not at the same instant: a rerun must not
    # start beside them (a worker still holding a graph or a file handle is not a clean crash).
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def run_once(
    args: list[str],
    workdir: Path,
    log: Path,
    *,
    kill_at: int | None = None,
    delay: float = 0.0,
    kill_by: int | None = None,
    stall_s: float = 240.0,
    timeout_s: float = 1800.0,
) -> Outcome:
    """Run ``drp-campaign ARGS``; SIGKILL it ``delay`` s after progress reaches ``kill_at``.

    Or as soon as progress reaches ``kill_by``, if the delay has not passed by then.

    The run is also stopped (and `Outcome.stalled` says why, with the catalog's requests) when
    its ledger does not change for ``stall_s`` seconds while a transfer stage runs, or after
    ``timeout_s``.
    """
    t0 = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ drp-campaign {shlex.join(args)}\n")
        out.flush()
        proc = subprocess.Popen(
            [*CLI, *args], cwd=ROOT, stdout=out, stderr=out, start_new_session=True
        )
    try:
        reached: float | None = None
        last: tuple[tuple[str, str, str, str, int], ...] = ()
        changed = t0
        while proc.poll() is None:
            time.sleep(0.1)
            now = time.monotonic()
            rows = ledger_rows(workdir)
            signature = tuple((r[0], r[1], r[2], r[3], r[6]) for r in rows)
            if signature != last:
                last, changed = signature, now
            done = progress(rows)
            if kill_at is not None and reached is None and done >= kill_at:
                reached = now
            overshot = kill_by is not None and done >= kill_by
            if reached is not None and (now - reached >= delay or overshot):
                _kill(proc)
                # Read after the kill: exactly the stages the crash interrupted.
                after = ledger_rows(workdir)
                return Outcome(-9, now - t0, True, progress(after), _running(after))
            running = _running(rows)
            stalled = now - changed > stall_s and any(
                r.rsplit("/", 1)[1] in TRANSFER_STAGES for r in running
            )
            if stalled or now - t0 > timeout_s:
                why = (
                    f"no ledger change for {now - changed:.0f} s in a transfer stage"
                    if stalled
                    else f"still running after {timeout_s:.0f} s"
                )
                # Diagnose before the kill: the claims are the live process's.
                report = {"why": why, "running": running, **catalog_requests(workdir)}
                _kill(proc)
                return Outcome(-9, now - t0, progress=progress(rows), stalled=report)
    except BaseException:
        _kill(proc)
        raise
    return Outcome(proc.returncode, time.monotonic() - t0)


# ----------------------------------------------------------------------------------------------
# Checks after the campaign


def _hub_runs(spec_path: Path, workdir: Path) -> dict[str, Any]:
    """Duplicate entries in the hub's output chain, and RUNs there beyond one per site-step."""
    from drp_campaign.backends.butler import open_repo, site_repo_root
    from drp_campaign.campaign import campaign_output
    from drp_campaign.ledger import Ledger
    from drp_campaign.model.spec import load_spec

    spec = load_spec(spec_path)
    with open_repo(site_repo_root(workdir, spec.hub), writeable=False) as butler:
        chain = list(butler.collections.get_info(campaign_output(spec.campaign)).children)
        runs = set(butler.collections.query(f"{spec.campaign}/*/*/run*"))
    expected = {
        f"{spec.campaign}/{r.step}/{r.site}/run"
        for r in Ledger(workdir / "ledger.sqlite").records()
        if r.stage == "publish" and int(r.figures.get("files", 0)) > 0
    }
    return {
        "duplicate_chain_entries": len(chain) - len(set(chain)),
        "unexpected_runs": sorted(runs - expected),
        "missing_runs": sorted(expected - runs),
    }


def checks(spec_path: Path, workdir: Path) -> dict[str, Any]:
    """What the resumed campaign left: the report's comparison, rules, submissions, runs."""
    from drp_campaign.backends.local.catalog import EmbeddedCatalog

    report = json.loads((workdir / "report" / "milestone.json").read_text())
    rows = ledger_rows(workdir)
    rules = EmbeddedCatalog(workdir / "catalog").list_rules()
    # The local executor keeps one state file per submission; its run id is deterministic, so
    # a site-step submitted twice would show as two files or as a file per attempt.
    states = sorted((workdir / "workload").glob("*/*.json"))
    submits = sum(1 for r in rows if r[2] == "submit" and r[3] == "DONE")
    return {
        "equal_to_single_site": bool(report["equal_to_single_site"]),
        "missing": report["missing"],
        "duplicated": report["duplicated"],
        "verification": report["verification"],
        "tests_passed": all(t["status"] == "PASS" for t in report["tests"]),
        "tests_failed": [t["name"] for t in report["tests"] if t["status"] != "PASS"],
        "duplicate_rules": len(rules) - len({(r.did, r.rse_expression) for r in rules}),
        "rules_not_ok": sum(1 for r in rules if r.state.value != "OK"),
        "duplicate_submissions": len(states) - submits,
        "resumed_stage_attempts": sum(1 for r in rows if r[6] > 1),
        "extra_attempts": sum(r[6] - 1 for r in rows if r[6] > 1),
        "resumed_stages": [f"{r[0]}/{r[1]}/{r[2]} x{r[6]}" for r in rows if r[6] > 1],
        "stages_not_done": [
            f"{r[0]}/{r[1]}/{r[2]}" for r in rows if r[3] not in ("DONE", "SKIPPED")
        ],
        **_hub_runs(spec_path, workdir),
    }


# ----------------------------------------------------------------------------------------------
# The benchmark


class Aborted(RuntimeError):
    """A run failed or stalled: the benchmark stops, and ``report`` says where and why."""

    def __init__(self, what: str, report: Mapping[str, Any]) -> None:
        self.report = {"run": what, **report}
        super().__init__(f"{what}: {report.get('why', '')}")


def _failed_stages(workdir: Path) -> list[dict[str, Any]]:
    path = workdir / "ledger.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as c:
        rows = c.execute(
            "SELECT step, site, stage, attempts, error FROM stages WHERE state='FAILED'"
        ).fetchall()
    return [
        {"stage": f"{st}/{si}/{sg}", "attempts": a, "error": (e or "")[:600]}
        for st, si, sg, a, e in rows
    ]


def _check_run(out: Outcome, workdir: Path, log: Path, what: str) -> int:
    """Raise `Aborted` unless a run that exited on its own completed the campaign.

    Exit 1 with every stage done means that the campaign completed and the milestone report
    has a failing test: not fatal here, the report is judged after the verification run.

    Returns
    -------
    rc : `int`
        The run's exit code (0 or 1).
    """
    if out.stalled:
        raise Aborted(what, out.stalled)
    rows = ledger_rows(workdir)
    complete = bool(rows) and all(r[3] in ("DONE", "SKIPPED") for r in rows)
    if out.rc == 0 or (out.rc == 1 and complete):
        return out.rc
    tail = log.read_text(errors="replace").splitlines()[-15:]
    raise Aborted(
        what,
        {
            "why": f"exit {out.rc}",
            "failed_stages": _failed_stages(workdir),
            "log": str(log),
            "log_tail": tail,
        },
    )


def measure(
    figures: dict[str, Any],
    *,
    visits: int,
    kills: int,
    seed: int,
    uninterrupted: bool,
    max_delay: float,
    stall_s: float,
    timeout_s: float,
    base: Path,
) -> None:
    """Kill and resume the campaign in ``base/work``, verify it; fill ``figures`` as it goes.

    ``figures`` holds what was measured so far if a run fails or stalls (`Aborted`).
    """
    spec = demo_spec(base, visits)
    log = base / "driver.log"

    def run(
        work: Path, what: str, kill_at: int | None = None, delay: float = 0.0, cap: int = 0
    ) -> Outcome:
        verify = what == "verification"
        args = ["run", str(spec), "--workdir", str(work), "--no-prefect"]
        out = run_once(
            args if verify else [*args, "--no-verify"],
            work,
            log,
            kill_at=kill_at,
            delay=delay,
            kill_by=kill_at + cap if kill_at is not None else None,
            stall_s=stall_s,
            timeout_s=timeout_s,
        )
        if out.stalled:
            raise Aborted(what, out.stalled)
        return out

    if uninterrupted:
        # First, so that the kill points can be spread over the whole campaign's progress.
        fresh = base / "fresh"
        seed_repos(spec, fresh)
        out = run(fresh, "uninterrupted run")
        _check_run(out, fresh, log, "uninterrupted run")
        total = progress(ledger_rows(fresh))
        figures.update(uninterrupted_wall_s=out.wall_s, progress_total=total)
        print(f"uninterrupted run: {out.wall_s:.1f} s, {total} stage transitions", flush=True)
    else:
        # Site-steps with nothing to do are skipped after one stage: keep clear of the end.
        total = int(0.85 * expected_progress(spec))
        figures["progress_total_estimate"] = total
    rng = random.Random(seed)
    # Kill k is due at k strides; a delay may not carry a run more than half a stride beyond
    # (during a delay a resumed run can race through many short stages), so the kills stay
    # spread and the last falls short of the end: kills + 2 strides in the whole campaign.
    stride = total / (kills + 2)
    cap = max(1, int(stride / 2))
    # Every delay is drawn up front: the same kill points whatever the runs do.
    points = [(math.ceil(k * stride), rng.uniform(0.0, max_delay)) for k in range(1, kills + 1)]

    work = base / "work"
    seed_repos(spec, work)
    kill_log: list[dict[str, Any]] = []
    figures.update(kills=0, runs=0, kill_points=kill_log)
    t0 = time.monotonic()
    for target, delay in points:
        # Never at or below where this run starts: each run must get further than the last.
        start = progress(ledger_rows(work))
        kill_at = max(target, start + 1)
        what = f"run {figures['runs'] + 1} (resumed at progress {start})"
        out = run(work, what, kill_at, delay, cap)
        figures["runs"] += 1
        if not out.killed:  # the campaign ended before this kill point
            final_rc = _check_run(out, work, log, what)
            break
        kill_log.append(
            {
                "kill_at": kill_at,
                "delay_s": round(delay, 2),
                "progress": out.progress,
                "interrupted": out.interrupted,
                "run_s": round(out.wall_s, 1),
            }
        )
        figures["kills"] = len(kill_log)
        print(
            f"kill {len(kill_log):>2}: progress {out.progress:>3} (due at {kill_at} "
            f"+ {delay:.1f} s) after {out.wall_s:5.1f} s, interrupted "
            f"{', '.join(out.interrupted) or 'nothing (between stages)'}",
            flush=True,
        )
    else:
        what = f"run {figures['runs'] + 1} (the last, not killed)"
        out = run(work, what)
        figures["runs"] += 1
        final_rc = _check_run(out, work, log, what)
    wall = time.monotonic() - t0
    figures.update(wall_s=wall, final_run_rc=final_rc)
    if "uninterrupted_wall_s" in figures:
        figures["wall_over_uninterrupted"] = wall / figures["uninterrupted_wall_s"]
    print(
        f"campaign done after {figures['runs']} runs and {len(kill_log)} kills in {wall:.1f} s",
        flush=True,
    )

    # Everything is done: this runs only the single-site reference, the comparison and report.
    out = run(work, "verification")
    if out.rc not in (0, 1):  # 1: the report has a failure, judged below; else it crashed
        _check_run(out, work, log, "verification")
    print(f"verification run: exit {out.rc} in {out.wall_s:.1f} s", flush=True)
    figures.update(verification_rc=out.rc, verification_wall_s=out.wall_s, **checks(spec, work))


def failures(fig: Mapping[str, Any]) -> list[str]:
    """The checks that failed, in words."""
    bad = []
    if fig["kills"] < fig["kills_requested"]:
        bad.append(f"only {fig['kills']} of {fig['kills_requested']} kills happened")
    if not fig["equal_to_single_site"]:
        bad.append(f"not equal to the single-site run: {fig['verification']}")
    for key in ("missing", "duplicated", "duplicate_rules", "rules_not_ok"):
        if fig[key]:
            bad.append(f"{key}: {fig[key]}")
    for key in ("duplicate_submissions", "duplicate_chain_entries"):
        if fig[key]:
            bad.append(f"{key}: {fig[key]}")
    for key in ("unexpected_runs", "missing_runs", "stages_not_done"):
        if fig[key]:
            bad.append(f"{key}: {', '.join(fig[key])}")
    # The processing-rate test divides by the ledger's first-start-to-last-end wall, which here
    # includes every restart and the machine's other work: not a property of resuming.
    failed = [t for t in fig["tests_failed"] if t != "processing rate"]
    if failed:
        bad.append(f"milestone tests failed: {', '.join(failed)}")
    if fig["kills"] and not fig["resumed_stage_attempts"]:
        bad.append("no stage needed a second attempt: the kills interrupted nothing")
    return bad


def print_table(fig: Mapping[str, Any]) -> None:
    """The figures that answer the question, one a line (those measured, if it stopped early)."""
    print(f"\n{'figure':<28} value")
    for key in (
        "visits",
        "kills",
        "runs",
        "equal_to_single_site",
        "missing",
        "duplicated",
        "duplicate_rules",
        "duplicate_submissions",
        "unexpected_runs",
        "resumed_stage_attempts",
        "extra_attempts",
        "tests_failed",
        "final_run_rc",
        "verification_rc",
        "wall_s",
        "uninterrupted_wall_s",
        "wall_over_uninterrupted",
        "verification_wall_s",
    ):
        if key in fig:
            print(f"{key:<28} {fig[key]}")
    kinds = Counter(
        s.rsplit("/", 1)[1] for k in fig.get("kill_points", []) for s in k["interrupted"]
    )
    between = sum(1 for k in fig.get("kill_points", []) if not k["interrupted"])
    print(
        "stages interrupted, by kind:",
        ", ".join(f"{k} {n}" for k, n in kinds.most_common()) or "none",
        f"(kills between stages: {between})",
    )
    load = fig["load_average"]
    print(f"load average before {load['before']:.2f}, after {load['after']:.2f} on {CORES} cores")
    if load["before"] >= 1.0 or load["after"] >= CORES + 1.0:
        print("NOTE: the machine was busy with other work: wall times are noisy")
    for line in fig.get("failures", []):
        print(f"FAILED: {line}")


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="4 visits, 5 kills, no uninterrupted run")
    ap.add_argument("--kills", type=int, default=None, help="kill points (default 20; 5 quick)")
    ap.add_argument("--visits", type=int, default=None, help="visits (default 6; 4 quick)")
    ap.add_argument("--seed", type=int, default=57, help="seed of the delays after kill points")
    ap.add_argument("--max-delay", type=float, default=5.0, help="longest delay, seconds")
    uninterrupted = ap.add_mutually_exclusive_group()
    uninterrupted.add_argument(
        "--uninterrupted", dest="uninterrupted", action="store_true", default=None,
        help="also time an uninterrupted run (default unless --quick)",
    )  # fmt: skip
    uninterrupted.add_argument("--no-uninterrupted", dest="uninterrupted", action="store_false")
    ap.add_argument("--stall-s", type=float, default=240.0, help="no progress in a transfer")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="longest single run")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "resume.json")
    args = ap.parse_args()
    kills = args.kills if args.kills is not None else 5 if args.quick else 20
    visits = args.visits if args.visits is not None else 4 if args.quick else 6
    timed = args.uninterrupted if args.uninterrupted is not None else not args.quick

    fig: dict[str, Any] = {
        "visits": visits,
        "kills_requested": kills,
        "seed": args.seed,
        "quick": args.quick,
    }
    load_before = load_average()
    base = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    keep = args.keep
    try:
        measure(
            fig,
            visits=visits,
            kills=kills,
            seed=args.seed,
            uninterrupted=timed,
            max_delay=args.max_delay,
            stall_s=args.stall_s,
            timeout_s=args.timeout_s,
            base=base,
        )
        fig["failures"] = failures(fig)
    except Aborted as exc:
        fig["aborted"] = exc.report
        fig["failures"] = [f"{exc.report['run']} failed: {exc.report.get('why')}"]
        print(f"ABORTED: {json.dumps(exc.report, indent=1)}", file=sys.stderr)
    except BaseException:
        keep = True
        raise
    finally:
        keep = keep or bool(fig.get("failures"))  # what went wrong stays there to look at
        if keep:
            print(f"work directory and log kept in {base}", file=sys.stderr)
            fig["kept"] = str(base)
        else:
            shutil.rmtree(base, ignore_errors=True)
    fig["load_average"] = {"before": load_before, "after": load_average()}
    fig = rounded(fig, 3, 1)
    print_table(fig)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fig, indent=1) + "\n")
    print(f"wrote {args.out}")
    if fig["failures"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
