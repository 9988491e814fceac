"""A Rucio transfertool that copies files between POSIX RSEs of one machine, verified.

Rucio ships transfertools for FTS3, Globus and BitTorrent, none of which can run here, and a
``mock`` one that marks transfers DONE without copying a byte (its replicas are AVAILABLE in the
catalog while the destination directory stays empty): never acceptable as "transferred". This one
does what FTS would do for ``file://`` URLs:

* `LocalTransfertool.submit` queues one copy per file on a thread pool and returns at once (an
  external id per file, as FTS returns a job id);
* the copy writes to a temporary name beside the destination (same file system, so the final
  rename is atomic), computes adler32 and size while streaming, compares them with the catalog's,
  fsyncs, renames, fsyncs the directory, and records the outcome in ``<state dir>/<eid>.json``;
* `LocalTransfertool.bulk_query` decides DONE or FAILED from that record *and* the destination on
  disk (it must exist with the catalog's size and adler32), so the conveyor never marks a file
  transferred that is not there.

Rucio has no plugin entry point for transfertools: daemons look them up in
``rucio.core.transfer.TRANSFERTOOL_CLASSES_BY_NAME``, so every process running the conveyor must
call `register` before starting it. The state directory is ``$DRP_RUCIO_TRANSFER_STATE`` (the
daemon runner sets it to ``WORKDIR/transfers``).

This module runs in the Rucio server environment (``.venv-rucio``), not in the project's.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
import threading
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from rucio.db.sqla.constants import RequestState
from rucio.transfertool.transfertool import (
    TransferStatusReport,
    Transfertool,
    TransferToolBuilder,
)

if TYPE_CHECKING:
    from rucio.core.request import DirectTransfer

__all__ = ["LocalTransfertool", "copy_verified", "register"]

NAME = "local"
_BLOCK = 1 << 20
_LOG = logging.getLogger(__name__)

# Copies run in this process, beside the daemons; a handful in parallel saturates a local disk.
_POOL = ThreadPoolExecutor(max_workers=int(os.environ.get("DRP_RUCIO_COPY_THREADS", "4")))
_RUNNING: dict[str, Future[None]] = {}
_RUNNING_LOCK = threading.Lock()


def _state_dir() -> Path:
    path = Path(
        os.environ.get("DRP_RUCIO_TRANSFER_STATE")
        or Path(tempfile.gettempdir()) / "drp-rucio-transfers"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None).isoformat()


def url_to_path(url: str) -> Path:
    """The local path of a ``file://`` URL (host part ignored)."""
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise ValueError(f"not a file URL: {url}")
    return Path(unquote(parsed.path))


def _adler32(path: Path) -> str:
    value = 1
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            value = zlib.adler32(block, value)
    return f"{value & 0xFFFFFFFF:08x}"


def copy_verified(src: Path, dst: Path, size: int, adler32: str, did: str) -> str | None:
    """Copy ``src`` to ``dst`` through a temporary name; return None or why it failed.

    Parameters
    ----------
    src, dst : `pathlib.Path`
        Source and destination files.
    size : `int`
        Expected size (the catalog's).
    adler32 : `str`
        Expected adler32 (the catalog's), 8 hex digits.
    did : `str`
        ``scope:name``, put first in error messages: Rucio truncates a rule's error to 245
        characters, and the file must stay identifiable.

    Returns
    -------
    error : `str` or `None`
        None on success.
    """
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        value, copied = 1, 0
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(_BLOCK):
                value = zlib.adler32(block, value)
                copied += len(block)
                fout.write(block)
            fout.flush()
            checksum = f"{value & 0xFFFFFFFF:08x}"
            if copied != size:
                return f"{did}: size mismatch reading {src}: {copied} bytes, expected {size}"
            if checksum != adler32.lower():
                return (
                    f"{did}: checksum mismatch reading {src}: adler32 {checksum}, "
                    f"expected {adler32}"
                )
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
        fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename is durable only once the directory entry is
        finally:
            os.close(fd)
        return None
    except OSError as exc:
        return f"{did}: cannot copy {src} to {dst}: {exc.strerror or exc}"
    finally:
        tmp.unlink(missing_ok=True)


def _write_record(eid: str, record: Mapping[str, Any]) -> None:
    path = _state_dir() / f"{eid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def _read_record(eid: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads((_state_dir() / f"{eid}.json").read_text()))
    except FileNotFoundError:
        return None


def _run_job(eid: str, job: dict[str, Any]) -> None:
    """Try each source in Rucio's ranking order until one copy verifies; record the outcome."""
    job["started_at"] = _now()
    errors = []
    for source in job["sources"]:
        error = copy_verified(
            Path(source["path"]), Path(job["dst_path"]), job["bytes"], job["adler32"], job["did"]
        )
        if error is None:
            job.update(ok=True, source_rse=source["rse"], source_rse_id=source["rse_id"])
            break
        errors.append(error)
    else:
        job.update(ok=False, reason="; ".join(errors) or f"{job['did']}: no source")
    job["finished_at"] = _now()
    _write_record(eid, job)


class LocalTransferStatusReport(TransferStatusReport):
    """The outcome of one local copy, in the shape the poller applies to the request."""

    supported_db_fields = [
        "state",
        "external_id",
        "source_rse_id",
        "err_msg",
        "started_at",
        "transferred_at",
    ]

    def __init__(
        self,
        request_id: str,
        external_id: str,
        state: RequestState,
        record: Mapping[str, Any],
        reason: str | None = None,
    ) -> None:
        super().__init__(request_id)
        self.state = state
        self.external_id = external_id
        self.source_rse_id = record.get("source_rse_id")
        self.err_msg = reason
        self.started_at = _parse_time(record.get("started_at"))
        self.transferred_at = _parse_time(record.get("finished_at"))
        self._record = record
        self._reason = reason

    def initialize(self, session: Any, logger: Any = logging.log) -> None:
        """Nothing to fetch: the report is complete when built."""

    def get_monitor_msg_fields(self, session: Any, logger: Any = logging.log) -> dict[str, Any]:
        """Fields hermes adds to the transfer-done/-failed message (as the FTS report does)."""
        return {
            "src-rse": self._record.get("source_rse"),
            "dst-rse": self._record.get("dst_rse"),
            "dst-url": self._record.get("dst_url"),
            "reason": self._reason,
            "started_at": self.started_at,
            "transferred_at": self.transferred_at,
            "transfer_link": None,
        }


def _parse_time(text: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(text) if text else None


class LocalTransfertool(Transfertool):
    """Verified copies between ``file://`` RSEs of this machine (see the module docstring)."""

    external_name = NAME
    required_rse_attrs = ()
    supported_schemes = {"file"}

    def __init__(self, external_host: str = "local-copy", logger: Any = logging.log) -> None:
        super().__init__(external_host, logger)

    @classmethod
    def submission_builder_for_path(
        cls, transfer_path: list[DirectTransfer], logger: Any = logging.log
    ) -> tuple[list[DirectTransfer], TransferToolBuilder | None]:
        """Accept single hops between ``file`` URLs; anything else is not ours."""
        hop = transfer_path[0]
        if not hop.dest_url.startswith("file:") or not all(
            hop.source_url(s).startswith("file:") for s in hop.sources
        ):
            return [], None
        return [hop], TransferToolBuilder(cls, external_host="local-copy")

    def group_into_submit_jobs(
        self, transfer_paths: Iterable[list[DirectTransfer]]
    ) -> list[dict[str, Any]]:
        """One job per file: each gets its own external id and outcome."""
        return [{"transfers": path, "job_params": {}} for path in transfer_paths]

    def submit(
        self,
        transfers: Iterable[DirectTransfer],
        job_params: Mapping[str, Any],
        timeout: int | None = None,
    ) -> str:
        """Queue the copy of one file; return its external id at once."""
        (transfer,) = list(transfers)
        rws = transfer.rws
        did = f"{rws.scope.external}:{rws.name}"
        job: dict[str, Any] = {
            "request_id": rws.request_id,
            "did": did,
            "bytes": int(rws.byte_count),
            "adler32": str(rws.adler32),
            "dst_rse": transfer.dst.rse.name,
            "dst_url": transfer.dest_url,
            "dst_path": str(url_to_path(transfer.dest_url)),
            "sources": [
                {
                    "rse": s.rse.name,
                    "rse_id": s.rse.id,
                    "path": str(url_to_path(transfer.source_url(s))),
                }
                for s in transfer.sources
            ],
            "submitted_at": _now(),
        }
        eid = uuid.uuid4().hex
        with _RUNNING_LOCK:
            fut = _POOL.submit(_run_job, eid, job)
            _RUNNING[eid] = fut
        fut.add_done_callback(lambda _f: _forget(eid))
        return eid

    def bulk_query(
        self, requests_by_eid: Mapping[str, Mapping[str, Any]], timeout: int | None = None
    ) -> dict[str, Any]:
        """DONE iff the copy succeeded and the destination is on disk, whole; else FAILED.

        A job still copying gives no report (the request stays SUBMITTED); a job this process
        never ran and never recorded (the daemons restarted mid-copy) is reported lost (None),
        which the finisher retries.
        """
        response: dict[str, Any] = {}
        for eid, requests in requests_by_eid.items():
            # Running first, record second: a job writes its record before leaving _RUNNING, so
            # "not running and no record" really means the copy never ran in this process.
            with _RUNNING_LOCK:
                running = eid in _RUNNING
            record = _read_record(eid)
            if record is None:
                response[eid] = {} if running else None
                continue
            reports = {}
            for request_id, request in requests.items():
                state, reason = self._verdict(record, request)
                reports[request_id] = LocalTransferStatusReport(
                    request_id, eid, state, record, reason
                )
            response[eid] = reports
        return response

    @staticmethod
    def _verdict(
        record: Mapping[str, Any], request: Mapping[str, Any]
    ) -> tuple[RequestState, str | None]:
        if not record.get("ok"):
            return RequestState.FAILED, str(record.get("reason") or "copy failed")
        did = record["did"]
        dst = Path(record["dst_path"])
        size = int(request.get("bytes") or record["bytes"])
        adler32 = str(request.get("adler32") or record["adler32"]).lower()
        try:
            actual = dst.stat().st_size
        except FileNotFoundError:
            return RequestState.FAILED, f"{did}: destination {dst} vanished after the copy"
        if actual != size:
            return RequestState.FAILED, f"{did}: destination {dst} has {actual} bytes, not {size}"
        checksum = _adler32(dst)
        if checksum != adler32:
            return RequestState.FAILED, f"{did}: destination {dst} has adler32 {checksum}"
        return RequestState.DONE, None

    def cancel(self, transfer_ids: Sequence[str], timeout: int | None = None) -> bool:
        """Copies are short and local: cancelling is not supported, they run to completion."""
        return True

    def update_priority(self, transfer_id: str, priority: int, timeout: int | None = None) -> bool:
        """Priorities are ignored (first come, first copied)."""
        return True


def _forget(eid: str) -> None:
    with _RUNNING_LOCK:
        _RUNNING.pop(eid, None)


def register() -> None:
    """Make the conveyor daemons of this process know the ``local`` transfertool."""
    from rucio.core import transfer

    transfer.TRANSFERTOOL_CLASSES_BY_NAME[NAME] = LocalTransfertool
