"""Embedded data catalog: Rucio's semantics in one SQLite file, and a verifying copy worker.

The catalog lives in ``<directory>/catalog.sqlite3`` in WAL mode, so several processes (flows,
the Replica Monitor, a transfer worker) can share it: reads run in deferred transactions (a
consistent snapshot), writes in ``BEGIN IMMEDIATE`` ones (the write lock is taken up front, so two
writers never deadlock upgrading a read lock). Each thread has its own connection.

Rules are evaluated as Rucio's judge does: every (rule, file) gets ``copies`` locks on RSEs of the
rule's expression (preferring RSEs that already hold the file); a lock on an RSE without an
AVAILABLE replica creates a COPYING replica and a transfer request there. Files attached after a
rule get their locks when attached (and on every `EmbeddedCatalog.evaluate`).

`EmbeddedCatalog.process_transfers` plays conveyor + FTS: it claims due requests whose source is
available, copies each file to a temporary name beside its destination while computing adler32,
checks size and checksum against the catalog, fsyncs and renames atomically, and only then marks
the replica AVAILABLE and appends a ``transfer-done`` event. Failures are retried with exponential
backoff; after ``max_attempts`` the request is STUCK (its rules too) with a ``transfer-failed``
event giving the reason, until `EmbeddedCatalog.repair` re-queues it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..interfaces import (
    BLOCK_SIZE,
    DID,
    CatalogError,
    CatalogFile,
    DataCatalog,
    DIDInfo,
    DIDNotFound,
    DIDType,
    DuplicateDID,
    FileReplica,
    NewFile,
    ReplicaState,
    RSENotFound,
    Rule,
    RuleNotFound,
    RuleState,
    ScopeNotFound,
    TransferEvent,
    file_adler32,
    parse_rse_expression,
)
from ..sqlite_state import ThreadLocalSQLite

__all__ = ["EmbeddedCatalog", "TransferSummary"]

_LOG = logging.getLogger(__name__)

DB_NAME = "catalog.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rses (name TEXT PRIMARY KEY, root TEXT NOT NULL);
-- Rucio's availability_write, for the RSEs an operator made read-only (absent: writable).
CREATE TABLE IF NOT EXISTS rse_readonly (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS scopes (scope TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS dids (
    scope TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,
    bytes INTEGER, adler32 TEXT, meta TEXT NOT NULL DEFAULT '{}', open INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, name));
CREATE TABLE IF NOT EXISTS contents (
    ds_scope TEXT NOT NULL, ds_name TEXT NOT NULL, scope TEXT NOT NULL, name TEXT NOT NULL,
    PRIMARY KEY (ds_scope, ds_name, scope, name));
CREATE TABLE IF NOT EXISTS replicas (
    scope TEXT NOT NULL, name TEXT NOT NULL, rse TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (scope, name, rse));
CREATE TABLE IF NOT EXISTS rules (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, name TEXT NOT NULL, rse_expression TEXT NOT NULL,
    copies INTEGER NOT NULL, source_expression TEXT, created REAL NOT NULL,
    UNIQUE (scope, name, rse_expression));
CREATE TABLE IF NOT EXISTS locks (
    rule_id TEXT NOT NULL, scope TEXT NOT NULL, name TEXT NOT NULL, rse TEXT NOT NULL,
    PRIMARY KEY (rule_id, scope, name, rse));
CREATE INDEX IF NOT EXISTS locks_by_replica ON locks (scope, name, rse);
-- One request per (file, destination RSE), shared by every lock that needs it.
-- state: QUEUED (due at next_attempt), ACTIVE (claimed by a worker), STUCK.
CREATE TABLE IF NOT EXISTS requests (
    scope TEXT NOT NULL, name TEXT NOT NULL, rse TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
    claimed_at REAL, error TEXT, claimed_by TEXT,
    PRIMARY KEY (scope, name, rse));
CREATE INDEX IF NOT EXISTS requests_by_state ON requests (state, next_attempt);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, event_type TEXT NOT NULL, dst_rse TEXT NOT NULL,
    payload TEXT NOT NULL, created REAL NOT NULL);
"""


def _owner() -> str:
    """Who claims a request: this host and process (see `EmbeddedCatalog._release_dead_claims`)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class TransferSummary:
    """What one `EmbeddedCatalog.process_transfers` call did."""

    done: int = 0
    failed_attempts: int = 0  # failures that will be retried
    stuck: int = 0  # requests that exhausted their attempts in this call
    waiting: int = 0  # requests left queued (source not yet available, or retry not yet due)


@dataclass(frozen=True)
class _Job:
    """One claimed transfer, with everything the copy needs (no database access in threads)."""

    did: DID
    dst_rse: str
    src_rse: str | None  # None: no source replica exists, fail without copying
    src_path: Path | None
    dst_path: Path
    bytes: int
    adler32: str
    meta: Mapping[str, Any]
    reason: str = ""


class EmbeddedCatalog:
    """A `~drp_campaign.backends.interfaces.DataCatalog` in SQLite, with a transfer worker.

    Parameters
    ----------
    directory : `pathlib.Path`
        Directory holding ``catalog.sqlite3`` (created if needed).
    max_attempts : `int`
        Failed attempts after which a transfer request (and its rules) is STUCK.
    retry_base_delay_s : `float`
        Delay before the first retry; doubled at each further failure.
    retry_max_delay_s : `float`
        Upper bound of the retry delay.
    concurrency : `int`
        Default number of parallel copies in `process_transfers`.
    verify_checksum_on_register : `bool`
        Also checksum files when registering them (size and existence are always checked);
        off by default because it reads every byte.
    claim_timeout_s : `float`
        A request claimed longer ago than this (its worker died) is re-queued by `repair`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_attempts: int = 3,
        retry_base_delay_s: float = 1.0,
        retry_max_delay_s: float = 60.0,
        concurrency: int = 4,
        verify_checksum_on_register: bool = False,
        claim_timeout_s: float = 3600.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {max_attempts}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DB_NAME
        self.max_attempts = max_attempts
        self.retry_base_delay_s = retry_base_delay_s
        self.retry_max_delay_s = retry_max_delay_s
        self.concurrency = concurrency
        self.verify_checksum_on_register = verify_checksum_on_register
        self.claim_timeout_s = claim_timeout_s
        # NORMAL in WAL: consistent after any crash; a power loss may roll back the last
        # commits, which only re-queues transfers (files are re-verified, never trusted).
        self._db = ThreadLocalSQLite(self.path, synchronous="NORMAL")
        conn = self._conn()
        # WAL lets readers proceed while one process writes; it is a property of the file, so
        # setting it once here holds for every later connection.
        conn.execute("PRAGMA journal_mode=WAL")
        # executescript commits any open transaction first, so the script brings its own.
        conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        columns = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        if "claimed_by" not in columns:  # a catalog created before claims were owned
            conn.execute("ALTER TABLE requests ADD COLUMN claimed_by TEXT")

    # ------------------------------------------------------------------------------------------
    # Connections and transactions

    def _conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def _tx(self, begin: str) -> AbstractContextManager[sqlite3.Connection]:
        return self._db.transaction(begin)

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._tx("BEGIN")

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._tx("BEGIN IMMEDIATE")

    def close_connection(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        self._db.close()

    # ------------------------------------------------------------------------------------------
    # Lookups used inside transactions

    @staticmethod
    def _root(c: sqlite3.Connection, rse: str) -> Path:
        row = c.execute("SELECT root FROM rses WHERE name=?", (rse,)).fetchone()
        if row is None:
            raise RSENotFound(f"RSE {rse!r} not found")
        return Path(row["root"])

    @classmethod
    def _check_expression(cls, c: sqlite3.Connection, expression: str) -> tuple[str, ...]:
        rses = parse_rse_expression(expression)
        for rse in rses:
            if c.execute("SELECT 1 FROM rses WHERE name=?", (rse,)).fetchone() is None:
                raise RSENotFound(f"RSE {rse!r} (in expression {expression!r}) not found")
        return rses

    @staticmethod
    def _did_row(c: sqlite3.Connection, did: DID) -> sqlite3.Row:
        row = c.execute("SELECT * FROM dids WHERE scope=? AND name=?", (did.scope, did.name))
        found = row.fetchone()
        if found is None:
            raise DIDNotFound(f"DID {did} not found")
        return found

    @classmethod
    def _files_of(cls, c: sqlite3.Connection, did: DID) -> list[sqlite3.Row]:
        row = cls._did_row(c, did)
        if row["type"] == DIDType.FILE:
            return [row]
        return c.execute(
            "SELECT d.* FROM contents x JOIN dids d ON d.scope=x.scope AND d.name=x.name "
            "WHERE x.ds_scope=? AND x.ds_name=? ORDER BY d.scope, d.name",
            (did.scope, did.name),
        ).fetchall()

    # ------------------------------------------------------------------------------------------
    # RSEs and scopes

    def add_rse(self, name: str, root: Path) -> None:
        """Declare an RSE whose storage is the directory ``root`` (idempotent).

        Parameters
        ----------
        name : `str`
            RSE name (see `~drp_campaign.backends.interfaces.rse_name`).
        root : `pathlib.Path`
            Storage root, created if missing; a file's PFN is ``root/<scope>/<name>``.

        Raises
        ------
        CatalogError
            If the RSE exists with another root.
        """
        parse_rse_expression(name)  # validates the name
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        with self._write() as c:
            row = c.execute("SELECT root FROM rses WHERE name=?", (name,)).fetchone()
            if row is not None and Path(row["root"]) != root:
                raise CatalogError(f"RSE {name!r} already exists with root {row['root']}")
            c.execute("INSERT OR IGNORE INTO rses (name, root) VALUES (?, ?)", (name, str(root)))

    def rse_root(self, name: str) -> Path:
        """The storage root of an RSE.

        Parameters
        ----------
        name : `str`
            RSE name.

        Returns
        -------
        root : `pathlib.Path`
            Its storage root.
        """
        with self._read() as c:
            return self._root(c, name)

    def list_rses(self) -> list[str]:
        """Names of all RSEs, sorted."""
        with self._read() as c:
            return [r["name"] for r in c.execute("SELECT name FROM rses ORDER BY name")]

    def rse_writable(self, name: str) -> bool:
        """Whether an RSE accepts new replicas (see `set_rse_writable`).

        Parameters
        ----------
        name : `str`
            RSE name.

        Returns
        -------
        writable : `bool`

        Raises
        ------
        RSENotFound
            If there is no such RSE.
        """
        with self._read() as c:
            self._root(c, name)
            return c.execute("SELECT 1 FROM rse_readonly WHERE name=?", (name,)).fetchone() is None

    def set_rse_writable(self, name: str, writable: bool) -> None:
        """Make an RSE read-only, or writable again (Rucio's ``availability_write``).

        The flag is what preflight reads; the embedded transfer worker does not refuse a
        read-only RSE (Rucio's rule engine does).

        Parameters
        ----------
        name : `str`
            RSE name.
        writable : `bool`
            The new setting.
        """
        with self._write() as c:
            self._root(c, name)
            if writable:
                c.execute("DELETE FROM rse_readonly WHERE name=?", (name,))
            else:
                c.execute("INSERT OR IGNORE INTO rse_readonly (name) VALUES (?)", (name,))

    def whoami(self) -> str:
        """The embedded catalog needs no account: its database, which answered."""
        with self._read() as c:
            c.execute("SELECT 1").fetchone()
        return f"embedded catalog {self.path}"

    def add_scope(self, scope: str) -> None:
        """Declare a scope (idempotent).

        Parameters
        ----------
        scope : `str`
            Scope name.
        """
        DID(scope, "x")  # validates the scope
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO scopes (scope) VALUES (?)", (scope,))

    # ------------------------------------------------------------------------------------------
    # DIDs

    def register_replicas(self, rse: str, files: Sequence[NewFile]) -> None:
        """Register files already present in ``rse``'s storage as AVAILABLE replicas there.

        Parameters
        ----------
        rse : `str`
            The RSE holding the files at ``<root>/<scope>/<name>``.
        files : `~collections.abc.Sequence` [`NewFile`]
            The files with size, adler32 and metadata.

        Raises
        ------
        RSENotFound, ScopeNotFound, DuplicateDID, CatalogError
            Unknown RSE or scope, a different file under an existing name, or a file missing
            from storage or of the wrong size (or checksum, when configured to check it).
        """
        with self._read() as c:
            root = self._root(c, rse)
        # Check storage before taking the write lock: stat (and checksumming) can be slow.
        for f in files:
            did = f.did
            path = root / did.scope / did.name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CatalogError(
                    f"cannot register {did} at {rse}: {path} does not exist"
                ) from None
            if size != f.bytes:
                raise CatalogError(
                    f"cannot register {did} at {rse}: {path} has {size} bytes, not {f.bytes}"
                )
            if self.verify_checksum_on_register:
                actual = file_adler32(path)
                if actual != f.adler32.lower():
                    raise CatalogError(
                        f"cannot register {did} at {rse}: {path} has adler32 {actual}, "
                        f"not {f.adler32}"
                    )
        with self._write() as c:
            self._root(c, rse)
            for f in files:
                did = f.did
                if c.execute("SELECT 1 FROM scopes WHERE scope=?", (did.scope,)).fetchone() is None:
                    raise ScopeNotFound(f"scope {did.scope!r} of {did} not found")
                row = c.execute(
                    "SELECT type, bytes, adler32 FROM dids WHERE scope=? AND name=?",
                    (did.scope, did.name),
                ).fetchone()
                adler = f.adler32.lower()
                if row is None:
                    c.execute(
                        "INSERT INTO dids (scope, name, type, bytes, adler32, meta) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (did.scope, did.name, DIDType.FILE.value, f.bytes, adler,
                         json.dumps(dict(f.meta))),
                    )  # fmt: skip
                elif row["type"] != DIDType.FILE or (row["bytes"], row["adler32"]) != (
                    f.bytes,
                    adler,
                ):
                    raise DuplicateDID(
                        f"{did} already exists as {row['type']} ({row['bytes']} bytes, adler32 "
                        f"{row['adler32']}); cannot register {f.bytes} bytes, adler32 {adler}"
                    )
                # The file is in storage: the replica is AVAILABLE, whatever a transfer thought.
                c.execute(
                    "INSERT INTO replicas (scope, name, rse, state) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO UPDATE SET state=excluded.state",
                    (did.scope, did.name, rse, ReplicaState.AVAILABLE.value),
                )
                c.execute(
                    "DELETE FROM requests WHERE scope=? AND name=? AND rse=? AND state!='ACTIVE'",
                    (did.scope, did.name, rse),
                )

    def add_dataset(self, did: DID, meta: Mapping[str, Any] | None = None) -> None:
        """Create an open dataset (idempotent).

        Parameters
        ----------
        did : `DID`
            The dataset.
        meta : `~collections.abc.Mapping`, optional
            Its metadata.

        Raises
        ------
        ScopeNotFound, DuplicateDID
            Unknown scope, or a file already has this DID.
        """
        with self._write() as c:
            if c.execute("SELECT 1 FROM scopes WHERE scope=?", (did.scope,)).fetchone() is None:
                raise ScopeNotFound(f"scope {did.scope!r} of {did} not found")
            row = c.execute(
                "SELECT type FROM dids WHERE scope=? AND name=?", (did.scope, did.name)
            ).fetchone()
            if row is not None:
                if row["type"] != DIDType.DATASET:
                    raise DuplicateDID(f"{did} already exists as a {row['type']}")
                return
            c.execute(
                "INSERT INTO dids (scope, name, type, meta, open) VALUES (?, ?, ?, ?, 1)",
                (did.scope, did.name, DIDType.DATASET.value, json.dumps(dict(meta or {}))),
            )

    def attach(self, dataset: DID, files: Sequence[DID]) -> None:
        """Attach registered files to an open dataset; attaching twice is a no-op.

        Rules on the dataset get locks for the new files in the same transaction.

        Parameters
        ----------
        dataset : `DID`
            An open dataset.
        files : `~collections.abc.Sequence` [`DID`]
            Registered files.

        Raises
        ------
        DIDNotFound, CatalogError
            Unknown dataset or file, not a dataset, or a closed dataset.
        """
        with self._write() as c:
            row = self._did_row(c, dataset)
            if row["type"] != DIDType.DATASET:
                raise CatalogError(f"cannot attach to {dataset}: it is a {row['type']}")
            new = []
            for f in files:
                frow = self._did_row(c, f)
                if frow["type"] != DIDType.FILE:
                    raise CatalogError(f"cannot attach {f} to {dataset}: only files may be")
                exists = c.execute(
                    "SELECT 1 FROM contents WHERE ds_scope=? AND ds_name=? AND scope=? AND name=?",
                    (dataset.scope, dataset.name, f.scope, f.name),
                ).fetchone()
                if exists is None:
                    new.append(f)
            if new and not row["open"]:
                raise CatalogError(f"cannot attach {len(new)} file(s) to {dataset}: it is closed")
            c.executemany(
                "INSERT INTO contents (ds_scope, ds_name, scope, name) VALUES (?, ?, ?, ?)",
                [(dataset.scope, dataset.name, f.scope, f.name) for f in new],
            )
            if new:
                self._evaluate(c, dataset)

    def close(self, dataset: DID) -> None:
        """Close a dataset (idempotent).

        Parameters
        ----------
        dataset : `DID`
            The dataset.
        """
        with self._write() as c:
            row = self._did_row(c, dataset)
            if row["type"] != DIDType.DATASET:
                raise CatalogError(f"cannot close {dataset}: it is a {row['type']}")
            c.execute(
                "UPDATE dids SET open=0 WHERE scope=? AND name=?", (dataset.scope, dataset.name)
            )

    def get_did(self, did: DID) -> DIDInfo:
        """Type, open state, size and checksum of a DID.

        Parameters
        ----------
        did : `DID`
            File or dataset.

        Returns
        -------
        info : `DIDInfo`
            What the catalog holds about it.
        """
        with self._read() as c:
            row = self._did_row(c, did)
        return DIDInfo(did, DIDType(row["type"]), bool(row["open"]), row["bytes"], row["adler32"])

    def get_metadata(self, did: DID) -> dict[str, Any]:
        """The user metadata of a DID.

        Parameters
        ----------
        did : `DID`
            File or dataset.

        Returns
        -------
        meta : `dict`
            A copy of its metadata.
        """
        with self._read() as c:
            return dict(json.loads(self._did_row(c, did)["meta"]))

    def list_dataset_files(self, did: DID) -> list[CatalogFile]:
        """Files of a dataset, sorted by DID (a file DID lists itself).

        Parameters
        ----------
        did : `DID`
            File or dataset.

        Returns
        -------
        files : `list` [`CatalogFile`]
            Its files.
        """
        with self._read() as c:
            rows = self._files_of(c, did)
        return [CatalogFile(r["scope"], r["name"], r["bytes"], r["adler32"]) for r in rows]

    def list_replicas(self, did: DID) -> list[FileReplica]:
        """Every replica, in any state, of the file or of every file of the dataset.

        Parameters
        ----------
        did : `DID`
            File or dataset.

        Returns
        -------
        replicas : `list` [`FileReplica`]
            Sorted by DID then RSE.
        """
        out = []
        with self._read() as c:
            roots = {r["name"]: Path(r["root"]) for r in c.execute("SELECT * FROM rses")}
            for f in self._files_of(c, did):
                for r in c.execute(
                    "SELECT rse, state FROM replicas WHERE scope=? AND name=? ORDER BY rse",
                    (f["scope"], f["name"]),
                ):
                    out.append(
                        FileReplica(
                            f["scope"], f["name"], f["bytes"], f["adler32"], r["rse"],
                            ReplicaState(r["state"]),
                            roots[r["rse"]] / f["scope"] / f["name"],
                        )
                    )  # fmt: skip
        return out

    # ------------------------------------------------------------------------------------------
    # Rules

    def add_rule(
        self,
        did: DID,
        rse_expression: str,
        copies: int = 1,
        source_replica_expression: str | None = None,
    ) -> str:
        """Ask for ``copies`` replicas of every file of ``did`` on ``rse_expression``.

        Idempotent: an existing rule with the same DID and RSE expression is returned unchanged
        (its copies and source expression are kept).

        Parameters
        ----------
        did : `DID`
            File or dataset.
        rse_expression : `str`
            Destination RSEs: a name or ``A|B``.
        copies : `int`
            Replicas per file, each on a different RSE of the expression.
        source_replica_expression : `str`, optional
            Copy only from these RSEs; transfers wait until one of them has the file.

        Returns
        -------
        rule_id : `str`
            The rule's id.

        Raises
        ------
        DIDNotFound, RSENotFound, CatalogError
            Unknown DID or RSE, or more copies than RSEs in the expression.
        """
        with self._write() as c:
            self._did_row(c, did)
            rses = self._check_expression(c, rse_expression)
            if source_replica_expression is not None:
                self._check_expression(c, source_replica_expression)
            if not 1 <= copies <= len(rses):
                raise CatalogError(
                    f"rule on {did}: cannot make {copies} copies on {rse_expression!r} "
                    f"({len(rses)} RSE(s))"
                )
            row = c.execute(
                "SELECT id FROM rules WHERE scope=? AND name=? AND rse_expression=?",
                (did.scope, did.name, rse_expression),
            ).fetchone()
            if row is not None:
                return str(row["id"])
            rule_id = uuid.uuid4().hex
            c.execute(
                "INSERT INTO rules (id, scope, name, rse_expression, copies, source_expression, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rule_id, did.scope, did.name, rse_expression, copies, source_replica_expression,
                 time.time()),
            )  # fmt: skip
            self._evaluate_rule(c, rule_id)
            return rule_id

    def get_rule(self, rule_id: str) -> Rule:
        """A rule with its current state and lock counts.

        Parameters
        ----------
        rule_id : `str`
            The rule's id.

        Returns
        -------
        rule : `Rule`
            The rule.
        """
        with self._read() as c:
            row = c.execute("SELECT * FROM rules WHERE id=?", (rule_id,)).fetchone()
            if row is None:
                raise RuleNotFound(f"rule {rule_id!r} not found")
            return self._rule(c, row)

    def list_rules(self, did: DID | None = None) -> list[Rule]:
        """Rules on ``did``, or every rule, oldest first.

        Parameters
        ----------
        did : `DID`, optional
            Only rules on this DID.

        Returns
        -------
        rules : `list` [`Rule`]
            The rules.
        """
        with self._read() as c:
            if did is None:
                rows = c.execute("SELECT * FROM rules ORDER BY created").fetchall()
            else:
                rows = c.execute(
                    "SELECT * FROM rules WHERE scope=? AND name=? ORDER BY created",
                    (did.scope, did.name),
                ).fetchall()
            return [self._rule(c, r) for r in rows]

    @staticmethod
    def _rule(c: sqlite3.Connection, row: sqlite3.Row) -> Rule:
        # Lock states are derived, never stored: OK iff the replica is AVAILABLE, STUCK iff its
        # request is, so a lock can never disagree with what is on disk and in the catalog.
        counts = c.execute(
            "SELECT "
            " SUM(CASE WHEN r.state='AVAILABLE' THEN 1 ELSE 0 END) AS ok,"
            " SUM(CASE WHEN r.state IS NOT 'AVAILABLE' AND q.state='STUCK' THEN 1 ELSE 0 END)"
            "  AS stuck,"
            " COUNT(*) AS n, MAX(CASE WHEN q.state='STUCK' THEN q.error END) AS error "
            "FROM locks l "
            "LEFT JOIN replicas r ON r.scope=l.scope AND r.name=l.name AND r.rse=l.rse "
            "LEFT JOIN requests q ON q.scope=l.scope AND q.name=l.name AND q.rse=l.rse "
            "WHERE l.rule_id=?",
            (row["id"],),
        ).fetchone()
        ok, stuck, n = counts["ok"] or 0, counts["stuck"] or 0, counts["n"] or 0
        replicating = n - ok - stuck
        state = RuleState.STUCK if stuck else RuleState.REPLICATING if replicating else RuleState.OK
        return Rule(
            id=row["id"],
            did=DID(row["scope"], row["name"]),
            rse_expression=row["rse_expression"],
            copies=row["copies"],
            source_replica_expression=row["source_expression"],
            state=state,
            locks_ok=ok,
            locks_replicating=replicating,
            locks_stuck=stuck,
            error=counts["error"] if stuck else None,
        )

    def evaluate(self) -> None:
        """Give every rule locks for files attached since it was last evaluated.

        `attach` already does this; it is repeated here (and at the start of
        `process_transfers`) so a catalog written by other means converges too.
        """
        with self._write() as c:
            for row in c.execute("SELECT id FROM rules").fetchall():
                self._evaluate_rule(c, row["id"])

    def _evaluate(self, c: sqlite3.Connection, did: DID) -> None:
        rows = c.execute(
            "SELECT id FROM rules WHERE scope=? AND name=?", (did.scope, did.name)
        ).fetchall()
        for row in rows:
            self._evaluate_rule(c, row["id"])

    def _evaluate_rule(self, c: sqlite3.Connection, rule_id: str) -> None:
        rule = c.execute("SELECT * FROM rules WHERE id=?", (rule_id,)).fetchone()
        did = DID(rule["scope"], rule["name"])
        rses = parse_rse_expression(rule["rse_expression"])
        for f in self._files_of(c, did):
            has = c.execute(
                "SELECT 1 FROM locks WHERE rule_id=? AND scope=? AND name=?",
                (rule_id, f["scope"], f["name"]),
            ).fetchone()
            if has is not None:
                continue
            states = {
                r["rse"]: r["state"]
                for r in c.execute(
                    "SELECT rse, state FROM replicas WHERE scope=? AND name=?",
                    (f["scope"], f["name"]),
                )
            }
            # Prefer RSEs already holding the file, then those receiving it: no needless copies.
            rank = {ReplicaState.AVAILABLE.value: 0, ReplicaState.COPYING.value: 1}
            chosen = sorted(rses, key=lambda r: (rank.get(states.get(r, ""), 2), rses.index(r)))
            for rse in chosen[: rule["copies"]]:
                c.execute(
                    "INSERT INTO locks (rule_id, scope, name, rse) VALUES (?, ?, ?, ?)",
                    (rule_id, f["scope"], f["name"], rse),
                )
                if states.get(rse) == ReplicaState.AVAILABLE:
                    continue
                c.execute(
                    "INSERT OR IGNORE INTO replicas (scope, name, rse, state) VALUES (?, ?, ?, ?)",
                    (f["scope"], f["name"], rse, ReplicaState.COPYING.value),
                )
                c.execute(
                    "INSERT OR IGNORE INTO requests (scope, name, rse, state) "
                    "VALUES (?, ?, ?, 'QUEUED')",
                    (f["scope"], f["name"], rse),
                )

    # ------------------------------------------------------------------------------------------
    # Events

    def events(
        self, after_seq: int = 0, dst_rse: str | None = None, limit: int | None = None
    ) -> list[TransferEvent]:
        """Transfer events with ``seq > after_seq``, oldest first.

        Parameters
        ----------
        after_seq : `int`
            The last ``seq`` already consumed.
        dst_rse : `str`, optional
            Only events for this destination RSE.
        limit : `int`, optional
            At most this many.

        Returns
        -------
        events : `list` [`TransferEvent`]
            The events.
        """
        sql = "SELECT * FROM events WHERE seq > ?"
        args: list[Any] = [after_seq]
        if dst_rse is not None:
            sql += " AND dst_rse = ?"
            args.append(dst_rse)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._read() as c:
            rows = c.execute(sql, args).fetchall()
        return [TransferEvent(r["seq"], r["event_type"], json.loads(r["payload"])) for r in rows]

    @staticmethod
    def _append_event(c: sqlite3.Connection, event_type: str, job: _Job, reason: str) -> None:
        payload: dict[str, Any] = {
            "scope": job.did.scope,
            "name": job.did.name,
            "dst-rse": job.dst_rse,
            "dst-url": job.dst_path.as_uri(),
            "src-rse": job.src_rse,
            "bytes": job.bytes,
            "checksum-adler": job.adler32,
            "rubin_butler": job.meta.get("rubin_butler"),
            "rubin_sidecar": job.meta.get("rubin_sidecar"),
        }
        if event_type == "transfer-failed":
            payload["reason"] = reason
        c.execute(
            "INSERT INTO events (event_type, dst_rse, payload, created) VALUES (?, ?, ?, ?)",
            (event_type, job.dst_rse, json.dumps(payload), time.time()),
        )

    # ------------------------------------------------------------------------------------------
    # Transfers

    def repair(self) -> int:
        """Re-queue STUCK requests (and requests claimed by a worker that died).

        Call it once the cause (a missing or corrupt source) is fixed; the next
        `process_transfers` retries them from scratch.

        Returns
        -------
        n : `int`
            Requests re-queued.
        """
        stale = time.time() - self.claim_timeout_s
        with self._write() as c:
            cur = c.execute(
                "UPDATE requests SET state='QUEUED', attempts=0, next_attempt=0, error=NULL, "
                "claimed_at=NULL WHERE state='STUCK' OR (state='ACTIVE' AND claimed_at < ?)",
                (stale,),
            )
            return cur.rowcount

    def process_transfers(
        self,
        max_files: int | None = None,
        concurrency: int | None = None,
        wait_for_retries: bool = True,
    ) -> TransferSummary:
        """Copy every due transfer, verified, until nothing more can progress now.

        Chained transfers start as soon as their source replica becomes AVAILABLE in this call.

        Parameters
        ----------
        max_files : `int`, optional
            Stop after this many attempts.
        concurrency : `int`, optional
            Parallel copies (default: the catalog's).
        wait_for_retries : `bool`
            Sleep until failed transfers are due again rather than return with them queued.

        Returns
        -------
        summary : `TransferSummary`
            Counts of what happened.
        """
        workers = concurrency or self.concurrency
        self.evaluate()
        self._release_dead_claims()
        done = failed = stuck = attempted = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transfer") as pool:
            running: dict[Future[str | None], _Job] = {}
            while True:
                room = 2 * workers - len(running)
                if max_files is not None:
                    room = min(room, max_files - attempted)
                jobs = self._claim(room) if room > 0 else []
                for job in jobs:
                    running[pool.submit(_copy, job)] = job
                attempted += len(jobs)
                if not running:
                    delay = None if not wait_for_retries else self._next_retry_in()
                    if delay is None or (max_files is not None and attempted >= max_files):
                        break
                    time.sleep(delay)
                    continue
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = running.pop(fut)
                    try:
                        error = fut.result()
                    except Exception as exc:  # a bug in _copy must not lose the request
                        error = f"unexpected error: {exc!r}"
                    outcome = self._record(job, error)
                    done += outcome == "done"
                    failed += outcome == "retry"
                    stuck += outcome == "stuck"
        with self._read() as c:
            waiting = c.execute("SELECT COUNT(*) FROM requests WHERE state='QUEUED'").fetchone()[0]
        return TransferSummary(done, failed, stuck, waiting)

    def _release_dead_claims(self) -> int:
        """Re-queue requests claimed by a worker process of this host that no longer exists.

        A worker killed mid-copy (SIGKILL, a lost node) leaves its requests ACTIVE; without
        this a resumed campaign would wait ``claim_timeout_s`` for them. Copies are atomic
        (temporary name, rename), so a copy the dead worker half made is simply redone.
        """
        from ...ledger import pid_alive

        me = _owner()
        host = me.split(":")[0]
        with self._write() as c:
            owners = [
                r[0]
                for r in c.execute(
                    "SELECT DISTINCT claimed_by FROM requests "
                    "WHERE state='ACTIVE' AND claimed_by IS NOT NULL"
                )
            ]
            dead = [
                o
                for o in owners
                if o.split(":")[0] == host and o != me and not pid_alive(int(o.split(":")[1]))
            ]
            n = 0
            for owner in dead:
                n += c.execute(
                    "UPDATE requests SET state='QUEUED', claimed_at=NULL, claimed_by=NULL "
                    "WHERE state='ACTIVE' AND claimed_by=?",
                    (owner,),
                ).rowcount
        if n:
            _LOG.warning("re-queued %d transfer(s) claimed by dead worker(s) %s", n, dead)
        return n

    def _next_retry_in(self) -> float | None:
        """Seconds until the earliest failed request is due again, if any is."""
        now = time.time()
        with self._read() as c:
            row = c.execute(
                "SELECT MIN(next_attempt) FROM requests WHERE state='QUEUED' AND next_attempt > ?",
                (now,),
            ).fetchone()
        return None if row[0] is None else max(0.0, row[0] - now)

    def _claim(self, limit: int) -> list[_Job]:
        """Claim up to ``limit`` due requests whose source exists; build their jobs."""
        jobs: list[_Job] = []
        now = time.time()
        with self._write() as c:
            roots = {r["name"]: Path(r["root"]) for r in c.execute("SELECT * FROM rses")}
            candidates = c.execute(
                "SELECT q.scope, q.name, q.rse, q.attempts, d.bytes, d.adler32, d.meta "
                "FROM requests q "
                "JOIN dids d ON d.scope=q.scope AND d.name=q.name "
                "WHERE q.state='QUEUED' AND q.next_attempt <= ? ORDER BY q.next_attempt",
                (now,),
            ).fetchall()
            for q in candidates:
                if len(jobs) >= limit:
                    break
                did = DID(q["scope"], q["name"])
                sources = self._sources(c, did, q["rse"])
                replicas = {
                    r["rse"]: r["state"]
                    for r in c.execute(
                        "SELECT rse, state FROM replicas WHERE scope=? AND name=? AND rse != ?",
                        (did.scope, did.name, q["rse"]),
                    )
                    if sources is None or r["rse"] in sources
                }
                order = sources if sources is not None else tuple(sorted(replicas))
                available = [r for r in order if replicas.get(r) == ReplicaState.AVAILABLE]
                common = dict(
                    did=did, dst_rse=q["rse"], dst_path=roots[q["rse"]] / did.scope / did.name,
                    bytes=q["bytes"], adler32=q["adler32"], meta=json.loads(q["meta"]),
                )  # fmt: skip
                if available:
                    # Each retry tries the next source: a site that went away (its storage
                    # unreachable) must not make every transfer it could source fail.
                    src = available[int(q["attempts"]) % len(available)]
                    job = _Job(src_rse=src, src_path=roots[src] / did.scope / did.name, **common)
                elif any(s == ReplicaState.COPYING for s in replicas.values()):
                    continue  # a chained source is on its way: wait, it is not a failure
                else:
                    where = "any RSE" if sources is None else "|".join(sources)
                    reason = f"no replica of {did} at {where} to copy from"
                    job = _Job(src_rse=None, src_path=None, reason=reason, **common)
                c.execute(
                    "UPDATE requests SET state='ACTIVE', claimed_at=?, claimed_by=? "
                    "WHERE scope=? AND name=? AND rse=?",
                    (now, _owner(), did.scope, did.name, q["rse"]),
                )
                jobs.append(job)
        return jobs

    @staticmethod
    def _sources(c: sqlite3.Connection, did: DID, rse: str) -> tuple[str, ...] | None:
        """RSEs a transfer may copy from: union of its rules' source expressions (None: any)."""
        rows = c.execute(
            "SELECT DISTINCT r.source_expression FROM locks l JOIN rules r ON r.id=l.rule_id "
            "WHERE l.scope=? AND l.name=? AND l.rse=?",
            (did.scope, did.name, rse),
        ).fetchall()
        exprs = [r[0] for r in rows]
        if not exprs or any(e is None for e in exprs):
            return None
        out: list[str] = []
        for e in exprs:
            out.extend(x for x in parse_rse_expression(e) if x not in out)
        return tuple(out)

    def _record(self, job: _Job, error: str | None) -> str:
        """Record a finished copy: 'done', 'retry' or 'stuck' (or 'lost' if no longer ours)."""
        key = (job.did.scope, job.did.name, job.dst_rse)
        with self._write() as c:
            row = c.execute(
                "SELECT attempts FROM requests WHERE scope=? AND name=? AND rse=? "
                "AND state='ACTIVE'",
                key,
            ).fetchone()
            if row is None:
                # Re-registered or repaired meanwhile: someone else owns the outcome now.
                return "lost"
            if error is None:
                c.execute(
                    "UPDATE replicas SET state='AVAILABLE' WHERE scope=? AND name=? AND rse=?", key
                )
                c.execute("DELETE FROM requests WHERE scope=? AND name=? AND rse=?", key)
                self._append_event(c, "transfer-done", job, "")
                return "done"
            attempts = row["attempts"] + 1
            _LOG.warning("transfer of %s to %s failed (attempt %d): %s", job.did, job.dst_rse,
                         attempts, error)  # fmt: skip
            if attempts >= self.max_attempts:
                c.execute(
                    "UPDATE requests SET state='STUCK', attempts=?, error=?, claimed_at=NULL "
                    "WHERE scope=? AND name=? AND rse=?",
                    (attempts, error, *key),
                )
                self._append_event(c, "transfer-failed", job, error)
                return "stuck"
            delay = min(self.retry_max_delay_s, self.retry_base_delay_s * 2 ** (attempts - 1))
            c.execute(
                "UPDATE requests SET state='QUEUED', attempts=?, error=?, next_attempt=?, "
                "claimed_at=NULL WHERE scope=? AND name=? AND rse=?",
                (attempts, error, time.time() + delay, *key),
            )
            return "retry"


def _copy(job: _Job) -> str | None:
    """Copy one file with verification; return None on success or the reason it failed.

    The bytes go to a temporary name in the destination directory (same file system, so the
    final rename is atomic), their adler32 and size are checked against the catalog while
    copying, and the file is fsynced before ``os.replace``: a reader of the final path never sees
    a partial or corrupt file, even after a crash.
    """
    if job.src_path is None:
        return job.reason
    dst = job.dst_path
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        src_fd = os.open(job.src_path, os.O_RDONLY)
        try:
            # O_RDWR: the copy is read back for its checksum. O_EXCL: the name is ours alone.
            out_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                size, checksum = _copy_verified(src_fd, out_fd)
                if size != job.bytes:
                    return (
                        f"size mismatch copying {job.did} from {job.src_rse}: read {size} "
                        f"bytes, expected {job.bytes}"
                    )
                if checksum != job.adler32:
                    return (
                        f"checksum mismatch copying {job.did} from {job.src_rse}: adler32 "
                        f"{checksum}, expected {job.adler32}"
                    )
                os.fsync(out_fd)
            finally:
                os.close(out_fd)
        finally:
            os.close(src_fd)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        return None
    except OSError as exc:
        return f"cannot copy {job.did} from {job.src_rse} ({job.src_path}) to {dst}: {exc}"
    finally:
        tmp.unlink(missing_ok=True)


#: Size of the per-thread copy buffer (see `_copy_verified`): small enough that a block read
#: back right after the kernel copied it is still in the CPU caches.
_COPY_BLOCK = BLOCK_SIZE
_COPY_BUFFERS = threading.local()
#: copy_file_range errors meaning "not between these files": copy through user space instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def _copy_buffer() -> memoryview:
    """This thread's copy buffer, allocated once (workers copy many files each)."""
    buf: memoryview | None = getattr(_COPY_BUFFERS, "buf", None)
    if buf is None:
        buf = _COPY_BUFFERS.buf = memoryview(bytearray(_COPY_BLOCK))
    return buf


def _copy_verified(src_fd: int, out_fd: int) -> tuple[int, str]:
    """Copy ``src_fd`` to the empty ``out_fd``; return the size and adler32 of what was written.

    The kernel copies (``copy_file_range``: one copy, no trip through user space, as ``cp``
    does), and each block is read back from the destination for the checksum, so what is
    verified is what landed there. Where the kernel cannot copy between these files (another
    file system, an old kernel, not Linux), the bytes go through a user-space buffer instead,
    checksummed on the way.
    """
    buf = _copy_buffer()
    kernel_copy = getattr(os, "copy_file_range", None)
    if kernel_copy is not None:
        try:
            size, value, flushed = 0, 1, 0  # adler32's initial value is 1
            while n := kernel_copy(src_fd, out_fd, len(buf)):
                done = 0
                while done < n:
                    got = os.preadv(out_fd, [buf[done:n]], size + done)
                    if got == 0:
                        raise OSError(errno.EIO, "destination shorter than what was copied")
                    done += got
                value = zlib.adler32(buf[:n], value)  # releases the GIL for large blocks
                size += n
                if size - flushed >= _WRITEBACK_BLOCK:
                    _start_writeback(out_fd, flushed, size - flushed)
                    flushed = size
            # Some file systems answer 0 (end of file) at once instead of failing: recopy.
            if size >= os.fstat(src_fd).st_size:
                return size, f"{value & 0xFFFFFFFF:08x}"
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
        os.lseek(src_fd, 0, os.SEEK_SET)
        os.ftruncate(out_fd, 0)
        os.lseek(out_fd, 0, os.SEEK_SET)
    size, value, flushed = 0, 1, 0
    while n := os.readv(src_fd, [buf]):
        block = buf[:n]
        value = zlib.adler32(block, value)
        size += n
        while block:  # a write may be short
            block = block[os.write(out_fd, block) :]
        if size - flushed >= _WRITEBACK_BLOCK:
            _start_writeback(out_fd, flushed, size - flushed)
            flushed = size
    return size, f"{value & 0xFFFFFFFF:08x}"


#: Bytes copied between two `_start_writeback` calls.
_WRITEBACK_BLOCK = 8 << 20


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    # Linux's sync_file_range is not in the os module; libc has it (absent elsewhere: None).
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], func)


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages, do not wait


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a copied range to disk now, without waiting for it.

    The disk then works while the next blocks are copied and checksummed, and the final fsync
    (still what makes the file durable) finds little left to write: it took as long as the
    copy itself otherwise. A hint only: failures and platforms without it change nothing.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # releases the GIL


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if TYPE_CHECKING:
    # Lets mypy prove the embedded catalog satisfies the protocol (signatures included).
    def _conforms(catalog: EmbeddedCatalog) -> DataCatalog:
        return catalog
