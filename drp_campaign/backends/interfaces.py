"""The data catalog interface: Rucio's semantics, small enough to implement twice.

A *DID* (``scope:name``) names a file or a dataset; names are paths (``raw/LSSTCam/...``), and the
physical path of a file at every RSE is ``<rse root>/<scope>/<name>`` (identity LFN -> PFN,
RTN-101). Files already in a site's storage are *registered* as replicas there (with the
``rubin_butler``/``rubin_sidecar`` metadata lsst-rucio-register attaches), attached to a dataset,
and the dataset is closed once complete. A *replication rule* asks for ``copies`` replicas of
every file of a DID on the RSEs of an expression, optionally only copying from the RSEs of a
source expression (chains: hub -> FrDF -> UKDF). Each (rule, file, RSE) is a *lock*; a rule is OK
when all its locks are, STUCK when a lock has exhausted its retries, REPLICATING otherwise.
Every completed or abandoned transfer appends an event in the shape ctrl_ingestd consumes
(DESIGN.md section 6), numbered by a monotonically increasing ``seq`` so consumers can resume.

Two implementations: the embedded one (``backends.local.catalog``, SQLite + a verifying copy
worker) and, later, one around an injected ``rucio.client.Client``. One contract test suite
(``tests/backends/test_catalog_contract.py``) runs against both.
"""

from __future__ import annotations

import enum
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "DID",
    "CatalogError",
    "CatalogFile",
    "DIDInfo",
    "DIDNotFound",
    "DIDType",
    "DataCatalog",
    "DuplicateDID",
    "FileReplica",
    "NewFile",
    "RSENotFound",
    "ReplicaState",
    "Rule",
    "RuleNotFound",
    "RuleState",
    "ScopeNotFound",
    "TERMINAL_STATES",
    "LabelReport",
    "TransferEvent",
    "WorkloadAuthError",
    "WorkloadError",
    "WorkloadService",
    "WorkloadState",
    "WorkloadStatus",
    "file_adler32",
    "parse_rse_expression",
    "rse_name",
]

# Rucio's own limits (rucio.common.schema.generic): scopes are short identifiers; RSE names are
# upper-case with digits, '_' and '-'.
_SCOPE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,25}$")
_RSE_RE = re.compile(r"^[A-Z0-9][A-Z0-9_\-]*$")

#: Block size for checksumming and copying: large enough to stream at disk speed, small enough
#: to keep memory flat with many parallel transfers.
BLOCK_SIZE = 1 << 20


# ----------------------------------------------------------------------------------------------
# Errors


class CatalogError(Exception):
    """Base class of every data catalog error."""


class DIDNotFound(CatalogError):
    """A DID (file or dataset) that the catalog does not know."""


class DuplicateDID(CatalogError):
    """A DID registered again with different content (size, checksum or type)."""


class RSENotFound(CatalogError):
    """An RSE, named directly or in an RSE expression, that the catalog does not know."""


class RuleNotFound(CatalogError):
    """A replication rule id that the catalog does not know."""


class ScopeNotFound(CatalogError):
    """A scope that was never added (Rucio refuses DIDs in unknown scopes)."""


# ----------------------------------------------------------------------------------------------
# Value types


@dataclass(frozen=True, order=True)
class DID:
    """A data identifier ``scope:name``; ``name`` is a relative path."""

    scope: str
    name: str

    def __post_init__(self) -> None:
        if not _SCOPE_RE.match(self.scope):
            raise ValueError(f"invalid scope {self.scope!r} in DID {self.scope}:{self.name}")
        # Names become paths under every RSE root: refuse anything that could escape it.
        parts = self.name.split("/")
        if not self.name or self.name.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(
                f"invalid DID name {self.name!r}: need a relative path without '..' or '//'"
            )

    def __str__(self) -> str:
        return f"{self.scope}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> DID:
        """Parse ``scope:name``.

        Parameters
        ----------
        text : `str`
            The DID as Rucio prints it.

        Returns
        -------
        did : `DID`
            The parsed DID.
        """
        scope, sep, name = text.partition(":")
        if not sep:
            raise ValueError(f"invalid DID {text!r}: expected 'scope:name'")
        return cls(scope, name)


class DIDType(enum.StrEnum):
    """What a DID names."""

    FILE = "FILE"
    DATASET = "DATASET"


class ReplicaState(enum.StrEnum):
    """State of one file's replica at one RSE (Rucio's subset we use)."""

    AVAILABLE = "AVAILABLE"
    COPYING = "COPYING"
    UNAVAILABLE = "UNAVAILABLE"


class RuleState(enum.StrEnum):
    """State of a replication rule."""

    REPLICATING = "REPLICATING"
    OK = "OK"
    STUCK = "STUCK"


@dataclass(frozen=True)
class NewFile:
    """A file already in an RSE's storage, to register as a replica there.

    ``adler32`` is Rucio's form: 8 lower-case hex digits. ``meta`` carries the DID metadata
    (``rubin_butler``, ``rubin_sidecar``) that transfer events repeat for ingestion.
    """

    scope: str
    name: str
    bytes: int
    adler32: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def did(self) -> DID:
        """The file's DID."""
        return DID(self.scope, self.name)


@dataclass(frozen=True, order=True)
class CatalogFile:
    """A registered file: its DID, size and checksum."""

    scope: str
    name: str
    bytes: int
    adler32: str

    @property
    def did(self) -> DID:
        """The file's DID."""
        return DID(self.scope, self.name)


@dataclass(frozen=True)
class DIDInfo:
    """What the catalog knows about a DID itself."""

    did: DID
    type: DIDType
    open: bool  # datasets only; files are always "closed"
    bytes: int | None = None
    adler32: str | None = None


@dataclass(frozen=True, order=True)
class FileReplica:
    """One file's replica at one RSE; ``path`` is its PFN on the local file system."""

    scope: str
    name: str
    bytes: int
    adler32: str
    rse: str
    state: ReplicaState
    path: Path

    @property
    def did(self) -> DID:
        """The file's DID."""
        return DID(self.scope, self.name)


@dataclass(frozen=True)
class Rule:
    """A replication rule and the counts of its locks by state."""

    id: str
    did: DID
    rse_expression: str
    copies: int
    source_replica_expression: str | None
    state: RuleState
    locks_ok: int
    locks_replicating: int
    locks_stuck: int
    error: str | None = None  # why a lock is stuck, when one is


@dataclass(frozen=True)
class TransferEvent:
    """One transfer outcome, as HermesK posts it and ctrl_ingestd consumes it.

    ``payload`` has ``scope``, ``name``, ``dst-rse``, ``dst-url``, ``src-rse``, ``bytes``,
    ``checksum-adler``, ``rubin_butler`` and ``rubin_sidecar`` (from the file's metadata, ``None``
    when absent); ``transfer-failed`` adds ``reason``. ``seq`` increases monotonically.
    """

    seq: int
    event_type: Literal["transfer-done", "transfer-failed"]
    payload: Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# Helpers shared by every implementation


def rse_name(site: str, kind: Literal["raw", "butler"]) -> str:
    """Name of a site's RSE per RTN-101: ``{SITE}_RAW_DISK`` or ``{SITE}_BUTLER_DISK``.

    Parameters
    ----------
    site : `str`
        Site name (``SLAC``, ``IN2P3``, ``FrDF``...); upper-cased.
    kind : `str`
        ``"raw"`` for immutable inputs, ``"butler"`` for products.

    Returns
    -------
    name : `str`
        The RSE name.
    """
    if kind not in ("raw", "butler"):
        raise ValueError(f"RSE kind must be 'raw' or 'butler', not {kind!r}")
    name = f"{site.upper()}_{kind.upper()}_DISK"
    if not _RSE_RE.match(name):
        raise ValueError(f"site {site!r} gives an invalid RSE name {name!r}")
    return name


def parse_rse_expression(expression: str) -> tuple[str, ...]:
    """The RSEs of an expression: one RSE name or a union ``A|B|...``.

    Parameters
    ----------
    expression : `str`
        The RSE expression.

    Returns
    -------
    rses : `tuple` [`str`, ...]
        The RSE names, in the order given, without duplicates.

    Raises
    ------
    CatalogError
        If the expression uses anything but names and ``|`` (intersections, complements and
        attribute filters are not supported here).
    """
    names: list[str] = []
    for part in expression.split("|"):
        name = part.strip()
        if not _RSE_RE.match(name):
            raise CatalogError(
                f"unsupported RSE expression {expression!r}: only RSE names joined by '|' "
                f"are supported (bad term {name!r})"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def file_adler32(path: Path) -> str:
    """Rucio's adler32 of a file: 8 lower-case hex digits.

    Parameters
    ----------
    path : `pathlib.Path`
        The file.

    Returns
    -------
    checksum : `str`
        The checksum.
    """
    value = 1  # adler32's initial value
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            value = zlib.adler32(block, value)
    return f"{value & 0xFFFFFFFF:08x}"


# ----------------------------------------------------------------------------------------------
# The interface


@runtime_checkable
class DataCatalog(Protocol):
    """A data catalog with Rucio's semantics.

    Rule evaluation and transfers are asynchronous: callers poll `get_rule` (or consume `events`)
    until the rule is OK; the implementation decides who moves the bytes (the embedded worker, or
    Rucio's daemons).
    """

    def add_rse(self, name: str, root: Path) -> None:
        """Declare an RSE whose storage is the directory ``root`` (idempotent).

        Parameters
        ----------
        name : `str`
            RSE name (see `rse_name`).
        root : `pathlib.Path`
            Storage root; a file's PFN is ``root/<scope>/<name>``.
        """
        ...

    def rse_root(self, name: str) -> Path:
        """The storage root of an RSE (raises `RSENotFound`)."""
        ...

    def list_rses(self) -> list[str]:
        """Names of all RSEs, sorted."""
        ...

    def rse_writable(self, name: str) -> bool:
        """Whether an RSE accepts new replicas (Rucio's ``availability_write``)."""
        ...

    def set_rse_writable(self, name: str, writable: bool) -> None:
        """Open an RSE for writing or make it read-only (an operator's or admin's act)."""
        ...

    def whoami(self) -> str:
        """Who the catalog knows us as: checks that it answers and authenticates."""
        ...

    def add_scope(self, scope: str) -> None:
        """Declare a scope (idempotent)."""
        ...

    def register_replicas(self, rse: str, files: Sequence[NewFile]) -> None:
        """Register files already present in ``rse``'s storage as AVAILABLE replicas there.

        Registering the same file again (same size and checksum) is a no-op; a different file
        under an existing name raises `DuplicateDID`.

        Parameters
        ----------
        rse : `str`
            The RSE holding the files at ``<root>/<scope>/<name>``.
        files : `~collections.abc.Sequence` [`NewFile`]
            The files, with size, adler32 and metadata.

        Raises
        ------
        RSENotFound, ScopeNotFound, DuplicateDID, CatalogError
            Unknown RSE or scope, conflicting DID, or a file missing from storage.
        """
        ...

    def add_dataset(self, did: DID, meta: Mapping[str, Any] | None = None) -> None:
        """Create an open dataset (idempotent)."""
        ...

    def attach(self, dataset: DID, files: Sequence[DID]) -> None:
        """Attach registered files to an open dataset (attaching twice is a no-op).

        Rules on the dataset cover late-attached files too.
        """
        ...

    def close(self, dataset: DID) -> None:
        """Close a dataset: no more files may be attached (idempotent)."""
        ...

    def get_did(self, did: DID) -> DIDInfo:
        """Type, open state, size and checksum of a DID (raises `DIDNotFound`)."""
        ...

    def get_metadata(self, did: DID) -> dict[str, Any]:
        """The user metadata of a DID (``rubin_butler``, ``rubin_sidecar``...)."""
        ...

    def list_dataset_files(self, did: DID) -> list[CatalogFile]:
        """Files of a dataset (a file DID lists itself), sorted by DID."""
        ...

    def list_replicas(self, did: DID) -> list[FileReplica]:
        """Every replica (any state) of the file, or of every file of the dataset."""
        ...

    def add_rule(
        self,
        did: DID,
        rse_expression: str,
        copies: int = 1,
        source_replica_expression: str | None = None,
    ) -> str:
        """Ask for ``copies`` replicas of every file of ``did`` on ``rse_expression``.

        Idempotent: a rule with the same DID and RSE expression is returned as is.

        Parameters
        ----------
        did : `DID`
            File or dataset.
        rse_expression : `str`
            Destination RSEs (see `parse_rse_expression`).
        copies : `int`
            Replicas per file, each on a different RSE of the expression.
        source_replica_expression : `str`, optional
            Copy only from these RSEs (waiting for them to have the file).

        Returns
        -------
        rule_id : `str`
            The rule's id.
        """
        ...

    def get_rule(self, rule_id: str) -> Rule:
        """A rule with its current state and lock counts (raises `RuleNotFound`)."""
        ...

    def list_rules(self, did: DID | None = None) -> list[Rule]:
        """Rules on ``did`` (every rule when ``None``)."""
        ...

    def events(
        self, after_seq: int = 0, dst_rse: str | None = None, limit: int | None = None
    ) -> list[TransferEvent]:
        """Transfer events with ``seq > after_seq``, oldest first, optionally for one RSE."""
        ...


# ----------------------------------------------------------------------------------------------
# The workload interface: who runs a site's step once its graph inputs are in place


class WorkloadState(enum.StrEnum):
    """State of a submitted site-step run (BPS's ``WmsStates`` folded to what flows act on)."""

    RUNNING = "RUNNING"  # queued, building, running or merging
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # finished with failed jobs: `WorkloadService.restart` retries them
    CANCELLED = "CANCELLED"
    HELD = "HELD"  # suspended by the system or an operator


TERMINAL_STATES = frozenset(
    {WorkloadState.SUCCEEDED, WorkloadState.FAILED, WorkloadState.CANCELLED}
)


@dataclass(frozen=True)
class LabelReport:
    """Counts of one pipetask label (or cluster) of a run, as ``bps report`` shows them."""

    label: str
    total: int
    succeeded: int
    failed: int
    exit_codes: tuple[int, ...] = ()  # distinct non-zero exit codes of the failed jobs


@dataclass(frozen=True)
class WorkloadStatus:
    """What a workload system says about one run."""

    run_id: str
    state: WorkloadState
    labels: tuple[LabelReport, ...] = ()
    message: str = ""

    @property
    def failed_labels(self) -> list[LabelReport]:
        """Labels with at least one failed job."""
        return [label for label in self.labels if label.failed]


class WorkloadError(RuntimeError):
    """A workload system refused a call or could not be reached; the message says what to do."""


class WorkloadAuthError(WorkloadError):
    """The workload system rejected the credentials (an expired token, a wrong VO)."""


@runtime_checkable
class WorkloadService(Protocol):
    """Runs the BPS submission of one step at one site: PanDA in production, local by default.

    ``submit`` returns at once with a run id for an asynchronous system (PanDA) or after the run
    for a synchronous one (the local executor); callers always poll `status` until a state in
    `TERMINAL_STATES`, so both look the same to a flow.
    """

    def ping(self) -> None:
        """Check the service answers and accepts the credentials (raises `WorkloadError`)."""
        ...

    def submit(self, submit_yaml: Path, graph: Path | None = None) -> str:
        """Submit the BPS submit file ``submit_yaml`` (with a prebuilt ``graph``, if given).

        Returns
        -------
        run_id : `str`
            The run's id in the workload system (a PanDA request id, or a local run id).
        """
        ...

    def status(self, run_id: str) -> WorkloadStatus:
        """State of a run, with per-label counts once known."""
        ...

    def cancel(self, run_id: str) -> None:
        """Cancel a run (idempotent)."""
        ...

    def restart(self, run_id: str) -> str:
        """Retry the failed jobs of a finished run; returns the id to poll from now on."""
        ...
