"""Transfers claimed by a worker that was killed are re-queued at once, not after a timeout."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

from drp_campaign.backends.interfaces import DID, NewFile, RuleState, file_adler32, rse_name
from drp_campaign.backends.local.catalog import EmbeddedCatalog

HUB, DST = rse_name("USDF", "butler"), rse_name("FrDF", "butler")

CLAIM_AND_DIE = """
import os, sys
from drp_campaign.backends.local.catalog import EmbeddedCatalog
cat = EmbeddedCatalog(sys.argv[1])
cat.evaluate()
jobs = cat._claim(100)  # what process_transfers does first; then the process is killed
print(len(jobs), flush=True)
os._exit(0)  # no cleanup, as after SIGKILL
"""


def test_claims_of_a_dead_worker_are_requeued(tmp_path: Path) -> None:
    cat = EmbeddedCatalog(tmp_path / "db", claim_timeout_s=3600)
    for rse in (HUB, DST):
        cat.add_rse(rse, tmp_path / "storage" / rse)
    cat.add_scope("dp2")
    files = []
    for i in range(5):
        data = bytes(range(i, i + 200))
        path = cat.rse_root(HUB) / "dp2" / f"f/{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(NewFile("dp2", f"f/{i}.bin", len(data), f"{zlib.adler32(data):08x}"))
    cat.register_replicas(HUB, files)
    ds = DID("dp2", "ds")
    cat.add_dataset(ds)
    cat.attach(ds, [f.did for f in files])
    rule = cat.add_rule(ds, DST)
    out = subprocess.run(
        [sys.executable, "-c", CLAIM_AND_DIE, str(tmp_path / "db")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "5"  # every request is now ACTIVE, owned by a dead process
    summary = cat.process_transfers()
    assert summary.done == 5
    assert cat.get_rule(rule).state == RuleState.OK
    for f in files:
        assert file_adler32(cat.rse_root(DST) / "dp2" / f.name) == f.adler32


def test_a_retry_tries_the_next_source(tmp_path: Path) -> None:
    # Two replicas; the one tried first has vanished from its storage (its site is down).
    ukdf = rse_name("UKDF", "butler")
    cat = EmbeddedCatalog(tmp_path / "db", max_attempts=3, retry_base_delay_s=0.0)
    for rse in (HUB, DST, ukdf):
        cat.add_rse(rse, tmp_path / "storage" / rse)
    cat.add_scope("dp2")
    data = b"pvi" * 100
    new = NewFile("dp2", "pvi/1.fits", len(data), f"{zlib.adler32(data):08x}")
    for rse in (HUB, ukdf):
        path = cat.rse_root(rse) / "dp2" / new.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        cat.register_replicas(rse, [new])
    # Sources are tried in name order: UKDF_BUTLER_DISK before USDF_BUTLER_DISK.
    (cat.rse_root(ukdf) / "dp2" / new.name).unlink()
    rule = cat.add_rule(new.did, DST)
    cat.process_transfers()
    assert cat.get_rule(rule).state == RuleState.OK
    assert (cat.rse_root(DST) / "dp2" / new.name).read_bytes() == data
