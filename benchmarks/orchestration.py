"""What Prefect costs: the demo campaign through the flows vs the plain driver on the same work.

Both runs do the same stages on the same spec in fresh work directories (``--no-verify``: the
single-site reference is the same work in both and is left out). The Prefect run goes through a
real local server (``scripts/prefect_server.py``).

- ``driver_wall_s``: the plain driver (``drp-campaign run --no-prefect``), process start to end.
- ``prefect_start_s``: Prefect's fixed start: the server's start until healthy, plus the extra
  time the Prefect run's process takes before its first stage starts (flow run creation,
  client, settings) compared with the plain driver's process.
- ``campaign_wall_s``: server start plus the Prefect run, process start to end.
- ``overhead_fraction``: ``(campaign_wall_s - prefect_start_s - driver_wall_s) / driver_wall_s``,
  Prefect's cost beyond its fixed start (target <= 5 %).
- ``prefect_tasks``, ``prefect_flows``: task and flow runs the server recorded.

    python benchmarks/orchestration.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _campaign import ROOT, demo_spec, ledger_rows, load_average, run_cli  # noqa: E402

SERVER = [sys.executable, str(ROOT / "scripts" / "prefect_server.py")]


def _first_stage_delay(workdir: Path, started: float) -> float:
    """Seconds from the process start to the first stage starting in the ledger."""
    starts = [r[4] for r in ledger_rows(workdir) if r[4] is not None]
    return min(starts) - started


def _stage_sums(workdir: Path) -> dict[str, float]:
    sums: dict[str, float] = {}
    for _, _, stage, _, started, finished in ledger_rows(workdir):
        if started is not None and finished is not None:
            sums[stage] = round(sums.get(stage, 0.0) + finished - started, 2)
    return sums


def _count(api: str, what: str) -> int:
    import httpx

    reply = httpx.post(f"{api}/{what}/count", json={}, timeout=30)
    reply.raise_for_status()
    return int(reply.json())


def measure(visits: int) -> dict[str, Any]:
    """Run the campaign both ways and return the figures."""
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        base = Path(tmp)
        spec = demo_spec(base, visits)
        plain, flows = base / "plain", base / "prefect"
        rc, driver_wall, plain_started = run_cli(
            ["run", str(spec), "--workdir", str(plain), "--no-prefect", "--no-verify"],
            base / "plain.log",
        )
        if rc != 0:
            raise SystemExit(f"plain driver failed; see {base / 'plain.log'}")
        plain_delay = _first_stage_delay(plain, plain_started)

        home = flows / "prefect"
        t0 = time.perf_counter()
        subprocess.run([*SERVER, "start", "--home", str(home)], check=True, capture_output=True)
        server_s = time.perf_counter() - t0
        try:
            env = dict(os.environ)
            api = json.loads((home / "server.json").read_text())["api_url"]
            env["PREFECT_API_URL"] = api
            rc, run_wall, prefect_started = run_cli(
                ["run", str(spec), "--workdir", str(flows), "--no-verify"],
                base / "prefect.log",
                env=env,
            )
            if rc != 0:
                raise SystemExit(f"Prefect run failed; see {base / 'prefect.log'}")
            tasks, flow_runs = _count(api, "task_runs"), _count(api, "flow_runs")
        finally:
            subprocess.run([*SERVER, "stop", "--home", str(home)], check=False)
        prefect_delay = _first_stage_delay(flows, prefect_started)
        prefect_start = server_s + max(prefect_delay - plain_delay, 0.0)
        campaign_wall = server_s + run_wall
        return {
            "visits": visits,
            "campaign_wall_s": round(campaign_wall, 2),
            "driver_wall_s": round(driver_wall, 2),
            "prefect_start_s": round(prefect_start, 2),
            "server_start_s": round(server_s, 2),
            "overhead_fraction": round(
                (campaign_wall - prefect_start - driver_wall) / driver_wall, 4
            ),
            "prefect_tasks": tasks,
            "prefect_flows": flow_runs,
            "stage_seconds_plain": _stage_sums(plain),
            "stage_seconds_prefect": _stage_sums(flows),
            "load_average": [load_before, load_average()],
        }


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 visits instead of 8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/orchestration.json")
    args = parser.parse_args()
    figures = measure(4 if args.quick else 8)
    for key in (
        "visits", "driver_wall_s", "campaign_wall_s", "server_start_s", "prefect_start_s",
        "overhead_fraction", "prefect_tasks", "prefect_flows", "load_average",
    ):  # fmt: skip
        print(f"{key:>20}: {figures[key]}")
    if max(figures["load_average"]) > 2.5:
        print("note: the machine was busy (load average above 2.5 on 2 cores): noisy timings")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1, sort_keys=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
