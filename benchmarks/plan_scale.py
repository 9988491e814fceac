"""Planning at scale: wall time, detector-patch pairs per second and peak memory.

Runs the whole plan (overlaps, partition, assignment, transfers, every parquet file; no PNGs) for
LSSTCam visits from the ``dr1`` preset, N = 1,000 / 10,000 / 100,000 with 1 and 2 Dask workers,
each in a fresh subprocess whose process tree's RSS is sampled; then the brute-force baseline
(every detector polygon against every patch of its candidate tracts with sphgeom, no index) on a
few visits, for the pairs-per-second ratio. Prints the figures and writes JSON:

    runs: [{visits, workers, wall_s, pairs, pairs_per_s, peak_rss_mb}]
    baseline: [{visits, wall_s, pairs_per_s}]
    dr1_extrapolated_s: the DR1 load (35.6 M detector-visits) at the best measured rate

With ``--registry`` it measures planning from a registry instead (``survey: {butler: REPO}``):
a SQLite registry is seeded through daf_butler with N synthetic visits of "BenchCam", a camera the
project has no focal-plane model of: 9 detectors per visit by default (LSSTComCam's count, so
100,000 visits seed in minutes; LSSTCam has 189), ``--registry-detectors D`` for another count,
each detector an irregular 5-sided polygon on a square grid 0.45 deg apart; visit positions, ids
and bands from the ``dr1`` preset; no exposures, so positions come from the visit regions. It is
then planned with 1 worker, each step in a fresh subprocess whose RSS is sampled, and then read
once more alone, every stored region in the planner's pages. N = 1,000 / 10,000 with ``--quick``,
1,000 / 100,000 otherwise, or ``--registry-visits N``. Seeding is timed but is not the measured
figure. JSON (the largest N at the top level, every N under ``registry_runs``):

    registry_visits, registry_detectors_per_visit, registry_regions, registry_pairs,
    registry_seed_s, registry_seed_peak_rss_mb,
    registry_plan_s, registry_regions_per_s (planned), registry_peak_rss_mb (the plan),
    registry_read_s, registry_read_regions_per_s (reading alone), registry_db_mb

Usage: python benchmarks/plan_scale.py [--quick] [--out FILE]
       [--registry [--registry-visits N] [--registry-detectors D]]
"""

from __future__ import annotations

import argparse
import json
import math
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


#: The benchmark camera, its filters and its default detector count (LSSTComCam's).
_BENCH_CAMERA = "BenchCam"
_BENCH_FILTERS = {f"{b}_bench": b for b in "ugrizy"}
_BENCH_DETECTORS = 9
#: Detector centres are on a square grid this far apart (degrees); each pentagon's radius.
_BENCH_PITCH = 0.45
_BENCH_RADIUS = 0.2
_SEED_BATCH = 5_000


def _bench_centres(detectors: int) -> list[tuple[float, float]]:
    """Detector centres (degrees from the boresight): the first ``detectors`` cells of a grid."""
    side = math.isqrt(detectors - 1) + 1
    half = (side - 1) / 2
    cells = [(i % side - half, i // side - half) for i in range(detectors)]
    return [(_BENCH_PITCH * x, _BENCH_PITCH * y) for x, y in cells]


def _bench_polygons(
    ra: float, dec: float, rotation: float, centres: list[tuple[float, float]]
) -> list[Any]:
    """Irregular pentagons around the boresight, rotated: no model of ours makes these."""
    import numpy as np
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    angles = np.radians(rotation + np.array([0.0, 80.0, 150.0, 220.0, 290.0]))
    cos_dec = max(np.cos(np.radians(dec)), 1e-3)
    c, s = np.cos(np.radians(rotation)), np.sin(np.radians(rotation))
    out = []
    for dx, dy in centres:
        cx, cy = c * dx - s * dy, s * dx + c * dy
        out.append(
            ConvexPolygon(
                [
                    UnitVector3d(
                        LonLat.fromDegrees(
                            ra + (cx + _BENCH_RADIUS * np.cos(a)) / cos_dec,
                            dec + cy + _BENCH_RADIUS * np.sin(a),
                        )
                    )
                    for a in angles
                ]
            )
        )
    return out


def _child_registry_seed(visits: int, detectors: int, repo: str) -> None:
    """Seed a SQLite registry with ``visits`` BenchCam visits; print the figures as JSON."""
    from lsst.daf.butler import Butler

    from drp_campaign.backends.registry_survey import (
        register_instrument_records,
        register_visit_regions,
    )
    from drp_campaign.model.survey import make_survey

    table = make_survey("dr1", seed=1, visits=visits)
    t0 = time.perf_counter()
    Butler.makeRepo(repo)
    names = {b: name for name, b in _BENCH_FILTERS.items()}
    centres = _bench_centres(detectors)
    n_regions = 0
    with Butler.from_config(repo, writeable=True) as butler:
        register_instrument_records(butler, _BENCH_CAMERA, _BENCH_FILTERS, range(detectors))
        rows = list(table.itertuples(index=False))
        for start in range(0, len(rows), _SEED_BATCH):
            batch = []
            for row in rows[start : start + _SEED_BATCH]:
                polys = _bench_polygons(float(row.ra), float(row.dec), float(row.rotation), centres)
                batch.append((int(row.visit), names[str(row.band)], list(enumerate(polys))))
                n_regions += len(polys)
            register_visit_regions(butler, _BENCH_CAMERA, batch)
    wall = time.perf_counter() - t0
    print(json.dumps({"seed_s": wall, "regions": n_regions}))


def _registry_spec(directory: Path, repo: str) -> Path:
    text = SPEC.read_text()
    for old, new in (
        ("instrument: LSSTCam ", f"instrument: {_BENCH_CAMERA} "),
        ("{preset: dr1, seed: 1, visits: 240000}", f"{{butler: {repo}}}"),
        ("yaml: pipelines/", f"yaml: {ROOT}/pipelines/"),
    ):
        if old not in text:  # the DR1 spec changed shape: fail loudly, not on another spec
            raise RuntimeError(f"{SPEC} no longer contains {old!r}")
        text = text.replace(old, new)
    path = directory / "registry-spec.yaml"
    path.write_text(text)
    return path


def _child_registry_plan(repo: str, out_dir: str, workers: int) -> None:
    """Plan from the registry in this process; print the figures as JSON."""
    from drp_campaign.model.spec import load_spec
    from drp_campaign.planner import run_plan

    spec = load_spec(_registry_spec(Path(out_dir), repo))
    t0 = time.perf_counter()
    result = run_plan(spec, Path(out_dir) / "plan", workers=workers, plots=False)
    wall = time.perf_counter() - t0
    counts = result.summary["counts"]
    print(
        json.dumps(
            {
                "wall_s": wall,
                "visits": counts["visits"],
                "regions": counts["visit_detectors"],
                "pairs": counts["overlaps"],
            }
        )
    )


def _child_registry_read(repo: str) -> None:
    """Read every stored region once, in the planner's pages; print the figures as JSON."""
    from lsst.daf.butler import Butler

    from drp_campaign.backends.registry_survey import iter_detector_regions

    with Butler.from_config(repo, writeable=False) as butler:
        visits = [int(r.id) for r in butler.query_dimension_records("visit", limit=None)]
    t0 = time.perf_counter()
    n = sum(len(page) for page in iter_detector_regions(repo, _BENCH_CAMERA, visits))
    print(json.dumps({"read_s": time.perf_counter() - t0, "regions": n}))


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _sampled(args: list[str], what: str) -> tuple[dict[str, Any], int]:
    """Run ``plan_scale.py ARGS`` in a subprocess; its last JSON line and peak tree RSS (bytes)."""
    cmd = [sys.executable, __file__, *args]
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
        raise RuntimeError(f"{what} failed")
    return json.loads(out.strip().splitlines()[-1]), peak


def measure(visits: int, workers: int) -> dict[str, Any]:
    """Run one configuration in a subprocess, sampling its process tree's RSS."""
    with tempfile.TemporaryDirectory(prefix="plan-bench-") as tmp:
        fig, peak = _sampled(
            ["--child", str(visits), str(workers), tmp],
            f"plan of {visits} visits with {workers} workers",
        )
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


def measure_registry(visits: int, detectors: int, workers: int = 1) -> dict[str, Any]:
    """Seed a registry with ``visits`` visits, plan from it, read it; each in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="plan-bench-registry-") as tmp:
        repo = str(Path(tmp) / "repo")
        seed, seed_peak = _sampled(
            ["--child-registry-seed", str(visits), str(detectors), repo], f"seeding {visits} visits"
        )
        db_mb = sum(p.stat().st_size for p in Path(repo).rglob("*.sqlite3*")) / 2**20
        plan, peak = _sampled(
            ["--child-registry-plan", repo, tmp, str(workers)], f"registry plan of {visits}"
        )
        read, _ = _sampled(["--child-registry-read", repo], f"registry read of {visits}")
    if not plan["regions"] == seed["regions"] == read["regions"]:
        raise RuntimeError(f"regions seeded, planned, read differ: {seed}, {plan}, {read}")
    return {
        "registry_visits": plan["visits"],
        "registry_detectors_per_visit": detectors,
        "registry_workers": workers,
        "registry_regions": plan["regions"],
        "registry_pairs": plan["pairs"],
        "registry_db_mb": round(db_mb, 1),
        "registry_seed_s": round(seed["seed_s"], 3),
        "registry_seed_peak_rss_mb": round(seed_peak / 2**20, 1),
        "registry_plan_s": round(plan["wall_s"], 3),
        "registry_regions_per_s": round(plan["regions"] / plan["wall_s"], 1),
        "registry_peak_rss_mb": round(peak / 2**20, 1),
        "registry_read_s": round(read["read_s"], 3),
        "registry_read_regions_per_s": round(read["regions"] / read["read_s"], 1),
    }


def main_registry(args: argparse.Namespace) -> None:
    """The ``--registry`` case: figures per N, the largest N at the top level of the JSON."""
    if args.registry_visits:
        sizes = [args.registry_visits]
    else:
        sizes = [1_000, 10_000] if args.quick else [1_000, 100_000]
    print(
        f"BenchCam: {args.registry_detectors} detectors per visit (LSSTCam has 189), "
        "5-sided regions, SQLite registry; seeding is timed but not the measured figure",
        flush=True,
    )
    runs = []
    for n in sizes:
        r = measure_registry(n, args.registry_detectors)
        runs.append(r)
        print(
            f"registry visits={n:>7,}: seed {r['registry_seed_s']:7.1f} s "
            f"({r['registry_db_mb']:,.0f} MB SQLite), plan {r['registry_plan_s']:7.1f} s for "
            f"{r['registry_regions']:,} regions = {r['registry_regions_per_s']:,.0f} regions/s, "
            f"peak RSS {r['registry_peak_rss_mb']:,.0f} MB; read alone "
            f"{r['registry_read_regions_per_s']:,.0f} regions/s",
            flush=True,
        )
    largest = max(runs, key=lambda r: r["registry_visits"])
    result = {**largest, "registry_runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    """Command-line entry point."""
    children = {
        "--child": lambda a: _child(int(a[0]), int(a[1]), a[2]),
        "--child-registry-seed": lambda a: _child_registry_seed(int(a[0]), int(a[1]), a[2]),
        "--child-registry-plan": lambda a: _child_registry_plan(a[0], a[1], int(a[2])),
        "--child-registry-read": lambda a: _child_registry_read(a[0]),
    }
    if len(sys.argv) > 1 and sys.argv[1] in children:
        children[sys.argv[1]](sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1,000 and 10,000 only (< 3 min)")
    ap.add_argument(
        "--registry",
        action="store_true",
        help="plan from a seeded SQLite registry instead (see the module docstring)",
    )
    ap.add_argument("--registry-visits", type=int, help="with --registry: this N only")
    ap.add_argument(
        "--registry-detectors",
        type=int,
        default=_BENCH_DETECTORS,
        help=f"with --registry: detectors per visit (default {_BENCH_DETECTORS})",
    )
    ap.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    args = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    if args.registry:
        args.out = args.out or results / "plan_scale_registry.json"
        main_registry(args)
        return
    args.out = args.out or results / "plan_scale.json"
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
