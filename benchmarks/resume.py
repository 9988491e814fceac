"""Crash and resume: the campaign SIGKILLed at 20 points, rerun each time, then verified.

The plain driver (``drp-campaign run --no-prefect``) runs the campaign; each run is killed
(process group, SIGKILL: no cleanup) once the ledger shows ``stride`` more stages done than when
it started, plus a seeded random delay, so kills land inside stages of every kind. After the
last kill a run goes to the end, and a final run verifies: it runs the single-site reference
and compares (``milestone.json``). Figures: the kills that happened, stages that needed more
than one attempt, missing and duplicated products, duplicate rules, and the total wall time
against an uninterrupted run of the same campaign.

    python benchmarks/resume.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _campaign import ROOT, demo_spec, ledger_rows, load_average, run_cli  # noqa: E402


def _done(workdir: Path) -> int:
    return sum(1 for r in ledger_rows(workdir) if r[3] in ("DONE", "SKIPPED"))


def _killer(work: Path, target: int, delay: float) -> Callable[[], bool]:
    """True once ``target`` stages are done and ``delay`` seconds more have passed."""
    reached: list[float] = []

    def kill_when() -> bool:
        if not reached and _done(work) >= target:
            reached.append(time.monotonic())
        return bool(reached) and time.monotonic() - reached[0] >= delay

    return kill_when


def measure(visits: int, kills: int, stride: int, seed: int, uninterrupted: bool) -> dict[str, Any]:
    """Kill, resume, verify; return the figures."""
    from drp_campaign.backends.local.catalog import EmbeddedCatalog

    rng = random.Random(seed)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        base = Path(tmp)
        spec = demo_spec(base, visits)
        work, log = base / "work", base / "driver.log"
        args = ["run", str(spec), "--workdir", str(work), "--no-prefect", "--no-verify"]
        killed = runs = 0
        t0 = time.perf_counter()
        finished = False
        while killed < kills and not finished:
            target = _done(work) + stride
            delay = rng.choice([0.0, 0.2, 0.5, 1.0])
            rc, _, _ = run_cli(args, log, kill_when=_killer(work, target, delay))
            runs += 1
            if rc == -9:
                killed += 1
            elif rc == 0:
                finished = True
            else:
                raise SystemExit(f"a resumed run failed (rc {rc}); see {log}")
        if not finished:
            rc, _, _ = run_cli(args, log)
            runs += 1
            if rc != 0:
                raise SystemExit(f"the final run failed (rc {rc}); see {log}")
        wall = time.perf_counter() - t0
        # Verification: everything is done, so this runs only the reference and the report.
        rc, _, _ = run_cli(["run", str(spec), "--workdir", str(work), "--no-prefect"], log)
        report = json.loads((work / "report" / "milestone.json").read_text())
        rules = EmbeddedCatalog(work / "catalog").list_rules()
        with sqlite3.connect(work / "ledger.sqlite") as c:
            resumed = c.execute("SELECT COUNT(*) FROM stages WHERE attempts > 1").fetchone()[0]
        figures: dict[str, Any] = {
            "visits": visits,
            "kills": killed,
            "runs": runs,
            "stages": len(ledger_rows(work)),
            "resumed_stage_attempts": int(resumed),
            "equal_to_single_site": bool(report["equal_to_single_site"]),
            "missing": report["missing"],
            "duplicated": report["duplicated"],
            "duplicate_rules": len(rules) - len({(r.did, r.rse_expression) for r in rules}),
            "tests_passed": all(t["status"] == "PASS" for t in report["tests"]),
            "verification_rc": rc,
            "wall_s": round(wall, 1),
        }
        if uninterrupted:
            fresh = base / "fresh"
            rc, fresh_wall, _ = run_cli(
                ["run", str(spec), "--workdir", str(fresh), "--no-prefect", "--no-verify"], log
            )
            figures["uninterrupted_wall_s"] = round(fresh_wall, 1)
        figures["load_average"] = [load_before, load_average()]
        return figures


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 visits, 5 kills")
    parser.add_argument("--seed", type=int, default=57)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/resume.json")
    args = parser.parse_args()
    if args.quick:
        figures = measure(4, kills=5, stride=8, seed=args.seed, uninterrupted=False)
    else:
        figures = measure(6, kills=20, stride=4, seed=args.seed, uninterrupted=True)
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(f"wrote {args.out}")
    if not (figures["equal_to_single_site"] and figures["duplicate_rules"] == 0):
        raise SystemExit("resumed campaign differs from the single-site run")


if __name__ == "__main__":
    main()
