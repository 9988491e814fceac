"""What the end-to-end tests check of a finished campaign's milestone report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def check_report(workdir: Path, returncode: int | None, output: str) -> dict[str, Any]:
    """Check the report of a run that ended with ``returncode`` (`None`: not a command); return it.

    The first four tests count data and must pass, and the hub must equal the single-site
    reference with nothing missing or duplicated. The fifth is a processing rate on a shared,
    loaded machine: its figures must be measured, but its verdict is not for a test to assert
    (the benchmarks measure rates); ``drp-campaign run`` exits 1 only if it failed.
    """
    path = workdir / "report" / "milestone.json"
    assert path.exists(), output[-4000:]
    report: dict[str, Any] = json.loads(path.read_text())
    tests = report["tests"]
    assert [t["status"] for t in tests[:4]] == ["PASS"] * 4, tests
    rate = tests[4]
    assert rate["name"] == "processing rate" and rate["figures"]["per_site"], rate
    if returncode is not None:
        assert returncode == (0 if rate["status"] == "PASS" else 1), output[-4000:]
    assert report["equal_to_single_site"] is True
    assert report["missing"] == 0 and report["duplicated"] == 0
    return report


def finished(workdir: Path, returncode: int) -> bool:
    """Whether ``drp-campaign run`` ended its campaign: exit 0, or 1 with only the rate failed.

    The command exits 1 when a test of the report fails; the rate's verdict depends on the load
    of the machine, the others on the data (see `check_report`).
    """
    if returncode == 0:
        return True
    path = workdir / "report" / "milestone.json"
    if returncode != 1 or not path.exists():
        return False
    failed = [t["name"] for t in json.loads(path.read_text())["tests"] if t["status"] != "PASS"]
    return failed == ["processing rate"]
