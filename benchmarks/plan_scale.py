"""Planning at scale: wall time, detector-patch pairs per second and peak memory.

Runs the whole plan (overlaps, partition, assignment, transfers, every parquet file; no PNGs) for
LSSTCam visits from the ``dr1`` preset, N = 1,000 / 10,000 / 100,000 with 1 and 2 Dask workers,
each in a fresh subprocess whose process tree's RSS is sampled; then the brute-force baseline
(every detector polygon against every patch of its candidate tracts with sphgeom, no index) on a
few visits, for the pairs-per-second ratio. Prints the figures and writes JSON:

    runs: [{visits, workers, wall_s, pairs, pairs_per_s, peak_rss_mb}]
    baseline: [{visits, wall_s, pairs_per_s}]
    dr1_extrapolated_s: the DR1 load (35.6 M detector-visits) at the best measured rate

Usage: python benchmarks/plan_scale.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
DR1_DETECTOR_VISITS = 35_600_000
SPEC = ROOT / "deployments" / "campaigns" / "dr1.yaml"


def _child(visits: int, workers: int, out_dir: str) -> None:
    """Run one plan in this process and print its figures as JSON on the last line."""
    from drp_campaign.model.spec import load_spec
    from drp_campaign.model.survey import make_survey
    from drp_campaign.planner import run_plan

    spec = load_spec(SPEC)
    table = make_survey("dr1", seed=spec.survey.seed, visits=visits)
    t0 = time.perf_counter()
    result = run_plan(spec, Path(out_dir), visits=table, workers=workers, plots=False)
    wall = time.perf_counter() - t0
    pairs = result.summary["counts"]["overlaps"]
    print(json.dumps({"wall_s": wall, "pairs": pairs}))


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(visits: int, workers: int) -> dict[str, Any]:
    """Run one configuration in a subprocess, sampling its process tree's RSS."""
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        cmd = [sys.executable, __file__, "--child", str(visits), str(workers), tmp]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        ps = psutil.Process(proc.pid)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss(ps))
                stop.wait(0.1)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        out, _ = proc.communicate()
        stop.set()
        th.join()
        if proc.returncode:
            raise RuntimeError(f"plan of {visits} visits with {workers} workers failed")
        fig = json.loads(out.strip().splitlines()[-1])
    return {
        "visits": visits,
        "workers": workers,
        "wall_s": round(fig["wall_s"], 3),
        "pairs": fig["pairs"],
        "pairs_per_s": round(fig["pairs"] / fig["wall_s"], 1),
        "peak_rss_mb": round(peak / 2**20, 1),
    }


def baseline(visits: int) -> dict[str, Any]:
    """Brute force with sphgeom on the first ``visits`` visits of the preset."""
    from drp_campaign.model.focalplane import focal_plane
    from drp_campaign.model.overlaps import brute_force_overlaps
    from drp_campaign.model.sky import RingsSkyMap
    from drp_campaign.model.survey import make_survey

    table = make_survey("dr1", seed=1, visits=visits)
    sky = RingsSkyMap(num_rings=120, builder="cells")
    plane = focal_plane("LSSTCam")
    t0 = time.perf_counter()
    found = brute_force_overlaps(
        sky,
        plane,
        table["visit"].to_numpy(),
        table["ra"].to_numpy(),
        table["dec"].to_numpy(),
        table["rotation"].to_numpy(),
    )
    wall = time.perf_counter() - t0
    return {"visits": visits, "wall_s": round(wall, 3), "pairs_per_s": round(len(found) / wall, 1)}


def main() -> None:
    """Command-line entry point."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1,000 and 10,000 only (< 3 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan_scale.json")
    args = ap.parse_args()
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    runs = []
    for n in sizes:
        for w in (1, 2):
            r = measure(n, w)
            runs.append(r)
            print(
                f"plan  visits={n:>7,} workers={w}: {r['wall_s']:8.1f} s  pairs={r['pairs']:>11,}"
                f"  {r['pairs_per_s']:>11,.0f} pairs/s  peak RSS {r['peak_rss_mb']:,.0f} MB",
                flush=True,
            )
    base = [baseline(n) for n in ([5] if args.quick else [5, 20])]
    for b in base:
        print(
            f"brute force visits={b['visits']:>3}: {b['wall_s']:.1f} s, "
            f"{b['pairs_per_s']:,.0f} pairs/s",
            flush=True,
        )
    # DR1: the best measured rate in detector-visits per second, at the largest size run.
    largest = max(r["visits"] for r in runs)
    best = min((r for r in runs if r["visits"] == largest), key=lambda r: r["wall_s"])
    n_det = 189
    rate = best["visits"] * n_det / best["wall_s"]
    dr1_s = DR1_DETECTOR_VISITS / rate
    ratio = best["pairs_per_s"] / max(b["pairs_per_s"] for b in base)
    print(
        f"DR1 extrapolated: {dr1_s:,.0f} s ({dr1_s / 60:.1f} min) at {rate:,.0f} "
        f"detector-visits/s; {ratio:,.0f}x the brute-force pairs/s"
    )
    result = {
        "runs": runs,
        "baseline": base,
        "dr1_extrapolated_s": round(dr1_s, 1),
        "speedup_vs_baseline": round(ratio, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
