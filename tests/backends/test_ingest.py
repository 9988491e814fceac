"""Registration and ingest on arrival, between real Butler repositories through the catalog."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lsst.pipe.base.tests.mocks  # noqa: F401  (mock storage classes in this process)
import pytest
import yaml
from lsst.daf.butler import Butler, DatasetRef, DatasetType
from lsst.pipe.base.tests.mocks import MockDataset, get_mock_name

from drp_campaign.backends.butler import (
    collections_for,
    ingest_mock_datasets,
    open_repo,
    populate_site_repos,
)
from drp_campaign.backends.ingest import (
    DATA_PRODUCT,
    RAW_FILE,
    IngestFailed,
    IngestSummary,
    IngestTimeout,
    ReplicaMonitor,
    ensure_site_storage,
    register_datasets,
    sidecar,
    wait_ingested,
)
from drp_campaign.backends.interfaces import DID, CatalogError, NewFile, file_adler32, rse_name
from drp_campaign.backends.local.catalog import EmbeddedCatalog
from drp_campaign.backends.rucio import RucioCatalog, rucio_client
from drp_campaign.backends.rucio_register import SiteRucioInterface

from .conftest import LocalRucio
from .test_butler_repos import FILE_SIZE, INSTRUMENT, small_campaign

CAMPAIGN = "dc2-test-small"
RUN = f"{CAMPAIGN}/step1/USDF/run"
HUB_RSE = rse_name("USDF", "butler")
FRDF_RSE = rse_name("FrDF", "butler")
N_VISITS = 2  # calexps of 2 visits x 9 detectors: 18 files, enough for batches and races


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub and FrDF repositories of the small campaign, with calexps at the hub (built once)."""
    tmp = tmp_path_factory.mktemp("ingest-template")
    spec, plan = small_campaign(tmp)
    populate_site_repos(tmp, spec, plan, file_size=FILE_SIZE, sites=["USDF", "FrDF"])
    visits = sorted(plan.visits["visit"].tolist())[:N_VISITS]
    with open_repo(tmp / "repos" / "USDF") as hub:
        calexp = DatasetType(
            "calexp",
            ("instrument", "visit", "detector"),
            get_mock_name("ExposureF"),
            universe=hub.dimensions,
        )
        ingest_mock_datasets(
            hub,
            calexp,
            RUN,
            where="instrument = inst AND visit IN (visits)",
            bind={"inst": INSTRUMENT, "visits": visits},
            size_bytes=FILE_SIZE,
        )
    return tmp


@dataclass
class Env:
    """A work directory with both repositories, their storage, and the catalog."""

    workdir: Path
    catalog: EmbeddedCatalog
    rses: dict[str, dict[str, str]]

    def repo(self, site: str) -> Path:
        return self.workdir / "repos" / site

    def monitor(self, name: str = "frdf", site: str = "FrDF") -> ReplicaMonitor:
        return ReplicaMonitor(
            self.catalog,
            self.repo(site),
            list(self.rses[site].values()),
            self.workdir / "state" / f"{name}.sqlite3",
        )

    def register_calexps(self) -> tuple[list[DatasetRef], DID]:
        ds = DID(CAMPAIGN, f"{RUN}/calexp")
        with open_repo(self.repo("USDF"), writeable=False) as hub:
            refs = hub.query_datasets("calexp", collections=RUN, instrument=INSTRUMENT)
            register_datasets(
                self.catalog, hub, refs, repo_root=self.repo("USDF"), rse=HUB_RSE,
                scope=CAMPAIGN, dataset=ds, close=True,
            )  # fmt: skip
        return refs, ds

    def transfer(self, ds: DID, dst: str = FRDF_RSE) -> None:
        rule = self.catalog.add_rule(ds, dst)
        self.catalog.process_transfers()
        assert self.catalog.get_rule(rule).state == "OK"


@pytest.fixture
def env(template: Path, tmp_path: Path) -> Iterator[Env]:
    shutil.copytree(template / "repos", tmp_path / "repos", symlinks=True)
    catalog = EmbeddedCatalog(tmp_path / "catalog", max_attempts=1)
    rses = {
        s: ensure_site_storage(catalog, tmp_path, s, [CAMPAIGN], repo_root=tmp_path / "repos" / s)
        for s in ("USDF", "FrDF")
    }
    yield Env(tmp_path, catalog, rses)
    catalog.close_connection()


def _calexps(butler: Butler) -> list[DatasetRef]:
    return butler.query_datasets("calexp", collections=RUN, instrument=INSTRUMENT, limit=None)


def _count(butler: Butler, dataset_type: str, collections: str) -> int:
    return len(
        butler.query_datasets(
            dataset_type, collections=collections, instrument=INSTRUMENT, explain=False, limit=None
        )
    )


# ----------------------------------------------------------------------------------------------
# Storage layout and registration


def test_site_storage_links_every_scope_to_the_repo(env: Env) -> None:
    assert env.rses["FrDF"] == {"raw": "FRDF_RAW_DISK", "butler": "FRDF_BUTLER_DISK"}
    for rse in env.rses["FrDF"].values():
        root = env.catalog.rse_root(rse)
        assert root == (env.workdir / "storage" / rse).resolve()
        for scope in ("raw", "ancillary", CAMPAIGN):
            assert (root / scope).is_symlink()
            assert (root / scope).resolve() == env.repo("FrDF").resolve()
    # Idempotent.
    assert (
        ensure_site_storage(
            env.catalog, env.workdir, "FrDF", [CAMPAIGN], repo_root=env.repo("FrDF")
        )
        == env.rses["FrDF"]
    )
    # A scope path that is not the link to the repository is refused, and named.
    stray = env.catalog.rse_root("FRDF_BUTLER_DISK") / "other"
    stray.mkdir()
    with pytest.raises(FileExistsError, match="other"):
        ensure_site_storage(env.catalog, env.workdir, "FrDF", ["other"], repo_root=env.repo("FrDF"))
    stray.rmdir()
    stray.symlink_to(env.repo("USDF"))
    with pytest.raises(FileExistsError, match="not to the site repository"):
        ensure_site_storage(env.catalog, env.workdir, "FrDF", ["other"], repo_root=env.repo("FrDF"))


def test_register_datasets_is_lsst_rucio_register(env: Env) -> None:
    ds = DID(CAMPAIGN, f"{RUN}/calexp")
    with open_repo(env.repo("USDF"), writeable=False) as hub:
        refs = hub.query_datasets("calexp", collections=RUN, instrument=INSTRUMENT)
        assert not refs[0].dataId.hasRecords()  # expanded by register_datasets, in bulk
        with pytest.raises(ValueError, match="dimension records"):
            sidecar(refs[0])
        files = register_datasets(
            env.catalog, hub, refs, repo_root=env.repo("USDF"), rse=HUB_RSE, scope=CAMPAIGN,
            dataset=ds,
        )  # fmt: skip
        uris = {ref.id: Path(hub.getURI(ref).ospath) for ref in refs}
        with pytest.raises(CatalogError, match="ensure_site_storage"):
            register_datasets(
                env.catalog, hub, refs, repo_root=env.repo("FrDF"), rse=HUB_RSE,
                scope=CAMPAIGN, dataset=ds,
            )  # fmt: skip
    assert len(files) == len(refs) == N_VISITS * 9
    for f, ref in zip(files, refs, strict=True):
        path = uris[ref.id]
        # The DID name is the path relative to the repository root, identical at every site.
        assert f.name == path.relative_to(env.repo("USDF")).as_posix()
        assert f.name.startswith(f"{RUN}/calexp/")
        assert (f.bytes, f.adler32) == (FILE_SIZE, file_adler32(path))
        assert f.meta["rubin_butler"] == DATA_PRODUCT
        doc = json.loads(f.meta["rubin_sidecar"])
        assert doc["id"] == str(ref.id) and doc["run"] == RUN
        assert doc["datasetType"]["name"] == "calexp"
        assert {"visit", "detector", "visit_detector_region"} <= set(doc["dataId"]["records"])
        # The catalog's PFN at the hub is the repository file itself.
        (replica,) = env.catalog.list_replicas(f.did)
        assert replica.path.resolve() == path.resolve()
        assert env.catalog.get_metadata(f.did)["rubin_sidecar"] == f.meta["rubin_sidecar"]
    assert len(env.catalog.list_dataset_files(ds)) == len(files)
    assert env.catalog.get_did(ds).open
    # A rerun registers nothing new, and closing works on the second call.
    with open_repo(env.repo("USDF"), writeable=False) as hub:
        again = register_datasets(
            env.catalog, hub, refs, repo_root=env.repo("USDF"), rse=HUB_RSE, scope=CAMPAIGN,
            dataset=ds, close=True,
        )  # fmt: skip
    assert again == files
    assert len(env.catalog.list_dataset_files(ds)) == len(files)
    assert not env.catalog.get_did(ds).open


class _RecordingRucio:
    """Rucio's ``ReplicaClient`` and ``DIDClient`` as lsst-rucio-register calls them: records."""

    def __init__(self) -> None:
        self.replicas: dict[tuple[str, str], dict[str, Any]] = {}
        self.rses: set[str] = set()
        self.datasets: dict[tuple[str, str], dict[str, Any]] = {}
        self.attached: dict[tuple[str, str], set[tuple[str, str]]] = {}

    def add_replicas(self, rse: str, files: list[dict[str, Any]]) -> None:
        self.rses.add(rse)
        for f in files:
            self.replicas[f["scope"], f["name"]] = f

    def add_dataset(self, scope: str, name: str, statuses: dict[str, Any], rse: str) -> None:
        self.datasets[scope, name] = statuses

    def add_files_to_datasets(
        self, attachments: list[dict[str, Any]], ignore_duplicate: bool
    ) -> None:
        from rucio.common.exception import DataIdentifierNotFound

        for a in attachments:
            if (a["scope"], a["name"]) not in self.datasets:
                raise DataIdentifierNotFound(f"{a['scope']}:{a['name']}")
            self.attached.setdefault((a["scope"], a["name"]), set()).update(
                (d["scope"], d["name"]) for d in a["dids"]
            )


def _rucio_register_cli(
    monkeypatch: pytest.MonkeyPatch, tmp: Path, client: Any, args: list[str], **config: str
) -> None:
    """Run lsst-rucio-register's ``rucio-register`` command in-process, on ``client``."""
    from click.testing import CliRunner
    from lsst.rucio.register import rucio_interface, script

    # The package builds ReplicaClient() and DIDClient() from the process's rucio.cfg: the one
    # place the test substitutes its own, so everything else runs as in production.
    monkeypatch.setattr(rucio_interface, "ReplicaClient", lambda: client)
    monkeypatch.setattr(rucio_interface, "DIDClient", lambda: client)
    cfg = tmp / "rucio-register.yaml"
    cfg.write_text(yaml.safe_dump(config))
    monkeypatch.delenv("RUCIO_REGISTER_CONFIG", raising=False)
    result = CliRunner().invoke(script.main, [*args, "--rucio-register-config", str(cfg)])
    assert result.exit_code == 0, (result.output, result.exception)


def test_registration_is_identical_to_the_rucio_register_command(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rubin's own path: `rucio-register data-products` on the repository below the RSE root.
    root = env.catalog.rse_root(HUB_RSE)
    recorder = _RecordingRucio()
    ds_name = f"{RUN}/calexp"
    _rucio_register_cli(
        monkeypatch, env.workdir, recorder,
        ["data-products", "--repo", str(root / CAMPAIGN), "--collections", RUN, "-d", "calexp",
         "--rucio-dataset", ds_name],
        rucio_rse=HUB_RSE, scope=CAMPAIGN, rse_root=str(root), dtn_url=root.as_uri(),
    )  # fmt: skip
    assert len(recorder.replicas) == N_VISITS * 9 and recorder.rses == {HUB_RSE}
    # Ours, into the embedded catalog, from unexpanded refs.
    ds = DID(CAMPAIGN, ds_name)
    with open_repo(env.repo("USDF"), writeable=False) as hub:
        refs = _calexps(hub)
        files = register_datasets(
            env.catalog, hub, refs, repo_root=env.repo("USDF"), rse=HUB_RSE, scope=CAMPAIGN,
            dataset=ds,
        )  # fmt: skip
        universe = hub.dimensions
    # The same DIDs, sizes, checksums, PFNs and metadata, to the byte of the sidecar JSON.
    assert {(f.scope, f.name) for f in files} == set(recorder.replicas)
    for f in files:
        theirs = recorder.replicas[f.scope, f.name]
        assert (f.bytes, f.adler32) == (theirs["bytes"], theirs["adler32"])
        (replica,) = env.catalog.list_replicas(f.did)
        assert replica.path.as_uri() == theirs["pfn"]
        stored = env.catalog.get_metadata(f.did)
        assert {k: stored[k] for k in ("rubin_butler", "rubin_sidecar")} == theirs["meta"]
        assert dict(f.meta) == theirs["meta"]
        assert theirs["meta"]["rubin_butler"] == DATA_PRODUCT
        # What the Replica Monitor reads back: the same dataset.
        ref = DatasetRef.from_json(stored["rubin_sidecar"], universe=universe)
        assert ref.id in {r.id for r in refs} and ref.dataId.hasRecords()
    # The same dataset, monotonic, with the same files.
    assert recorder.datasets == {(CAMPAIGN, ds_name): {"monotonic": True}}
    assert recorder.attached[CAMPAIGN, ds_name] == {
        (f.scope, f.name) for f in env.catalog.list_dataset_files(ds)
    }


def test_site_rucio_interface_sets_what_rucio_interface_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lsst.rucio.register import rucio_interface

    # Its constructor is the one piece of RucioInterface not run (it builds clients from the
    # process's rucio.cfg): ours must still set every attribute the package's methods may read.
    client = _RecordingRucio()
    monkeypatch.setattr(rucio_interface, "ReplicaClient", lambda: client)
    monkeypatch.setattr(rucio_interface, "DIDClient", lambda: client)
    kwargs = {"rucio_rse": HUB_RSE, "scope": CAMPAIGN, "rse_root": "/r", "dtn_url": "file:///r"}
    theirs = rucio_interface.RucioInterface(None, rubin_butler_type=RAW_FILE, **kwargs)
    ours = SiteRucioInterface(
        client, rse=HUB_RSE, scope=CAMPAIGN, rse_root="/r", dtn_url="file:///r",
        rubin_butler_type=RAW_FILE, paths={},
    )  # fmt: skip
    assert set(vars(theirs)) <= set(vars(ours))
    assert {k: v for k, v in vars(ours).items() if k in vars(theirs) and k != "butler"} == {
        k: v for k, v in vars(theirs).items() if k != "butler"
    }


@pytest.mark.rucio
def test_registration_in_rucio_is_identical_to_the_rucio_register_command(
    template: Path, tmp_path: Path, local_rucio: LocalRucio, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(template / "repos", tmp_path / "repos", symlinks=True)
    settings = local_rucio.client_settings(local_rucio.new_vo())
    catalog = RucioCatalog(rucio_client(settings), tmp_path / "rucio-events.sqlite3")
    theirs = "rucioregister"  # a second scope on the same repository: same names, other DIDs
    ensure_site_storage(
        catalog, tmp_path, "USDF", [CAMPAIGN, theirs], repo_root=tmp_path / "repos" / "USDF"
    )
    root = catalog.rse_root(HUB_RSE)
    ds_name = f"{RUN}/calexp"
    # Rubin's path, with a client of its own on the same Rucio.
    _rucio_register_cli(
        monkeypatch, tmp_path, rucio_client(settings),
        ["data-products", "--repo", str(root / theirs), "--collections", RUN, "-d", "calexp",
         "--rucio-dataset", ds_name],
        rucio_rse=HUB_RSE, scope=theirs, rse_root=str(root), dtn_url=root.as_uri(),
    )  # fmt: skip
    # Ours, through RucioCatalog.
    with open_repo(tmp_path / "repos" / "USDF", writeable=False) as hub:
        register_datasets(
            catalog, hub, _calexps(hub), repo_root=tmp_path / "repos" / "USDF", rse=HUB_RSE,
            scope=CAMPAIGN, dataset=DID(CAMPAIGN, ds_name),
        )  # fmt: skip
    client = catalog.client

    def registered(scope: str) -> dict[str, tuple[Any, ...]]:
        """What Rucio holds of each file of the dataset, its PFN relative to the scope's root."""
        out = {}
        for f in client.list_files(scope, ds_name):
            meta = client.get_metadata(scope, f["name"], plugin="ALL")
            (rep,) = client.list_replicas([{"scope": scope, "name": f["name"]}], schemes=["file"])
            (pfn,) = rep["rses"][HUB_RSE]
            prefix = f"{root.as_uri()}/{scope}/"
            assert pfn.startswith(prefix)
            out[f["name"]] = (
                f["bytes"],
                f["adler32"],
                meta["rubin_butler"],
                meta["rubin_sidecar"],
                pfn.removeprefix(prefix),
                rep["states"],
            )
        return out

    ours = registered(CAMPAIGN)
    assert len(ours) == N_VISITS * 9
    assert registered(theirs) == ours
    for scope in (CAMPAIGN, theirs):
        assert client.get_metadata(scope, ds_name)["monotonic"] is True


# ----------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_hub_to_frdf_keeps_uuids_and_bytes(env: Env) -> None:
    refs, ds = env.register_calexps()
    env.transfer(ds)
    monitor = env.monitor()
    summary = monitor.poll()
    assert len(summary.ingested) == len(refs)
    assert summary.already_present == summary.rejected == summary.failed_transfers == []
    assert monitor.done() == {str(f.did) for f in env.catalog.list_dataset_files(ds)}
    with (
        open_repo(env.repo("USDF"), writeable=False) as hub,
        open_repo(env.repo("FrDF")) as frdf,
    ):
        got = {r.id: r for r in _calexps(frdf)}
        assert set(got) == {r.id for r in refs}
        for ref in refs:
            src, dst = Path(hub.getURI(ref).ospath), Path(frdf.getURI(got[ref.id]).ospath)
            assert dst.is_relative_to(env.repo("FrDF"))
            assert dst.relative_to(env.repo("FrDF")) == src.relative_to(env.repo("USDF"))
            assert dst.read_bytes() == src.read_bytes()
            mock = frdf.get(got[ref.id])
            assert isinstance(mock, MockDataset) and mock.dataset_id == ref.id
        # Recorded as an internal datastore file (not "direct"): purging deletes it.
        victim = got[refs[0].id]
        path = Path(frdf.getURI(victim).ospath)
        frdf.pruneDatasets([victim], purge=True, unstore=True, disassociate=True)
        assert not path.exists()
        assert Path(hub.getURI(refs[0]).ospath).exists()


def test_event_delivered_twice_or_monitor_restarted_ingests_once(env: Env) -> None:
    refs, ds = env.register_calexps()
    env.transfer(ds)
    first = env.monitor()
    assert len(first.poll(limit=5).ingested) == 5  # a monitor stopped after 5 events...
    assert first.cursor(FRDF_RSE) > 0
    first.close()
    restarted = env.monitor()  # ...resumes from its cursor, on the same state file
    rest = restarted.poll()
    assert len(rest.ingested) == len(refs) - 5 and rest.already_present == []
    assert restarted.poll().events == 0
    # A monitor with a fresh state sees every event again: a redelivery of all of them.
    redelivered = env.monitor("fresh").poll()
    assert redelivered.ingested == []
    assert len(redelivered.already_present) == len(refs)
    assert set(redelivered.already_present) == restarted.done()
    with open_repo(env.repo("FrDF"), writeable=False) as frdf:
        assert _count(frdf, "calexp", RUN) == len(refs)


def test_corrupted_or_missing_file_is_rejected_and_never_ingested(env: Env) -> None:
    refs, ds = env.register_calexps()
    env.transfer(ds)
    files = env.catalog.list_dataset_files(ds)
    root = env.catalog.rse_root(FRDF_RSE)
    corrupt, missing = files[0], files[1]
    # Same size, different bytes: only the checksum can tell.
    path = root / corrupt.scope / corrupt.name
    data = bytearray(path.read_bytes())
    data[-1] = ord("x")
    path.write_bytes(bytes(data))
    (root / missing.scope / missing.name).unlink()
    monitor = env.monitor()
    summary = monitor.poll()
    reasons = dict(summary.rejected)
    assert set(reasons) == {str(corrupt.did), str(missing.did)}
    assert "adler32" in reasons[str(corrupt.did)]
    assert "does not exist" in reasons[str(missing.did)]
    assert len(summary.ingested) == len(files) - 2
    with open_repo(env.repo("FrDF"), writeable=False) as frdf:
        present = {str(r.id) for r in _calexps(frdf)}
    bad_ids = {
        json.loads(env.catalog.get_metadata(f.did)["rubin_sidecar"])["id"] for f in files[:2]
    }
    assert len(present) == len(refs) - 2 and not present & bad_ids
    # The rejections persist across a restart, and waiting for those files fails at once.
    monitor.close()
    restarted = env.monitor()
    assert dict(restarted.rejected()) == reasons
    with pytest.raises(IngestFailed, match="adler32") as err:
        wait_ingested(restarted, [ds], timeout_s=60)
    assert set(err.value.failures) == set(reasons)


def test_transfer_failures_are_reported_not_ingested(env: Env) -> None:
    refs, ds = env.register_calexps()
    lost = env.catalog.list_dataset_files(ds)[0]
    (env.catalog.rse_root(HUB_RSE) / lost.scope / lost.name).unlink()  # the source is gone
    env.catalog.add_rule(ds, FRDF_RSE)
    env.catalog.process_transfers()
    summary = env.monitor().poll()
    assert [did for did, _ in summary.failed_transfers] == [str(lost.did)]
    assert len(summary.ingested) == len(refs) - 1
    assert str(lost.did) not in env.monitor().done()


def _crafted_transfer(env: Env, docs: dict[str, dict[str, Any]]) -> ReplicaMonitor:
    """Put a mock file per sidecar document at the hub, register it with that sidecar, move it."""
    files = []
    for name, doc in docs.items():
        path = env.repo("USDF") / CAMPAIGN / "crafted" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = MockDataset(
            dataset_id=doc["id"],
            dataset_type=doc["datasetType"],
            data_id=doc["dataId"]["dataId"],
            run=doc["run"],
        ).model_dump_json()
        path.write_text(data)
        meta = {"rubin_butler": DATA_PRODUCT, "rubin_sidecar": json.dumps(doc)}
        adler = file_adler32(path)
        files.append(NewFile(CAMPAIGN, f"{CAMPAIGN}/crafted/{name}", len(data), adler, meta))
    env.catalog.register_replicas(HUB_RSE, files)
    ds = DID(CAMPAIGN, f"{CAMPAIGN}/crafted")
    env.catalog.add_dataset(ds)
    env.catalog.attach(ds, [f.did for f in files])
    env.transfer(ds)
    return env.monitor()


def _sidecar_doc(env: Env) -> dict[str, Any]:
    with open_repo(env.repo("USDF"), writeable=False) as hub:
        (ref,) = hub.query_datasets(
            "calexp", collections=RUN, instrument=INSTRUMENT, limit=1, with_dimension_records=True
        )
    return json.loads(sidecar(ref))


def test_dimension_records_travel_with_the_sidecar(env: Env) -> None:
    # A visit FrDF has never heard of: only the sidecar's records can make the ingest work.
    doc = _sidecar_doc(env)
    old_visit, new_visit = doc["dataId"]["dataId"]["visit"], 999_999
    doc["id"] = str(uuid.uuid4())
    doc["dataId"]["dataId"]["visit"] = new_visit
    records = doc["dataId"]["records"]
    records["visit"]["record"]["id"] = new_visit
    records["visit"]["record"]["name"] = str(new_visit)
    records["visit_detector_region"]["record"]["visit"] = new_visit
    with open_repo(env.repo("FrDF"), writeable=False) as frdf:
        assert not frdf.query_dimension_records(
            "visit", instrument=INSTRUMENT, where=f"visit = {new_visit}", explain=False
        )
    summary = _crafted_transfer(env, {"new-visit.json": doc}).poll()
    assert summary.rejected == [] and len(summary.ingested) == 1
    with open_repo(env.repo("FrDF"), writeable=False) as frdf:
        (visit,) = frdf.query_dimension_records("visit", instrument=INSTRUMENT, visit=new_visit)
        (old,) = frdf.query_dimension_records("visit", instrument=INSTRUMENT, visit=old_visit)
        assert visit.region == old.region and visit.physical_filter == old.physical_filter
        (ref,) = frdf.query_datasets(
            "calexp", collections=RUN, instrument=INSTRUMENT, visit=new_visit
        )
        assert str(ref.id) == doc["id"]


def test_a_file_the_repository_refuses_is_rejected_alone(env: Env) -> None:
    # No records and a visit FrDF does not know: the repository refuses it; a sibling with a
    # good sidecar in the same batch is still ingested, and the poll does not fail. Each comes
    # twice (the same dataset under two names): the twin gets the first one's outcome.
    good = _sidecar_doc(env)
    bad = json.loads(json.dumps(good))
    bad["id"] = str(uuid.uuid4())
    bad["dataId"] = {"dataId": dict(bad["dataId"]["dataId"], visit=888_888)}
    docs = {"bad.json": bad, "bad-twin.json": bad, "good.json": good, "good-twin.json": good}
    monitor = _crafted_transfer(env, docs)
    summary = monitor.poll()

    def did(name: str) -> str:
        return f"{CAMPAIGN}:{CAMPAIGN}/crafted/{name}"

    assert {d for d, _ in summary.rejected} == {did("bad.json"), did("bad-twin.json")}
    assert all("refused" in why for _, why in summary.rejected)
    assert len(summary.ingested) == len(summary.already_present) == 1
    assert {*summary.ingested, *summary.already_present} == {
        did("good.json"),
        did("good-twin.json"),
    }
    assert monitor.done() == {did("good.json"), did("good-twin.json")}
    with open_repo(env.repo("FrDF"), writeable=False) as frdf:
        assert frdf.get_dataset(uuid.UUID(bad["id"])) is None
        assert frdf.get_dataset(uuid.UUID(good["id"])) is not None


def test_raws_ingest_into_the_defaults_chain(env: Env) -> None:
    names = collections_for(INSTRUMENT)
    ds = DID("raw", f"{INSTRUMENT}/raw/all/batch-1")
    with open_repo(env.repo("USDF"), writeable=False) as hub:
        raws = hub.query_datasets("raw", collections=names.raw_run, instrument=INSTRUMENT)[:12]
        files = register_datasets(
            env.catalog, hub, raws, repo_root=env.repo("USDF"), rse=env.rses["USDF"]["raw"],
            scope="raw", dataset=ds, close=True, rubin_butler=RAW_FILE,
        )  # fmt: skip
    assert {f.meta["rubin_butler"] for f in files} == {RAW_FILE}
    env.transfer(ds, env.rses["FrDF"]["raw"])
    summary = env.monitor().poll()
    assert len(summary.ingested) == len(raws)
    with open_repo(env.repo("FrDF"), writeable=False) as frdf:
        got = frdf.query_datasets(
            "raw", collections=names.defaults, instrument=INSTRUMENT, limit=None
        )
        assert {r.id for r in got} == {r.id for r in raws}
        assert isinstance(frdf.get(got[0]), MockDataset)


def test_wait_ingested_closes_the_loop_and_names_what_is_missing(env: Env) -> None:
    refs, ds = env.register_calexps()
    env.catalog.add_rule(ds, FRDF_RSE)
    monitor = env.monitor()
    summary = wait_ingested(
        monitor, [ds], timeout_s=120, poll_s=0.01, settle=env.catalog.process_transfers
    )
    assert len(summary.ingested) == len(refs)
    # Nothing will ever bring this file: the timeout names it.
    never = DID(CAMPAIGN, f"{RUN}/never/arrives.json")
    with pytest.raises(IngestTimeout, match="never/arrives.json") as err:
        wait_ingested(monitor, [ds, never], timeout_s=0.05, poll_s=0.01)
    assert err.value.missing == [str(never)]


# ----------------------------------------------------------------------------------------------
# Concurrency


class _LockstepMonitor(ReplicaMonitor):
    """Both monitors look at the repository, *then* both ingest: a forced race."""

    def __init__(self, *args: Any, barrier: threading.Barrier, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.barrier = barrier
        self.raced = False

    def _split_present(self, butler: Butler, candidates: list[Any]) -> Any:
        result = super()._split_present(butler, candidates)
        if not self.raced:
            self.raced = True
            self.barrier.wait()
        return result


def test_two_monitors_racing_ingest_each_dataset_once(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    refs, ds = env.register_calexps()
    env.transfer(ds)
    barrier = threading.Barrier(2, timeout=120)
    monitors = [
        _LockstepMonitor(
            env.catalog,
            env.repo("FrDF"),
            [FRDF_RSE],
            env.workdir / "state" / f"m{i}.sqlite3",
            barrier=barrier,
        )  # fmt: skip
        for i in range(2)
    ]
    results: dict[int, IngestSummary | BaseException] = {}

    def run(i: int) -> None:
        try:
            results[i] = monitors[i].poll()
        except BaseException as exc:  # surfaced by the assertion below
            results[i] = exc

    caplog.set_level(logging.INFO, logger="drp_campaign.backends.ingest")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = results[0], results[1]
    assert isinstance(a, IngestSummary), a
    assert isinstance(b, IngestSummary), b
    assert a.rejected == b.rejected == []
    # Both saw every file missing; exactly one ingested each, the other found it present.
    ingested = a.ingested + b.ingested
    present = a.already_present + b.already_present
    assert sorted(ingested) == sorted(present)
    assert "batch ingest conflicted" in caplog.text  # the loser hit the repository's constraint
    assert len(ingested) == len(set(ingested)) == len(refs)
    with open_repo(env.repo("FrDF"), writeable=False) as frdf:
        assert _count(frdf, "calexp", RUN) == len(refs)
