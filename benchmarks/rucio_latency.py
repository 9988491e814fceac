"""Rucio rule latency: from ``add_rule`` to the rule OK with every file on disk, real Rucio.

Uses the local Rucio 41.5.1 of ``scripts/rucio_local`` (PostgreSQL, server, judge and conveyor
daemons with the verifying ``local`` transfertool), started for the run in a temporary directory
and stopped afterwards, unless ``--workdir`` names one already running (then it is left running).
For each count N, in a fresh VO (an empty namespace) with two RSEs, hub and FrDF: N files of
``--size`` bytes are written at the hub, registered (with lsst-rucio-register's metadata),
attached to a dataset that is then closed. The clock starts just before ``add_rule(dataset,
FrDF)`` and stops when Rucio reports the rule OK *and* every file is at FrDF with its size and
adler32 (checked from the file system). Rule state is polled every 50 ms, so figures are
within ~0.1 s; the daemons idle 1 s between passes when they have no work, which the first
figure includes, as a user would see it.

Prints the figures and writes JSON to ``--out`` (default benchmarks/results/rucio_latency.json):

    rucio_latency_s: {"10": s, "100": s}
    plus the configuration (file size, Rucio version)

Usage: python benchmarks/rucio_latency.py [--counts 10 100] [--size BYTES] [--out FILE]
       [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import secrets
import string
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "rucio_local" / "rucio-local.sh"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "rucio_latency.json"
TIMEOUT_S = 600.0


def _script(*args: str) -> None:
    subprocess.run(["bash", str(SCRIPT), *args], check=True, timeout=900)


@contextmanager
def _local_rucio(workdir: Path | None) -> Iterator[dict[str, Any]]:
    """The settings of a running local Rucio: ``workdir``'s, or a temporary one's."""
    if workdir is not None:
        _script("start", str(workdir))  # idempotent: reuses a running instance
        yield json.loads((workdir / "rucio-local.json").read_text())
        return
    with tempfile.TemporaryDirectory(prefix="drp-rucio-bench-") as tmp:
        path = Path(tmp) / "rucio"
        _script("start", str(path))
        try:
            yield json.loads((path / "rucio-local.json").read_text())
        finally:
            _script("stop", str(path))


def _one(settings: dict[str, Any], n: int, size: int, storage: Path) -> float:
    """Seconds from add_rule to the rule OK with all ``n`` files verified at the destination."""
    from drp_campaign.backends.interfaces import DID, NewFile, RuleState, file_adler32, rse_name
    from drp_campaign.backends.rucio import RucioCatalog, rucio_client

    # A fresh VO: nothing left over from another count or run can make the rule faster.
    vo = "b" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(2))
    _script("add-vo", settings["workdir"], vo)
    client = rucio_client({**settings["client"], "vo": vo})
    cat = RucioCatalog(client, storage / f"events-{vo}.sqlite3")
    hub, frdf = rse_name("SLAC", "butler"), rse_name("FrDF", "butler")
    for rse in (hub, frdf):
        cat.add_rse(rse, storage / vo / rse)
    cat.add_scope("bench")
    files = []
    for i in range(n):
        name = f"lat/{n}/file_{i:04d}.fits"
        data = i.to_bytes(4, "little") * (size // 4) + b"x" * (size % 4)
        path = cat.rse_root(hub) / "bench" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        meta = {"rubin_butler": 1, "rubin_sidecar": json.dumps({"id": f"{vo}-{i}"})}
        files.append(NewFile("bench", name, size, f"{zlib.adler32(data):08x}", meta))
    cat.register_replicas(hub, files)
    ds = DID("bench", f"lat/{n}")
    cat.add_dataset(ds)
    cat.attach(ds, [f.did for f in files])
    cat.close(ds)
    dst_root = cat.rse_root(frdf)

    t0 = time.perf_counter()
    rule_id = cat.add_rule(ds, frdf)
    verified: set[str] = set()
    while True:
        rule = cat.get_rule(rule_id)
        if rule.state == RuleState.STUCK:
            raise RuntimeError(f"rule {rule_id} is STUCK: {rule.error}")
        if rule.state == RuleState.OK:
            for f in files:
                if f.name in verified:
                    continue
                path = dst_root / f.scope / f.name
                if path.exists() and path.stat().st_size == f.bytes:
                    if file_adler32(path) == f.adler32:
                        verified.add(f.name)
            if len(verified) == n:
                return time.perf_counter() - t0
        if time.perf_counter() - t0 > TIMEOUT_S:
            raise TimeoutError(f"rule {rule_id} not done after {TIMEOUT_S:.0f} s: {rule}")
        time.sleep(0.05)


def measure_rucio_latency(
    counts: Sequence[int] = (10, 100), *, size: int = 1 << 20, workdir: Path | None = None
) -> dict[str, float]:
    """Rule-to-OK-and-on-disk latency with a real local Rucio, per file count.

    Parameters
    ----------
    counts : `~collections.abc.Sequence` [`int`]
        File counts to measure, one rule each.
    size : `int`
        Bytes per file.
    workdir : `pathlib.Path`, optional
        A local Rucio's work directory to use (started if needed, left running); by default
        one is started in a temporary directory and stopped afterwards.

    Returns
    -------
    latency : `dict` [`str`, `float`]
        Seconds, keyed by the count as a string (JSON's keys).
    """
    out: dict[str, float] = {}
    with _local_rucio(workdir) as settings, tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out[str(n)] = round(_one(settings, n, size, Path(tmp)), 2)
            print(f"rucio rule latency, {n} files of {size} bytes: {out[str(n)]:.2f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, help="use (and keep) this local Rucio")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    latency = measure_rucio_latency(args.counts, size=args.size, workdir=args.workdir)
    result = {"rucio_latency_s": latency, "file_size": args.size, "rucio_version": "41.5.1"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
