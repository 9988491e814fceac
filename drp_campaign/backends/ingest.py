"""Butler files in the data catalog: site storage, registration, and ingest on arrival.

Storage layout
--------------
Each site's Butler repository is where its `DataFacility` Block says. Its RSEs
(``{SITE}_RAW_DISK`` for raws and ancillary inputs, ``{SITE}_BUTLER_DISK`` for products) have
their storage roots under
``<workdir>/storage/<RSE>/``, and ``<root>/<scope>`` is a symlink to the repository root. A file's
DID is ``<scope>:<path relative to the repository root>``, the same at every site, so the PFN
``<root>/<scope>/<name>`` of any replica lands inside that site's repository at the path its
source datastore gave it: a transfer *is* the copy into the destination datastore, and ingest only
records it (``transfer=None``, an internal datastore file, like a ``put``).

Registration (`register_datasets`) is lsst-rucio-register's ``data-products`` / ``raws``, run
through the package's own ``RucioInterface`` on the catalog (`.rucio_register`): each file becomes
a replica with the DID metadata ``rubin_butler`` (``data_product`` or ``raw_file``, the package's
``DataType``) and ``rubin_sidecar`` (the JSON of the *expanded* `~lsst.daf.butler.DatasetRef`, so
the dimension records travel with the file), attached to a dataset.

Ingest (`ReplicaMonitor`) is ctrl_ingestd: it consumes the catalog's ``transfer-done`` events per
destination RSE, verifies each file on disk against the event's size and adler32, rebuilds the
`~lsst.daf.butler.DatasetRef` from the sidecar (same dataset UUID), syncs its dimension records,
registers the dataset type and RUN, and ingests the file in place. It is idempotent (an event
delivered twice, a restarted monitor, or two monitors on one repository ingest a dataset once)
and keeps its cursor, outcomes and rejections in an SQLite file. `wait_ingested` is the closed
loop a flow uses to wait for a set of DIDs to be usable at a site.

A sidecar carries the records of its data ID's own elements (``visit``, ``detector``,
``visit_detector_region``...), not those that merely refer to them (``visit_definition``,
``visit_system_membership``): graph building at the destination needs those too, which is why
every site gets the whole campaign's dimension records up front (`.repos.adopt_repo`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from lsst.daf.butler import Butler, DataCoordinate, DatasetRef, FileDataset
from lsst.daf.butler.registry import ConflictingDefinitionError

from .butler import (  # also registers the _mock_* storage classes in this process
    open_repo,
    register_run,
)
from .interfaces import (
    BLOCK_SIZE,
    DID,
    CatalogError,
    DataCatalog,
    DIDNotFound,
    NewFile,
    TransferEvent,
    rse_name,
)
from .rucio_register import DATA_PRODUCT, RAW_FILE, CatalogClient, SiteRucioInterface
from .sqlite_state import ThreadLocalSQLite

__all__ = [
    "ANCILLARY_SCOPE",
    "DATA_PRODUCT",
    "RAW_FILE",
    "RAW_SCOPE",
    "IngestError",
    "IngestFailed",
    "IngestSummary",
    "IngestTimeout",
    "ReplicaMonitor",
    "ensure_site_storage",
    "register_datasets",
    "sidecar",
    "storage_root",
]

_LOG = logging.getLogger(__name__)

#: Scope of raws (on ``{SITE}_RAW_DISK``).
RAW_SCOPE = "raw"
#: Scope of calibrations, the skymap and other inputs that are not raws (on ``{SITE}_RAW_DISK``).
ANCILLARY_SCOPE = "ancillary"

#: Files registered per catalog call: one transaction (embedded) or one bulk request (Rucio).
_REGISTER_BATCH = 1000
#: Errors of the database itself (unreachable, locked too long): the poll fails and the events
#: stay unconsumed for the next one, rather than rejecting every file of the batch.
_TRANSIENT = (sqlalchemy.exc.OperationalError,)
#: Threads reading files for checksums: I/O bound, and zlib releases the GIL on large blocks.
_CHECKSUM_THREADS = 4


# ----------------------------------------------------------------------------------------------
# Errors and results


class IngestError(RuntimeError):
    """Base class of the errors of this module."""


class IngestFailed(IngestError):
    """Files that cannot become ingested without intervention (rejected, or transfer failed).

    Attributes
    ----------
    failures : `dict` [`str`, `str`]
        DID string -> reason.
    """

    def __init__(self, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        lines = "\n".join(f"  {did}: {why}" for did, why in sorted(self.failures.items()))
        super().__init__(f"{len(self.failures)} file(s) cannot be ingested:\n{lines}")


class IngestTimeout(IngestError, TimeoutError):
    """Files still not ingested when `wait_ingested` gave up.

    Attributes
    ----------
    missing : `list` [`str`]
        DID strings not ingested yet, sorted.
    """

    def __init__(self, missing: Iterable[str], timeout_s: float, where: str) -> None:
        self.missing = sorted(missing)
        shown = ", ".join(self.missing[:20])
        more = f" (and {len(self.missing) - 20} more)" if len(self.missing) > 20 else ""
        super().__init__(
            f"{len(self.missing)} file(s) not ingested at {where} after {timeout_s:g} s: "
            f"{shown}{more}. Check the rules of their datasets (a STUCK rule names the cause) "
            f"and that a transfer worker is running."
        )


@dataclass
class IngestSummary:
    """What `ReplicaMonitor.poll` did (DIDs as ``scope:name`` strings).

    Attributes
    ----------
    ingested : `list` [`str`]
        Files ingested by this call.
    already_present : `list` [`str`]
        Files whose dataset the repository already held (a repeated event, a restart, or another
        monitor that got there first).
    rejected : `list` [`tuple` [`str`, `str`]]
        ``(DID, reason)`` of ``transfer-done`` events whose file was not ingested: missing,
        wrong size or checksum, outside the repository, no usable sidecar, or conflicting with
        the repository's content.
    failed_transfers : `list` [`tuple` [`str`, `str`]]
        ``(DID, reason)`` of ``transfer-failed`` events.
    """

    ingested: list[str] = field(default_factory=list)
    already_present: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    failed_transfers: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: IngestSummary) -> None:
        """Add another summary's entries to this one.

        Parameters
        ----------
        other : `IngestSummary`
            The summary to add.
        """
        self.ingested.extend(other.ingested)
        self.already_present.extend(other.already_present)
        self.rejected.extend(other.rejected)
        self.failed_transfers.extend(other.failed_transfers)

    @property
    def events(self) -> int:
        """Number of events this summary accounts for."""
        return (
            len(self.ingested)
            + len(self.already_present)
            + len(self.rejected)
            + len(self.failed_transfers)
        )


# ----------------------------------------------------------------------------------------------
# Storage layout


def storage_root(workdir: str | Path, rse: str) -> Path:
    """Return the storage root of an RSE: ``<workdir>/storage/<RSE>``.

    Parameters
    ----------
    workdir : `str` or `pathlib.Path`
        Campaign work directory.
    rse : `str`
        RSE name.

    Returns
    -------
    root : `pathlib.Path`
        The directory.
    """
    return Path(workdir) / "storage" / rse


def ensure_site_storage(
    catalog: DataCatalog,
    workdir: str | Path,
    site: str,
    scopes: Iterable[str],
    *,
    repo_root: str | Path,
) -> dict[str, str]:
    """Declare a site's RSEs and link every scope to the site's repository (idempotent).

    Both RSEs get a ``<root>/<scope>`` symlink to the site's repository root for the ``raw``
    and ``ancillary`` scopes and every scope given, so a replica of any DID lands in the
    repository whichever of the two RSEs a rule chose.

    Parameters
    ----------
    catalog : `DataCatalog`
        The data catalog.
    workdir : `str` or `pathlib.Path`
        Campaign work directory (holds the embedded RSEs' ``storage/``).
    site : `str`
        Site name (``USDF``, ``FrDF``...).
    scopes : iterable of `str`
        Product scopes (the campaign name); also declared in the catalog.
    repo_root : `str` or `pathlib.Path`
        The site's repository root (from its `DataFacility` Block), which must exist.

    Returns
    -------
    rses : `dict` [`str`, `str`]
        ``{"raw": "<SITE>_RAW_DISK", "butler": "<SITE>_BUTLER_DISK"}``.

    Raises
    ------
    FileExistsError
        If a scope path exists and is not a symlink to the site's repository (it would put
        replicas outside the repository, or hide files already there).
    """
    repo = Path(repo_root).absolute()
    if not repo.is_dir():
        raise FileNotFoundError(f"the repository of site {site} is not a directory: {repo}")
    all_scopes = list(dict.fromkeys([RAW_SCOPE, ANCILLARY_SCOPE, *scopes]))
    rses = {"raw": rse_name(site, "raw"), "butler": rse_name(site, "butler")}
    for rse in rses.values():
        catalog.add_rse(rse, storage_root(workdir, rse))
        root = catalog.rse_root(rse)
        for scope in all_scopes:
            DID(scope, "x")  # validates the scope before it becomes a path
            _ensure_link(root / scope, repo)
    for scope in all_scopes:
        catalog.add_scope(scope)
    return rses


def _ensure_link(link: Path, target: Path) -> None:
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return
        raise FileExistsError(
            f"{link} is a symlink to {os.readlink(link)}, not to the site repository {target}: "
            f"remove it (replicas under it would land outside the repository)"
        )
    if link.exists():
        raise FileExistsError(
            f"{link} exists and is not a symlink to the site repository {target}: move its "
            f"content into the repository and remove it, so replicas land in the repository"
        )
    # A relative link keeps the work directory relocatable (the catalog stores the roots).
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _check_scope_link(catalog: DataCatalog, rse: str, scope: str, repo_root: Path) -> Path:
    """Return the resolved repository root, checking ``<rse root>/<scope>`` leads to it."""
    repo = repo_root.resolve()
    linked = catalog.rse_root(rse) / scope
    if linked.resolve() != repo:
        raise CatalogError(
            f"{linked} does not lead to the repository {repo}: replicas of scope {scope!r} at "
            f"{rse} would not be the repository's files; run ensure_site_storage first"
        )
    return repo


# ----------------------------------------------------------------------------------------------
# Registration


def sidecar(ref: DatasetRef) -> str:
    """Return the ``rubin_sidecar`` metadata of a dataset: its expanded ref as JSON.

    What lsst-rucio-register's ``RucioInterface`` records (``DatasetRef.to_json``), with the
    check it lacks; `register_datasets` does not call it but runs the package's code.

    Parameters
    ----------
    ref : `lsst.daf.butler.DatasetRef`
        A resolved ref whose data ID has its dimension records (``with_dimension_records=True``
        or `Butler.registry.expandDataId`).

    Returns
    -------
    sidecar : `str`
        ``{id, datasetType{name, storageClass, dimensions}, dataId{dataId, records}, run}``.

    Raises
    ------
    ValueError
        If the data ID has no dimension records: the destination could then not sync records
        it lacks, and would refuse the dataset.
    """
    if not ref.dataId.hasRecords():
        raise ValueError(
            f"{ref} has no dimension records: expand it (query with with_dimension_records=True) "
            f"so the sidecar carries them to the destination"
        )
    return ref.to_json()


def _expand(butler: Butler, refs: Sequence[DatasetRef]) -> list[DatasetRef]:
    """Refs with dimension records, one query per dimension group (not one per ref)."""
    todo: dict[Any, list[int]] = defaultdict(list)
    out = list(refs)
    for i, ref in enumerate(out):
        if not ref.dataId.hasRecords():
            todo[ref.datasetType.dimensions].append(i)
    for dimensions, indices in todo.items():
        data_ids = {out[i].dataId for i in indices}
        with butler.query() as query:
            rows = query.join_data_coordinates(data_ids).data_ids(dimensions)
            expanded: dict[tuple[Any, ...], DataCoordinate] = {
                d.required_values: d for d in rows.with_dimension_records()
            }
        for i in indices:
            key = out[i].dataId.required_values
            if key not in expanded:
                raise LookupError(f"no dimension records for {out[i]} in the repository")
            out[i] = out[i].expanded(expanded[key])
    return out


def _size_and_adler32(path: Path) -> tuple[int, str]:
    value, size = 1, 0  # adler32's initial value
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            value = zlib.adler32(block, value)
            size += len(block)
    return size, f"{value & 0xFFFFFFFF:08x}"


def register_datasets(
    catalog: DataCatalog,
    butler: Butler,
    refs: Iterable[DatasetRef],
    *,
    repo_root: str | Path,
    rse: str,
    scope: str,
    dataset: DID,
    close: bool = False,
    rubin_butler: str | None = None,
) -> list[NewFile]:
    """Register the files of Butler datasets as replicas at ``rse`` and attach them to a dataset.

    lsst-rucio-register's ``data-products`` (and ``raws``) in-process, by the package's own
    ``RucioInterface.register_as_replicas`` (`.rucio_register.SiteRucioInterface`) on the
    catalog: each file's DID is ``scope:<path relative to repo_root>``, with its size, adler32
    and the metadata ``rubin_butler`` and ``rubin_sidecar`` (see `sidecar`). Files are
    registered and attached in batches. Idempotent: a rerun registers and attaches nothing new.

    Parameters
    ----------
    catalog : `DataCatalog`
        The data catalog.
    butler : `lsst.daf.butler.Butler`
        Butler of the repository at ``repo_root`` holding the datasets.
    refs : iterable of `lsst.daf.butler.DatasetRef`
        Stored datasets (expanded or not: unexpanded ones are expanded in bulk).
    repo_root : `str` or `pathlib.Path`
        Repository root; ``<rse root>/<scope>`` must lead to it (see `ensure_site_storage`).
    rse : `str`
        The RSE whose storage holds the repository.
    scope : `str`
        Scope of the files.
    dataset : `DID`
        Dataset to attach them to (created if missing), in ``scope``.
    close : `bool`, optional
        Close the dataset afterwards (no more files may be attached).
    rubin_butler : `str`, optional
        The ``rubin_butler`` type (``RAW_FILE`` for the spec's raws: the caller knows which
        they are, the dataset type's name does not say); ``data_product`` by default.

    Returns
    -------
    files : `list` [`NewFile`]
        The files, in the order of ``refs``.

    Raises
    ------
    CatalogError
        If ``<rse root>/<scope>`` does not lead to the repository.
    ValueError
        If a file lies outside the repository, a dataset has several files (disassembled), or
        ``dataset`` is in another scope.
    FileNotFoundError
        If a dataset is not stored in the repository.
    """
    if dataset.scope != scope:
        # lsst-rucio-register attaches files to a dataset of their own scope.
        raise ValueError(f"dataset {dataset} is not in the files' scope {scope!r}")
    repo = _check_scope_link(catalog, rse, scope, Path(repo_root))
    expanded = _expand(butler, list(refs))
    uris = butler.get_many_uris(expanded)
    names: list[str] = []
    for ref in expanded:
        primary, components = uris[ref]
        if primary is None:
            raise ValueError(
                f"{ref} is stored as {len(components)} component files; register composite "
                f"datasets unsplit (one file per dataset)"
            )
        path = Path(os.path.realpath(primary.ospath))
        if not path.is_relative_to(repo):
            raise ValueError(f"{ref} is stored at {path}, outside the repository {repo}")
        names.append(path.relative_to(repo).as_posix())
    # The DIDs and their metadata are lsst-rucio-register's own (RucioInterface), made on the
    # catalog through CatalogClient; the catalog creates the dataset even when no file comes.
    client = CatalogClient(catalog)
    root = catalog.rse_root(rse)
    paths = {str(ref.id): name for ref, name in zip(expanded, names, strict=True)}
    by_kind: dict[str, list[DatasetRef]] = defaultdict(list)
    for ref in expanded:
        kind = rubin_butler or DATA_PRODUCT
        by_kind[kind].append(ref)
    catalog.add_dataset(dataset)
    for kind, kind_refs in by_kind.items():
        interface = SiteRucioInterface(
            client, rse=rse, scope=scope, rse_root=str(root), dtn_url=root.as_uri(),
            rubin_butler_type=kind, paths=paths,
        )  # fmt: skip
        for start in range(0, len(kind_refs), _REGISTER_BATCH):
            batch = kind_refs[start : start + _REGISTER_BATCH]
            interface.prefetch_hashes(batch, threads=_CHECKSUM_THREADS)
            interface.register_as_replicas(dataset.name, batch)
    registered = {f.name: f for f in client.registered}
    missing = [name for name in names if name not in registered]
    if missing:
        # The package names a file by its path below <rse root>/<scope>/: ours must agree.
        raise CatalogError(
            f"lsst-rucio-register named {len(missing)} file(s) otherwise than by their path in "
            f"the repository, such as {missing[0]!r}"
        )
    files = [registered[name] for name in names]
    if close:
        catalog.close(dataset)
    _LOG.info("registered %d file(s) at %s in %s", len(files), rse, dataset)
    return files


# ----------------------------------------------------------------------------------------------
# The Replica Monitor

_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (rse TEXT PRIMARY KEY, seq INTEGER NOT NULL);
-- outcome: 'ingested' (by this monitor) or 'present' (the repository already had it).
CREATE TABLE IF NOT EXISTS done (
    rse TEXT NOT NULL, did TEXT NOT NULL, dataset_id TEXT NOT NULL, outcome TEXT NOT NULL,
    seq INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (rse, did));
-- kind: 'rejected' or 'transfer-failed', resolved once a later event ingests the file.
CREATE TABLE IF NOT EXISTS problems (
    seq INTEGER NOT NULL, rse TEXT NOT NULL, did TEXT NOT NULL, kind TEXT NOT NULL,
    reason TEXT NOT NULL, resolved INTEGER NOT NULL DEFAULT 0, at REAL NOT NULL,
    PRIMARY KEY (rse, seq));
CREATE INDEX IF NOT EXISTS done_by_did ON done (did);
CREATE INDEX IF NOT EXISTS problems_unresolved ON problems (resolved, did);
"""


@dataclass
class _Candidate:
    """A verified ``transfer-done`` file waiting to be ingested."""

    seq: int
    did: str
    path: Path
    ref: DatasetRef


@dataclass
class _Batch:
    """Outcomes of one batch of events of one RSE, committed to the state in one transaction."""

    done: list[tuple[str, str, str, int]] = field(default_factory=list)  # did, id, outcome, seq
    problems: list[tuple[int, str, str, str]] = field(default_factory=list)  # seq, did, kind, why

    def summary(self) -> IngestSummary:
        s = IngestSummary()
        for did, _, outcome, _ in self.done:
            (s.ingested if outcome == "ingested" else s.already_present).append(did)
        for _, did, kind, why in self.problems:
            (s.rejected if kind == "rejected" else s.failed_transfers).append((did, why))
        return s


class ReplicaMonitor:
    """Ingest files into a site's repository as the catalog reports their arrival.

    Parameters
    ----------
    catalog : `DataCatalog`
        The data catalog whose ``events`` report transfers.
    repo_root : `str` or `pathlib.Path`
        The site's repository, where every scope of ``rses`` leads.
    rses : sequence of `str`
        The site's RSEs (raw and butler disks).
    state_path : `str` or `pathlib.Path`
        SQLite file with the cursor (last event per RSE), the outcome of every file and the
        rejections; created if missing. A monitor restarted on it resumes where it stopped.
    batch_size : `int`, optional
        Events verified and ingested per Butler transaction.
    verify_threads : `int`, optional
        Files checksummed in parallel.
    butler_uri : `str`, optional
        What to open the repository with (its Block's ``butler_repo``), if not ``repo_root``.

    Notes
    -----
    A ``transfer-done`` file is ingested only when it exists at ``<rse root>/<scope>/<name>``
    inside the repository with the event's size and adler32; otherwise it is *rejected*
    (recorded with the reason, reported, never ingested). Ingest uses ``transfer=None``: the file
    is already at its place in the datastore, and is recorded as an internal datastore file, so
    ``retrieve_artifacts`` and ``transfer_from`` treat it like any ``put``. Whether a dataset is
    already there is decided by the repository itself (by dataset UUID), so repeated events,
    restarts and concurrent monitors ingest each dataset once.
    """

    def __init__(
        self,
        catalog: DataCatalog,
        repo_root: str | Path,
        rses: Sequence[str],
        state_path: str | Path,
        *,
        batch_size: int = 500,
        verify_threads: int = _CHECKSUM_THREADS,
        butler_uri: str | None = None,
    ) -> None:
        if not rses:
            raise ValueError("a ReplicaMonitor needs at least one RSE")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.catalog = catalog
        self.repo_root = Path(repo_root)
        self.butler_uri = butler_uri or str(self.repo_root)
        self.rses = tuple(dict.fromkeys(rses))
        self.state_path = Path(state_path)
        self.batch_size = batch_size
        self.verify_threads = max(1, verify_threads)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = ThreadLocalSQLite(self.state_path)
        self._conn().execute("PRAGMA journal_mode=WAL")  # a property of the file: once is enough
        with self._tx() as c:
            for statement in _STATE_SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)

    # ------------------------------------------------------------------------------------------
    # State

    def _conn(self) -> sqlite3.Connection:
        # One connection per thread: flows may poll from worker threads.
        return self._db.conn()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.transaction()

    def close(self) -> None:
        """Close this thread's connection to the state database."""
        self._db.close()

    def __enter__(self) -> ReplicaMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cursor(self, rse: str) -> int:
        """Return the ``seq`` of the last event of ``rse`` consumed (0 if none).

        Parameters
        ----------
        rse : `str`
            One of the monitor's RSEs.

        Returns
        -------
        seq : `int`
            The cursor.
        """
        row = self._conn().execute("SELECT seq FROM cursor WHERE rse=?", (rse,)).fetchone()
        return int(row[0]) if row else 0

    def done(self, dids: Iterable[DID | str] | None = None) -> set[str]:
        """Return the DIDs (as strings) whose dataset is in the repository.

        Parameters
        ----------
        dids : iterable of `DID` or `str`, optional
            Only among these (default: every DID this monitor has seen ingested or present).

        Returns
        -------
        done : `set` [`str`]
            Ingested by this monitor or found already present.
        """
        rows = {r[0] for r in self._conn().execute("SELECT DISTINCT did FROM done")}
        return rows if dids is None else rows & {str(d) for d in dids}

    def problems(self, *, include_resolved: bool = False) -> list[tuple[str, str, str]]:
        """Return rejected files and failed transfers recorded so far.

        Parameters
        ----------
        include_resolved : `bool`, optional
            Also those a later event resolved (the file was ingested after all).

        Returns
        -------
        problems : `list` [`tuple` [`str`, `str`, `str`]]
            ``(DID, kind, reason)`` in event order; ``kind`` is ``rejected`` or
            ``transfer-failed``.
        """
        sql = "SELECT did, kind, reason FROM problems"
        if not include_resolved:
            sql += " WHERE resolved=0"
        return [(r[0], r[1], r[2]) for r in self._conn().execute(sql + " ORDER BY at, seq")]

    def rejected(self) -> list[tuple[str, str]]:
        """Return ``(DID, reason)`` of every unresolved rejected file (persisted)."""
        return [(d, why) for d, kind, why in self.problems() if kind == "rejected"]

    def _commit(self, rse: str, last_seq: int, batch: _Batch) -> None:
        now = time.time()
        with self._tx() as c:
            # Never move a cursor backwards: a monitor sharing this state file may be ahead.
            c.execute(
                "INSERT INTO cursor (rse, seq) VALUES (?, ?) "
                "ON CONFLICT DO UPDATE SET seq=MAX(seq, excluded.seq)",
                (rse, last_seq),
            )
            c.executemany(
                "INSERT INTO done (rse, did, dataset_id, outcome, seq, at) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT DO NOTHING",
                [(rse, did, dsid, outcome, seq, now) for did, dsid, outcome, seq in batch.done],
            )
            c.executemany(
                "INSERT OR IGNORE INTO problems (seq, rse, did, kind, reason, at) "
                "VALUES (?,?,?,?,?,?)",
                [(seq, rse, did, kind, why, now) for seq, did, kind, why in batch.problems],
            )
            # A file in the repository needs nothing more, whatever happened to it before
            # (or after: a late failure of a redundant transfer).
            c.execute(
                "UPDATE problems SET resolved=1 WHERE resolved=0 "
                "AND EXISTS (SELECT 1 FROM done d WHERE d.did=problems.did)"
            )

    # ------------------------------------------------------------------------------------------
    # Polling

    def poll(self, limit: int | None = None) -> IngestSummary:
        """Consume the new events of every RSE: verify and ingest arrived files.

        Parameters
        ----------
        limit : `int`, optional
            Consume at most this many events in total (default: all available).

        Returns
        -------
        summary : `IngestSummary`
            What happened to each consumed event.
        """
        summary = IngestSummary()
        remaining = limit
        with ExitStack() as stack:
            butler: Butler | None = None

            def get_butler() -> Butler:
                # Opened only when something must be ingested, fresh at each poll: a Butler's
                # caches go stale when another process (another monitor) writes.
                nonlocal butler
                if butler is None:
                    butler = stack.enter_context(open_repo(self.butler_uri, writeable=True))
                return butler

            for rse in self.rses:
                root = self.catalog.rse_root(rse)
                while remaining is None or remaining > 0:
                    n = self.batch_size if remaining is None else min(self.batch_size, remaining)
                    events = self.catalog.events(after_seq=self.cursor(rse), dst_rse=rse, limit=n)
                    if not events:
                        break
                    batch = self._process(root, events, get_butler)
                    self._commit(rse, events[-1].seq, batch)
                    summary.merge(batch.summary())
                    if remaining is not None:
                        remaining -= len(events)
                    if len(events) < n:
                        break
        for did, why in summary.rejected:
            _LOG.error("replica monitor: rejected %s: %s", did, why)
        for did, why in summary.failed_transfers:
            _LOG.warning("replica monitor: transfer of %s failed: %s", did, why)
        return summary

    def _process(
        self, root: Path, events: Sequence[TransferEvent], get_butler: Callable[[], Butler]
    ) -> _Batch:
        batch = _Batch()
        arrived: list[TransferEvent] = []
        for ev in events:
            did = f"{ev.payload.get('scope')}:{ev.payload.get('name')}"
            if ev.event_type == "transfer-done":
                if not ev.payload.get("rubin_butler"):
                    # Not a Butler file (e.g. a QuantumGraph shipped to the hub for
                    # provenance): nothing to ingest, and nothing wrong.
                    _LOG.debug("replica monitor: %s is not a Butler file; not ingested", did)
                    continue
                arrived.append(ev)
            elif ev.event_type == "transfer-failed":
                why = str(ev.payload.get("reason") or "no reason given")
                batch.problems.append((ev.seq, did, "transfer-failed", why))
            # Other event types (none today) are not ours: skipped, the cursor moves past them.
        if not arrived:
            return batch
        repo = self.repo_root.resolve()
        with ThreadPoolExecutor(max_workers=self.verify_threads) as pool:
            checks = list(pool.map(lambda ev: _verify(ev, root, repo), arrived))
        verified: list[tuple[TransferEvent, Path]] = []
        for ev, (did, path, why) in zip(arrived, checks, strict=True):
            if path is None:
                batch.problems.append((ev.seq, did, "rejected", why))
            else:
                verified.append((ev, path))
        if not verified:
            return batch
        butler = get_butler()
        candidates: list[_Candidate] = []
        twins: list[_Candidate] = []
        seen: set[Any] = set()
        for ev, path in verified:
            did = f"{ev.payload['scope']}:{ev.payload['name']}"
            try:
                ref = DatasetRef.from_json(str(ev.payload["rubin_sidecar"]),
                                           universe=butler.dimensions)  # fmt: skip
            except Exception as exc:  # any malformed sidecar is a rejection, not a crash
                batch.problems.append((ev.seq, did, "rejected", f"unusable rubin_sidecar: {exc}"))
                continue
            # The same dataset twice in one batch (an event delivered twice): ingest it once,
            # and give the second event the first one's outcome.
            (twins if ref.id in seen else candidates).append(_Candidate(ev.seq, did, path, ref))
            seen.add(ref.id)
        self._ingest(butler, candidates, batch)
        outcome = {dsid: "present" for _, dsid, _, _ in batch.done}
        by_did = {c.did: str(c.ref.id) for c in candidates}
        refused = {by_did[did]: why for _, did, _, why in batch.problems if did in by_did}
        for t in twins:
            dsid = str(t.ref.id)
            if dsid in outcome:
                batch.done.append((t.did, dsid, "present", t.seq))
            else:
                why = refused.get(dsid, "its dataset was not ingested from an earlier event")
                batch.problems.append((t.seq, t.did, "rejected", why))
        return batch

    def _ingest(self, butler: Butler, candidates: list[_Candidate], batch: _Batch) -> None:
        """Ingest verified files, sorting each into ingested, already present or rejected."""
        candidates = self._prepare(butler, candidates, batch)
        if not candidates:
            return
        # A whole batch in one transaction; a conflict (a concurrent monitor committed some of
        # them after we looked) rolls it back, and a second look finds them present. A conflict
        # that is not a race (nothing new is present: a different dataset under the same data
        # ID, a data ID the repository cannot hold) is isolated file by file, so one bad file
        # cannot hold up the others.
        conflicted = False
        while True:
            present, new = self._split_present(butler, candidates)
            batch.done.extend((c.did, str(c.ref.id), "present", c.seq) for c in present)
            candidates = new
            if not new:
                return
            if conflicted and not present:
                break
            try:
                self._butler_ingest(butler, new)
            except ConflictingDefinitionError as exc:
                _LOG.info("batch ingest conflicted (%s); looking again", exc)
                conflicted = True
                continue
            except _TRANSIENT:
                raise
            except Exception as exc:
                _LOG.info("batch ingest failed (%s); ingesting file by file", exc)
                break
            batch.done.extend((c.did, str(c.ref.id), "ingested", c.seq) for c in new)
            return
        for c in candidates:
            if self._split_present(butler, [c])[0]:
                batch.done.append((c.did, str(c.ref.id), "present", c.seq))
                continue
            try:
                self._butler_ingest(butler, [c])
            except _TRANSIENT:
                raise
            except Exception as exc:
                if self._split_present(butler, [c])[0]:  # a concurrent monitor won
                    batch.done.append((c.did, str(c.ref.id), "present", c.seq))
                else:
                    why = f"the repository refused it: {type(exc).__name__}: {exc}"
                    batch.problems.append((c.seq, c.did, "rejected", why))
                continue
            batch.done.append((c.did, str(c.ref.id), "ingested", c.seq))

    def _split_present(
        self, butler: Butler, candidates: list[_Candidate]
    ) -> tuple[list[_Candidate], list[_Candidate]]:
        """(already stored in the repository, not yet), asked of the repository itself."""
        stored = butler.stored_many([c.ref for c in candidates])
        present = [c for c in candidates if stored[c.ref]]
        return present, [c for c in candidates if not stored[c.ref]]

    @staticmethod
    def _butler_ingest(butler: Butler, candidates: list[_Candidate]) -> None:
        # transfer=None: the file is already at its place inside the datastore root; it is
        # recorded by its path relative to the root, as an internal file (not "direct", which
        # would record an absolute URI the datastore treats as external).
        datasets = [FileDataset(path=str(c.path), refs=[c.ref]) for c in candidates]
        butler.ingest(*datasets, transfer=None)

    def _prepare(
        self, butler: Butler, candidates: list[_Candidate], batch: _Batch
    ) -> list[_Candidate]:
        """Sync dimension records, dataset types and RUNs; drop (reject) what conflicts."""
        bad: dict[str, str] = {}
        try:
            self._sync_records(butler, candidates)
        except _TRANSIENT:
            raise
        except Exception:
            # Find the culprits one by one (the good records of the batch are in by then).
            for c in candidates:
                try:
                    self._sync_records(butler, [c])
                except _TRANSIENT:
                    raise
                except Exception as exc:
                    bad[f"did:{c.did}"] = f"cannot sync its dimension records: {exc}"
        for dataset_type in {c.ref.datasetType for c in candidates}:
            try:
                butler.registry.registerDatasetType(dataset_type)
            except ConflictingDefinitionError as exc:
                bad[f"type:{dataset_type.name}"] = f"dataset type conflicts: {exc}"
        for run in {c.ref.run for c in candidates}:
            try:
                register_run(butler, run)
            except _TRANSIENT:
                raise
            except Exception as exc:  # an existing non-RUN collection of that name
                bad[f"run:{run}"] = f"cannot register RUN {run!r}: {exc}"
        kept = []
        for c in candidates:
            why = (
                bad.get(f"did:{c.did}")
                or bad.get(f"type:{c.ref.datasetType.name}")
                or bad.get(f"run:{c.ref.run}")
            )
            if why:
                batch.problems.append((c.seq, c.did, "rejected", why))
            else:
                kept.append(c)
        return kept

    @staticmethod
    def _sync_records(butler: Butler, candidates: list[_Candidate]) -> None:
        """Insert the dimension records the sidecars carry (existing ones are kept as they are).

        A sidecar without records relies on the repository having them already.
        """
        universe = butler.dimensions
        records: dict[str, dict[Any, Any]] = defaultdict(dict)
        for c in candidates:
            data_id = c.ref.dataId
            if not data_id.hasRecords():
                continue
            for name in data_id.dimensions.elements:
                record = data_id.records[name]
                if record is not None and universe[name].has_own_table:
                    records[name].setdefault(record.dataId.required_values, record)
        # Foreign-key order, and skip_existing, as Butler.transfer_from does.
        for element in universe.sorted(records):
            butler.registry.insertDimensionData(
                element, *records[element.name].values(), skip_existing=True
            )


def _verify(ev: TransferEvent, root: Path, repo: Path) -> tuple[str, Path | None, str]:
    """Check an arrived file on disk: (DID, path inside the repository or None, reason)."""
    p = ev.payload
    did_text = f"{p.get('scope')}:{p.get('name')}"
    try:
        did = DID(str(p["scope"]), str(p["name"]))
    except (KeyError, ValueError) as exc:
        return did_text, None, f"malformed event: {exc}"
    if not p.get("rubin_sidecar"):
        return did_text, None, "no rubin_sidecar metadata: not a Butler dataset file"
    pfn = root / did.scope / did.name
    path = Path(os.path.realpath(pfn))
    if not path.is_relative_to(repo):
        return did_text, None, f"{pfn} is at {path}, outside the repository {repo}"
    try:
        size, adler = _size_and_adler32(path)
    except FileNotFoundError:
        return did_text, None, f"{pfn} does not exist"
    except OSError as exc:
        return did_text, None, f"cannot read {pfn}: {exc}"
    expected_size = int(p.get("bytes", -1))
    expected_adler = str(p.get("checksum-adler", "")).lower()
    if size != expected_size:
        return did_text, None, f"{pfn} has {size} bytes, the transfer reported {expected_size}"
    if adler != expected_adler:
        return did_text, None, f"{pfn} has adler32 {adler}, the transfer reported {expected_adler}"
    return did_text, path, ""


# ----------------------------------------------------------------------------------------------
# Waiting


def _file_dids(catalog: DataCatalog, dids: Iterable[DID | str]) -> set[str]:
    """File DIDs (strings) of files and datasets; unknown DIDs are kept (they may come later)."""
    out: set[str] = set()
    for d in dids:
        did = d if isinstance(d, DID) else DID.parse(d)
        try:
            out.update(str(f.did) for f in catalog.list_dataset_files(did))
        except DIDNotFound:
            out.add(str(did))
    return out


def wait_ingested(
    monitor: ReplicaMonitor,
    dids: Iterable[DID | str],
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    max_poll_s: float = 10.0,
    settle: Callable[[], object] | None = None,
    fail_fast: bool = True,
) -> IngestSummary:
    """Poll ``monitor`` until every file of ``dids`` is ingested in its repository.

    Closed loop: each round runs ``settle`` (e.g. the embedded catalog's ``process_transfers``;
    nothing for a real Rucio whose daemons run elsewhere), polls the monitor and checks the
    files; the delay between rounds doubles while nothing arrives (up to ``max_poll_s``) and
    drops back to ``poll_s`` when something does.

    Parameters
    ----------
    monitor : `ReplicaMonitor`
        The destination site's monitor.
    dids : iterable of `DID` or `str`
        Files or datasets (a dataset stands for its files, re-listed every round).
    timeout_s : `float`
        Give up after this long.
    poll_s : `float`, optional
        First delay between rounds.
    max_poll_s : `float`, optional
        Longest delay between rounds.
    settle : callable, optional
        Called at the start of every round.
    fail_fast : `bool`, optional
        Raise `IngestFailed` as soon as a wanted file is rejected or its transfer failed
        (default), rather than wait for a repair until the timeout.

    Returns
    -------
    summary : `IngestSummary`
        Everything the monitor did while waiting.

    Raises
    ------
    IngestFailed
        A wanted file was rejected or its transfer failed (``fail_fast``).
    IngestTimeout
        Files still missing at the deadline; they are named.
    """
    wanted = list(dids)
    total = IngestSummary()
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    where = f"{monitor.repo_root} ({', '.join(monitor.rses)})"
    while True:
        if settle is not None:
            settle()
        got = monitor.poll()
        total.merge(got)
        files = _file_dids(monitor.catalog, wanted)
        missing = files - monitor.done(files)
        if not missing:
            return total
        if fail_fast:
            failures = {d: f"{kind}: {why}" for d, kind, why in monitor.problems() if d in missing}
            if failures:
                raise IngestFailed(failures)
        left = deadline - time.monotonic()
        if left <= 0:
            raise IngestTimeout(missing, timeout_s, where)
        delay = poll_s if got.events else min(2 * delay, max_poll_s)
        time.sleep(min(delay, left))
