"""Contract suite for `DataCatalog`: the same tests run against every implementation.

Each implementation provides a `CatalogEnv`: the catalog, the storage root of each RSE, and how to
make transfers progress (``settle``) and to repair STUCK rules (``repair``), which the embedded
catalog does in-process and a real Rucio does with its daemons.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drp_campaign.backends.interfaces import (
    DID,
    CatalogError,
    DataCatalog,
    DIDNotFound,
    DIDType,
    DuplicateDID,
    NewFile,
    ReplicaState,
    RSENotFound,
    RuleNotFound,
    RuleState,
    ScopeNotFound,
    file_adler32,
    parse_rse_expression,
    rse_name,
)
from drp_campaign.backends.local.catalog import EmbeddedCatalog
from drp_campaign.backends.rucio import RucioCatalog, rucio_client

from .conftest import LocalRucio

HUB = rse_name("SLAC", "butler")
FRDF = rse_name("FrDF", "butler")
UKDF = rse_name("UKDF", "butler")
SCOPE = "dp2"


@dataclass
class CatalogEnv:
    """A catalog under test with three RSEs (hub, FrDF, UKDF) and scope ``dp2``."""

    catalog: DataCatalog
    roots: dict[str, Path]
    settle: Callable[..., object]  # run transfers until nothing more can progress
    repair: Callable[[], object]  # re-queue STUCK transfers

    def put(self, rse: str, name: str, data: bytes, scope: str = SCOPE) -> NewFile:
        """Write a file into an RSE's storage; return what registering it needs."""
        path = self.roots[rse] / scope / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sidecar = json.dumps({"id": f"uuid-{name}", "run": "run/1"})
        meta = {"rubin_butler": 1, "rubin_sidecar": sidecar}
        return NewFile(scope, name, len(data), f"{zlib.adler32(data):08x}", meta)

    def dataset(self, name: str, files: list[NewFile], close: bool = True) -> DID:
        """Register files at the hub, attach them to a new dataset, optionally close it."""
        self.catalog.register_replicas(HUB, files)
        ds = DID(SCOPE, name)
        self.catalog.add_dataset(ds)
        self.catalog.attach(ds, [f.did for f in files])
        if close:
            self.catalog.close(ds)
        return ds


def _embedded(tmp_path: Path) -> CatalogEnv:
    # Zero backoff keeps failure tests fast; two attempts exercise the retry before STUCK.
    cat = EmbeddedCatalog(tmp_path / "db", max_attempts=2, retry_base_delay_s=0.0)

    def settle(concurrency: int = 4) -> None:
        cat.process_transfers(concurrency=concurrency)

    def repair() -> None:
        cat.repair()

    return CatalogEnv(cat, {}, settle, repair)


def _rucio(tmp_path: Path, rucio: LocalRucio) -> CatalogEnv:
    # A fresh VO per test: an empty namespace on the session's server (see conftest.py).
    client = rucio_client(rucio.client_settings(rucio.new_vo()))
    cat = RucioCatalog(client, tmp_path / "rucio-events.sqlite3")

    def settle(concurrency: int = 4) -> None:
        # Rucio's daemons copy with their own parallelism: wait for them, do not drive them.
        rucio.settle(cat)

    def repair() -> None:
        cat.repair()

    return CatalogEnv(cat, {}, settle, repair)


@pytest.fixture(params=["embedded", pytest.param("rucio", marks=pytest.mark.rucio)])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CatalogEnv]:
    if request.param == "rucio":
        # Only the Rucio parameter starts (once per session) the local Rucio.
        e = _rucio(tmp_path, request.getfixturevalue("local_rucio"))
    else:
        e = _embedded(tmp_path)
    for rse in (HUB, FRDF, UKDF):
        root = tmp_path / "storage" / rse
        e.catalog.add_rse(rse, root)
        e.roots[rse] = e.catalog.rse_root(rse)
    e.catalog.add_scope(SCOPE)
    yield e


def _files(env: CatalogEnv, n: int, prefix: str = "f", size: int = 2000) -> list[NewFile]:
    return [
        env.put(HUB, f"{prefix}/file_{i:03d}.fits", bytes((i + k) % 251 for k in range(size)))
        for i in range(n)
    ]


def _assert_identical(env: CatalogEnv, files: list[NewFile], rse: str) -> None:
    for f in files:
        src = env.roots[HUB] / f.scope / f.name
        dst = env.roots[rse] / f.scope / f.name
        assert dst.read_bytes() == src.read_bytes(), f"{f.did} differs at {rse}"
        assert file_adler32(dst) == f.adler32


def _available(env: CatalogEnv, did: DID, rse: str) -> set[str]:
    return {
        r.name
        for r in env.catalog.list_replicas(did)
        if r.rse == rse and r.state == ReplicaState.AVAILABLE
    }


# ----------------------------------------------------------------------------------------------
# Pure helpers


def test_rse_names_follow_rtn101() -> None:
    assert rse_name("slac", "raw") == "SLAC_RAW_DISK"
    assert rse_name("FrDF", "butler") == "FRDF_BUTLER_DISK"
    with pytest.raises(ValueError, match="kind"):
        rse_name("SLAC", "tape")  # type: ignore[arg-type]
    assert parse_rse_expression("A_DISK| B_DISK|A_DISK") == ("A_DISK", "B_DISK")
    with pytest.raises(CatalogError, match="unsupported RSE expression"):
        parse_rse_expression("A_DISK&B_DISK")


def test_did_names_are_safe_relative_paths() -> None:
    assert str(DID.parse("raw:raw/LSSTComCam/x.fits")) == "raw:raw/LSSTComCam/x.fits"
    for bad in ("/abs", "a/../b", "a//b", ""):
        with pytest.raises(ValueError):
            DID("raw", bad)


# ----------------------------------------------------------------------------------------------
# Registration and datasets


def test_register_attach_close(env: CatalogEnv) -> None:
    files = _files(env, 3)
    ds = env.dataset("ds/register", files)
    cat = env.catalog
    assert [f.name for f in cat.list_dataset_files(ds)] == [f.name for f in files]
    replicas = cat.list_replicas(ds)
    assert {(r.name, r.rse, r.state) for r in replicas} == {
        (f.name, HUB, ReplicaState.AVAILABLE) for f in files
    }
    assert all(r.path == env.roots[HUB] / SCOPE / r.name for r in replicas)
    info = cat.get_did(ds)
    assert info.type == DIDType.DATASET and not info.open
    assert cat.get_did(files[0].did).adler32 == files[0].adler32
    assert cat.get_metadata(files[0].did)["rubin_sidecar"] == files[0].meta["rubin_sidecar"]
    extra = env.put(HUB, "f/late.fits", b"late")
    cat.register_replicas(HUB, [extra])
    with pytest.raises(CatalogError, match="closed"):
        cat.attach(ds, [extra.did])
    cat.close(ds)  # idempotent
    cat.attach(ds, [files[0].did])  # already attached: a no-op even when closed


def test_whoami_and_read_only_rses(env: CatalogEnv) -> None:
    # What preflight reads: the catalog answers as someone, and an RSE an operator made
    # read-only says so (Rucio's availability_write), until it is opened again.
    assert env.catalog.whoami()
    assert env.catalog.rse_writable(FRDF)
    env.catalog.set_rse_writable(FRDF, False)
    assert not env.catalog.rse_writable(FRDF)
    assert env.catalog.rse_writable(UKDF)
    env.catalog.set_rse_writable(FRDF, True)
    assert env.catalog.rse_writable(FRDF)
    with pytest.raises(RSENotFound):
        env.catalog.rse_writable("NOWHERE_DISK")


def test_registration_errors_name_the_did_and_rse(env: CatalogEnv) -> None:
    cat = env.catalog
    f = env.put(HUB, "f/x.fits", b"x" * 10)
    with pytest.raises(RSENotFound, match="NOWHERE_DISK"):
        cat.register_replicas("NOWHERE_DISK", [f])
    missing = NewFile(SCOPE, "f/missing.fits", 3, "00000000")
    with pytest.raises(CatalogError, match="dp2:f/missing.fits"):
        cat.register_replicas(HUB, [missing])
    other = env.put(HUB, "f/y.fits", b"y", scope="noscope")
    with pytest.raises(ScopeNotFound, match="noscope"):
        cat.register_replicas(HUB, [other])
    with pytest.raises(DIDNotFound, match="dp2:nothing"):
        cat.get_did(DID(SCOPE, "nothing"))
    with pytest.raises(RuleNotFound):
        cat.get_rule("0" * 32)
    cat.register_replicas(HUB, [f])
    with pytest.raises(RSENotFound, match="NOWHERE_DISK"):
        cat.add_rule(f.did, f"{FRDF}|NOWHERE_DISK")


def test_reregistration_is_idempotent_but_conflicts_raise(env: CatalogEnv) -> None:
    cat = env.catalog
    f = env.put(HUB, "f/same.fits", b"0123456789")
    cat.register_replicas(HUB, [f])
    cat.register_replicas(HUB, [f])  # same file again: no-op
    assert len(cat.list_replicas(f.did)) == 1
    changed = env.put(HUB, "f/same.fits", b"9876543210")  # same size, other bytes
    with pytest.raises(DuplicateDID, match="dp2:f/same.fits"):
        cat.register_replicas(HUB, [changed])
    ds = DID(SCOPE, "ds/dup")
    cat.add_dataset(ds)
    cat.add_dataset(ds)  # idempotent
    with pytest.raises(DuplicateDID):
        cat.add_dataset(f.did)


# ----------------------------------------------------------------------------------------------
# Rules and transfers


def test_rule_to_one_site(env: CatalogEnv) -> None:
    files = _files(env, 4)
    ds = env.dataset("ds/one", files)
    cat = env.catalog
    rule_id = cat.add_rule(ds, FRDF)
    assert cat.add_rule(ds, FRDF) == rule_id  # idempotent
    env.settle()
    rule = cat.get_rule(rule_id)
    assert rule.state == RuleState.OK and rule.locks_ok == 4, rule
    assert _available(env, ds, FRDF) == {f.name for f in files}
    _assert_identical(env, files, FRDF)
    assert not (env.roots[UKDF] / SCOPE).exists()
    # No temporary files left behind.
    assert not list((env.roots[FRDF]).rglob("*.part"))


def test_rule_to_two_sites(env: CatalogEnv) -> None:
    files = _files(env, 3)
    ds = env.dataset("ds/two", files)
    cat = env.catalog
    both = cat.add_rule(ds, f"{FRDF}|{UKDF}", copies=2)
    single = env.dataset("ds/single", _files(env, 2, prefix="g"))
    either = cat.add_rule(single, f"{FRDF}|{UKDF}", copies=1)
    with pytest.raises(CatalogError, match="3 copies"):
        cat.add_rule(ds, f"{HUB}|{FRDF}", copies=3)
    env.settle()
    assert cat.get_rule(both).state == RuleState.OK
    for rse in (FRDF, UKDF):
        assert _available(env, ds, rse) == {f.name for f in files}
        _assert_identical(env, files, rse)
    rule = cat.get_rule(either)
    assert rule.state == RuleState.OK and rule.locks_ok == 2
    placed = [r for r in cat.list_replicas(single) if r.rse != HUB]
    assert len(placed) == 2 and all(r.state == ReplicaState.AVAILABLE for r in placed)


def test_chained_rules_hub_frdf_ukdf(env: CatalogEnv) -> None:
    files = _files(env, 3)
    ds = env.dataset("ds/chain", files)
    cat = env.catalog
    # The downstream rule first: it must wait for FrDF rather than copy from the hub or fail.
    to_uk = cat.add_rule(ds, UKDF, source_replica_expression=FRDF)
    to_fr = cat.add_rule(ds, FRDF)
    env.settle()
    assert cat.get_rule(to_fr).state == RuleState.OK
    assert cat.get_rule(to_uk).state == RuleState.OK
    _assert_identical(env, files, UKDF)
    uk_events = cat.events(dst_rse=UKDF)
    assert len(uk_events) == 3
    assert {e.payload["src-rse"] for e in uk_events} == {FRDF}


def test_chain_waits_while_source_has_nothing(env: CatalogEnv) -> None:
    files = _files(env, 1)
    ds = env.dataset("ds/wait", files)
    cat = env.catalog
    to_uk = cat.add_rule(ds, UKDF, source_replica_expression=FRDF)
    env.settle()
    # No FrDF replica and none coming: the source is missing, the rule cannot succeed.
    assert cat.get_rule(to_uk).state == RuleState.STUCK
    cat.add_rule(ds, FRDF)
    env.repair()
    env.settle()
    assert cat.get_rule(to_uk).state == RuleState.OK
    _assert_identical(env, files, UKDF)


def test_late_attachment_to_ruled_dataset(env: CatalogEnv) -> None:
    files = _files(env, 2)
    ds = env.dataset("ds/late", files, close=False)
    cat = env.catalog
    rule_id = cat.add_rule(ds, FRDF)
    env.settle()
    assert cat.get_rule(rule_id).locks_ok == 2
    late = env.put(HUB, "f/late.fits", b"arrived later" * 100)
    cat.register_replicas(HUB, [late])
    cat.attach(ds, [late.did])
    cat.close(ds)
    env.settle()
    rule = cat.get_rule(rule_id)
    assert rule.state == RuleState.OK and rule.locks_ok == 3, rule
    _assert_identical(env, [*files, late], FRDF)


def test_failing_source_then_repaired(env: CatalogEnv) -> None:
    files = _files(env, 3)
    ds = env.dataset("ds/fail", files)
    cat = env.catalog
    victim = files[1]
    src = env.roots[HUB] / SCOPE / victim.name
    saved = src.read_bytes()
    src.unlink()
    rule_id = cat.add_rule(ds, FRDF)
    env.settle()
    rule = cat.get_rule(rule_id)
    assert rule.state == RuleState.STUCK and rule.locks_stuck == 1 and rule.locks_ok == 2, rule
    assert rule.error and victim.name in rule.error
    failed = [e for e in cat.events() if e.event_type == "transfer-failed"]
    assert len(failed) == 1
    assert failed[0].payload["name"] == victim.name and failed[0].payload["reason"]
    assert not (env.roots[FRDF] / SCOPE / victim.name).exists()
    assert _available(env, ds, FRDF) == {files[0].name, files[2].name}
    src.write_bytes(saved)
    env.repair()
    env.settle()
    assert cat.get_rule(rule_id).state == RuleState.OK
    _assert_identical(env, files, FRDF)


def test_corrupt_source_is_never_marked_transferred(env: CatalogEnv) -> None:
    files = _files(env, 2)
    ds = env.dataset("ds/corrupt", files)
    cat = env.catalog
    victim = files[0]
    src = env.roots[HUB] / SCOPE / victim.name
    good = src.read_bytes()
    src.write_bytes(bytes(b ^ 0xFF for b in good))  # same size, wrong checksum
    rule_id = cat.add_rule(ds, FRDF)
    env.settle()
    assert cat.get_rule(rule_id).state == RuleState.STUCK
    assert not (env.roots[FRDF] / SCOPE / victim.name).exists()
    assert victim.name not in _available(env, ds, FRDF)
    done = {e.payload["name"] for e in cat.events() if e.event_type == "transfer-done"}
    assert done == {files[1].name}
    (failed,) = [e for e in cat.events() if e.event_type == "transfer-failed"]
    assert "checksum" in failed.payload["reason"]
    src.write_bytes(good)
    env.repair()
    env.settle()
    assert cat.get_rule(rule_id).state == RuleState.OK
    _assert_identical(env, files, FRDF)


def test_events_carry_sidecar_and_resume(env: CatalogEnv) -> None:
    files = _files(env, 3)
    ds = env.dataset("ds/events", files)
    cat = env.catalog
    cat.add_rule(ds, FRDF)
    env.settle()
    events = cat.events()
    assert [e.event_type for e in events] == ["transfer-done"] * 3
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    by_name = {e.payload["name"]: e.payload for e in events}
    for f in files:
        p = by_name[f.name]
        assert p["scope"] == SCOPE and p["dst-rse"] == FRDF and p["src-rse"] == HUB
        assert p["bytes"] == f.bytes and p["checksum-adler"] == f.adler32
        assert p["rubin_butler"] == f.meta["rubin_butler"]
        assert p["rubin_sidecar"] == f.meta["rubin_sidecar"]
        assert p["dst-url"].endswith(f"/{FRDF}/{SCOPE}/{f.name}")
    assert cat.events(after_seq=seqs[0]) == events[1:]
    assert cat.events(dst_rse=UKDF) == []
    cat.add_rule(ds, UKDF)
    env.settle()
    newer = cat.events(after_seq=seqs[-1])
    assert {e.payload["dst-rse"] for e in newer} == {UKDF} and min(e.seq for e in newer) > seqs[-1]


def test_parallel_transfers_of_many_small_files(env: CatalogEnv) -> None:
    files = _files(env, 50, size=300)
    ds = env.dataset("ds/many", files)
    cat = env.catalog
    rule_id = cat.add_rule(ds, f"{FRDF}|{UKDF}", copies=2)
    env.settle(concurrency=8)
    rule = cat.get_rule(rule_id)
    assert rule.state == RuleState.OK and rule.locks_ok == 100, rule
    _assert_identical(env, files, FRDF)
    _assert_identical(env, files, UKDF)
    assert len(cat.events()) == 100  # each file copied once per site, never twice


# ----------------------------------------------------------------------------------------------
# Embedded only: several processes share one catalog file.


def test_embedded_workers_sharing_the_catalog_copy_each_file_once(tmp_path: Path) -> None:
    env = _embedded(tmp_path)
    for rse in (HUB, FRDF):
        env.catalog.add_rse(rse, tmp_path / "storage" / rse)
        env.roots[rse] = env.catalog.rse_root(rse)
    env.catalog.add_scope(SCOPE)
    files = _files(env, 40, size=200)
    ds = env.dataset("ds/shared", files)
    env.catalog.add_rule(ds, FRDF)
    # Separate catalog objects have separate connections, as separate processes would.
    workers = [EmbeddedCatalog(tmp_path / "db", retry_base_delay_s=0.0) for _ in range(3)]
    threads = [
        threading.Thread(target=w.process_transfers, kwargs={"concurrency": 2}) for w in workers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(env.catalog.events()) == 40
    assert _available(env, ds, FRDF) == {f.name for f in files}
    _assert_identical(env, files, FRDF)


def test_embedded_backoff_max_files_and_register_checksum(tmp_path: Path) -> None:
    cat = EmbeddedCatalog(
        tmp_path / "db", max_attempts=3, retry_base_delay_s=30.0, verify_checksum_on_register=True
    )
    env = CatalogEnv(cat, {}, cat.process_transfers, cat.repair)
    for rse in (HUB, FRDF):
        cat.add_rse(rse, tmp_path / "storage" / rse)
        env.roots[rse] = cat.rse_root(rse)
    cat.add_scope(SCOPE)
    files = _files(env, 3)
    bad = NewFile(SCOPE, files[0].name, files[0].bytes, "deadbeef")
    with pytest.raises(CatalogError, match="adler32"):
        cat.register_replicas(HUB, [bad])
    ds = env.dataset("ds/backoff", files)
    (env.roots[HUB] / SCOPE / files[0].name).unlink()
    rule_id = cat.add_rule(ds, FRDF)
    # One attempt at a time; the failure is retried only after the (30 s) backoff.
    summary = cat.process_transfers(max_files=1, concurrency=1)
    assert summary.done + summary.failed_attempts == 1
    summary = cat.process_transfers(wait_for_retries=False)
    assert summary.stuck == 0 and summary.waiting == 1
    rule = cat.get_rule(rule_id)
    assert rule.state == RuleState.REPLICATING and rule.locks_ok == 2, rule
