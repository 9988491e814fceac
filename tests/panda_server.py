"""A PanDA server (with its iDDS relay) for tests, in the standard library only.

`PandaTestServer` listens on 127.0.0.1 (a free port, in a thread) and answers what panda-client
2.2.0 and the unchanged ``lsst.ctrl.bps.panda.PanDAService`` send, in the shapes the real servers
(panda-server's WSGI application, iDDS's REST service behind the relay) return:

- ``POST /server/panda/relay_idds_command``: the legacy API. A JSON body is gzip-decompressed
  without looking at ``Content-Encoding`` and its ``True``/``False`` become strings, as
  panda-server does; ``args``/``kwargs`` are JSON strings; the reply is ``[true, <ClientManager
  return value>]`` or ``[false, <message>]``. Commands: ``ping``, ``submit`` (a workflow step
  answers ``0``), ``submit_build``, ``get_requests``, ``get_status``, ``get_contents_output_ext``,
  ``update_build_request`` (with the signature iDDS gives the build job, `build_signature`),
  ``abort`` and ``retry`` (iDDS's ``[(0, {"status": 0, "message": ...})]``, or ``-1`` for an
  unknown request or another user's request). ``POST
  /server/panda/execute_idds_workflow_command`` (form-encoded) with its owner check.
- ``/api/v1/...``: the ``{"success", "message", "data"}`` envelope; ``system/is_alive``,
  ``task/submit``, ``task/get_status``, ``task/get_details``, ``task/get_task_parameters``,
  ``task/get_job_ids``, ``task/kill|finish|retry|pause|resume|reactivate`` (JEDI's return codes:
  0 registered, 2 not found, 3 permission denied, 4 irrelevant status), ``job/get_description``,
  ``job/get_metadata_for_analysis_jobs``, ``file_server/upload_cache_file`` (multipart), and
  ``GET /cache/<file>`` (also under ``/server/panda/cache/``).
- OIDC: ``Authorization: Bearer <ID token>`` and ``Origin: <VO>`` on every call. Tokens are JWTs
  the server issues (`PandaTestServer.issue_token`), signed with HMAC-SHA256; an unknown,
  tampered, expired or revoked token, or an ``Origin`` that is not one of the token's groups, gets
  HTTP 403 ``ERROR : Token authentication failed. <reason>``, as panda-server answers. A call with
  no token is anonymous: the v1 API and the relay then refuse it as insecure.
- iDDS values travel as iDDS serialises them: enums as ``{"class": "RequestStatus", "module":
  "idds.common.constants", "attributes": {"_value_": 2, "_name_": "Transforming",
  "_sort_order_": 2}}`` and dates as ``"Sat, 28 Nov 2026 06:25:53 UTC"``.

Control methods move requests the way iDDS's agents and PanDA's jobs would: `start` (the
transforms appear, with JEDI task ids, and run), `finish`, `fail` (some labels with some failed
jobs and an exit code), `suspend`, `process_commands` (apply the pending ``abort``/``retry``:
iDDS only registers a command when it is called), and `fail_next` (answer the next calls with an
HTTP error, as an overloaded server or load balancer does). Every workflow received is kept
(`workflows`, `works`) and every call is counted (`calls`).

What it does NOT emulate
------------------------
- TLS and X.509/VOMS authentication: it speaks plain HTTP (panda-client accepts ``http://``
  URLs), so ``PANDA_VERIFY_HOST`` has no effect here.
- The OIDC identity provider: tokens are issued by the test itself, not by an IAM instance; there
  is no device-code flow (``/auth/<VO>_auth_config.json`` answers 404, so panda-client's
  interactive login fails as it does without network), no refresh tokens, no token exchange.
- iDDS's agents and PanDA/JEDI themselves: no task is derived from a workflow (iDDS's
  ``insertTaskParams`` call), no job is generated, brokered, dispatched or run; the per-label job
  counts come from each work's dependency map and move only when a test calls a control method.
  Workflow conditions (the final job waiting for the others) are not evaluated.
- The edge node: nothing runs the remote build job of a ``submit_build`` request; a test may run
  BPS's build decoder itself, which hands the built workflow back with
  ``update_build_request`` (answered: the request then carries the built works).
- Request splitting limits, priorities, shares, quotas, production roles (an owner check only),
  banned users, the monitor (BigMon), ``get_hyperparameters`` and the other ClientManager
  commands BPS does not call.
"""

from __future__ import annotations

import base64
import email.message
import email.parser
import email.policy
import gzip
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlparse

__all__ = [
    "IddsRequest",
    "PandaTestServer",
    "RecordedWorkflow",
    "Transform",
    "free_port",
    "idds_enum",
    "task_label",
    "works_of",
]

# iDDS's RequestStatus and TransformStatus values (idds.common.constants, iDDS 2.6).
REQUEST_STATUS = {
    "New": 0, "Ready": 1, "Transforming": 2, "Finished": 3, "SubFinished": 4, "Failed": 5,
    "Extend": 6, "ToCancel": 7, "Cancelling": 8, "Cancelled": 9, "ToSuspend": 10,
    "Suspending": 11, "Suspended": 12, "ToResume": 13, "Resuming": 14, "ToExpire": 15,
    "Expiring": 16, "Expired": 17, "ToFinish": 18, "ToForceFinish": 19, "Terminating": 20,
    "Building": 21, "Built": 22, "Throttling": 23, "ToClose": 24,
}  # fmt: skip
TRANSFORM_STATUS = {
    "New": 0, "Ready": 1, "Transforming": 2, "Finished": 3, "SubFinished": 4, "Failed": 5,
    "Extend": 6, "ToCancel": 7, "Cancelling": 8, "Cancelled": 9, "ToSuspend": 10,
    "Suspending": 11, "Suspended": 12, "ToResume": 13, "Resuming": 14, "ToExpire": 15,
    "Expiring": 16, "Expired": 17, "ToFinish": 18, "ToForceFinish": 19, "Terminating": 20,
    "Building": 21, "Built": 22, "Queue": 23, "Throttling": 24, "WaitForTrigger": 25,
}  # fmt: skip
_ENUMS = {"RequestStatus": REQUEST_STATUS, "TransformStatus": TRANSFORM_STATUS}
_TERMINAL = {"Finished", "SubFinished", "Failed", "Cancelled", "Expired"}

AUTH_FAILED = "ERROR : Token authentication failed."
MESSAGE_SSL = "SSL secure connection is required"


def idds_enum(kind: str, name: str) -> dict[str, Any]:
    """Serialise an iDDS enum member as iDDS's ``DictClassEncoder`` does.

    Parameters
    ----------
    kind : `str`
        ``"RequestStatus"`` or ``"TransformStatus"``.
    name : `str`
        The member name (``"Transforming"``).

    Returns
    -------
    value : `dict`
        ``{"class", "module", "attributes": {"_value_", "_name_", "_sort_order_"}}``.
    """
    value = _ENUMS[kind][name]
    return {
        "class": kind,
        "module": "idds.common.constants",
        "attributes": {"_value_": value, "_name_": name, "_sort_order_": value},
    }


def _idds_date(t: float) -> str:
    # idds.common.utils.date_to_str
    return datetime.fromtimestamp(t, UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")


def _unzip(value: Any) -> Any:
    """Decode iDDS's ``idds_zip:`` (base64 of zlib of JSON) compressed attributes."""
    if isinstance(value, str) and value.startswith("idds_zip:"):
        return json.loads(zlib.decompress(base64.b64decode(value[9:])).decode())
    return value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def task_label(task_name: str) -> str:
    """The pipetask label of a BPS PanDA task name, as ``bps report`` derives it.

    ``<workflow>_<NN>_<label>_<chunk>`` gives ``<label>``; a name without that shape (the
    remote build's ``build_task``) is its own label.
    """
    matches = re.findall(r"_(\d+)_", task_name)
    if not matches:
        return task_name
    last = f"_{matches[-1]}_"
    label = task_name[task_name.rfind(last) + len(last) :]
    return re.sub(r"_\d+$", "", label)


# ----------------------------------------------------------------------------------------------
# State


@dataclass
class Transform:
    """One iDDS transform: a PanDA task running the jobs of one label (or chunk of a label)."""

    transform_id: int
    name: str
    label: str
    workload_id: int  # the JEDI task id
    total: int
    status: str = "New"
    processed: int = 0
    failed: int = 0
    processing: int = 0
    exit_code: int = 0  # of the failed jobs
    created_at: float = field(default_factory=time.time)

    def row_fields(self) -> dict[str, Any]:
        """The transform and output-collection columns of a ``get_requests`` detail row."""
        unfinished = self.total - self.processed - self.failed - self.processing
        return {
            "transform_id": self.transform_id,
            "transform_name": self.name,
            "transform_workload_id": self.workload_id,
            "transform_status": idds_enum("TransformStatus", self.status),
            "transform_created_at": _idds_date(self.created_at),
            "transform_updated_at": _idds_date(time.time()),
            "transform_finished_at": None,
            "input_total_files": self.total,
            "input_processed_files": self.processed,
            "input_new_files": 0,
            "output_coll_scope": "pseudo_dataset",
            "output_coll_name": f"pseudo_output_collection#{self.transform_id}",
            "output_total_files": self.total,
            "output_processed_files": self.processed,
            "output_failed_files": self.failed,
            "output_missing_files": 0,
            "output_processing_files": self.processing,
            "output_new_files": max(unfinished, 0) if self.status == "Transforming" else 0,
            "output_activated_files": 0,
            "output_preprocessing_files": 0,
        }


@dataclass
class IddsRequest:
    """One iDDS request (a submitted BPS run) and its transforms."""

    request_id: int
    name: str
    username: str
    kind: str  # "workflow" or "build"
    works: list[dict[str, Any]]
    status: str = "New"
    transforms: list[Transform] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # registered abort/retry commands
    signature: str = field(default_factory=lambda: secrets.token_hex(16))  # of a build request
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def row(self) -> dict[str, Any]:
        """The request columns of a ``get_requests`` row."""
        return {
            "request_id": self.request_id,
            "scope": "workflow",
            "name": self.name,
            "requester": "panda",
            "request_type": {
                "class": "RequestType",
                "module": "idds.common.constants",
                "attributes": {"_value_": 0, "_name_": "Workflow", "_sort_order_": 0},
            },
            "username": self.username,
            "userdn": None,
            "transform_tag": "workflow",
            "workload_id": None,
            "priority": 0,
            "status": idds_enum("RequestStatus", self.status),
            "substatus": idds_enum("RequestStatus", self.status),
            "locking": {
                "class": "RequestLocking",
                "module": "idds.common.constants",
                "attributes": {"_value_": 0, "_name_": "Idle", "_sort_order_": 0},
            },
            "created_at": _idds_date(self.created_at),
            "updated_at": _idds_date(self.updated_at),
            "errors": None,
        }


@dataclass(frozen=True)
class RecordedWorkflow:
    """A workflow as the server received it (the iDDS JSON, decoded to plain dicts)."""

    request_id: int
    command: str  # "submit", "submit_build" or "update_build_request"
    username: str
    workflow: dict[str, Any]


@dataclass
class JediTask:
    """A task registered through ``/api/v1/task/submit``."""

    task_id: int
    owner: str
    params: dict[str, Any]
    status: str = "registered"
    job_ids: list[int] = field(default_factory=list)


def works_of(workflow: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The works of an iDDS workflow (as JSON), each as a flat dict of what BPS set.

    Parameters
    ----------
    workflow : mapping
        The serialised ``idds.workflowv2.workflow.Workflow``.

    Returns
    -------
    works : `list` [`dict`]
        One per work, in the workflow's order: ``task_name``, ``label``, ``site`` (the BPS
        ``computeSite``, PanDA's ``PandaSite``), ``cloud``, ``queue`` (the PanDA queue),
        ``rss`` (MB), ``rss_max``, ``core_count``, ``priority``, ``processing_type``,
        ``prod_source_label``, ``vo``, ``max_attempt``, ``max_walltime``, ``task_type``,
        ``executable``, ``dependency_map`` (decoded), ``dependency_tasks``, ``n_jobs``.
    """
    template = workflow["attributes"]["template"]["attributes"]
    works = []
    for work in template["_works"].values():
        a = work["attributes"]
        dependency_map = _unzip(a.get("_dependency_map")) or []
        works.append(
            {
                "class": work["class"],
                "task_name": a["task_name"],
                "label": task_label(a["task_name"]),
                "site": a.get("task_site"),
                "cloud": a.get("task_cloud"),
                "queue": a.get("task_queue"),
                "rss": a.get("task_rss"),
                "rss_max": a.get("task_rss_max"),
                "core_count": a.get("core_count"),
                "priority": a.get("task_priority"),
                "processing_type": a.get("processingType"),
                "prod_source_label": a.get("prodSourceLabel"),
                "vo": a.get("vo"),
                "max_attempt": a.get("maxAttempt"),
                "max_walltime": a.get("maxWalltime"),
                "task_type": a.get("task_type"),
                "executable": a.get("executable"),
                "dependency_map": dependency_map,
                "dependency_tasks": a.get("dependency_tasks") or [],
                "n_jobs": max(len(dependency_map), 1),
            }
        )
    return works


class _CallError(Exception):
    """An HTTP-level refusal: status code and plain-text body."""

    def __init__(self, code: int, body: str) -> None:
        super().__init__(body)
        self.code = code
        self.body = body


# ----------------------------------------------------------------------------------------------
# The server


class PandaTestServer:
    """A PanDA server with an iDDS relay on 127.0.0.1; see the module docstring.

    Parameters
    ----------
    vo : `str`, optional
        The VO tokens are issued for by default (``PANDA_AUTH_VO``).

    Notes
    -----
    Use as a context manager, or call `start` and `close`. All state is guarded by one lock:
    control methods may be called from the test while a client is talking to the server.
    """

    def __init__(self, vo: str = "Rubin") -> None:
        self.vo = vo
        self._key = secrets.token_bytes(32)
        self._revoked: set[str] = set()
        self._lock = threading.RLock()
        self._requests: dict[int, IddsRequest] = {}
        self._tasks: dict[int, JediTask] = {}
        self._workflows: list[RecordedWorkflow] = []
        self._uploads: dict[str, bytes] = {}
        self._calls: list[tuple[str, str]] = []  # (path, command or "")
        self._fail_next: list[int] = []
        self._next_request_id = 1001
        self._next_transform_id = 1
        self._next_task_id = 50001
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PandaTestServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        server = self

        class Handler(_Handler):
            panda = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> PandaTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The value of ``PANDA_URL``, ``PANDA_URL_SSL`` and ``PANDACACHE_URL``."""
        return f"{self.base_url}/server/panda"

    # ------------------------------------------------------------------ tokens
    def issue_token(
        self, username: str = "operator", vo: str | None = None, lifetime_s: float = 3600.0
    ) -> str:
        """Issue a signed OIDC ID token (a JWT) for ``username`` in ``vo``.

        Parameters
        ----------
        username : `str`, optional
            The token's ``name``; iDDS records it as the request's owner.
        vo : `str`, optional
            The group (VO) the token is valid for; the server's VO by default.
        lifetime_s : `float`, optional
            Seconds until ``exp``; negative for an already expired token.

        Returns
        -------
        token : `str`
            ``header.payload.signature``.
        """
        now = int(time.time())
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {
            "iss": "https://iam.test.invalid/",
            "sub": hashlib.sha256(username.encode()).hexdigest()[:32],
            "name": username,
            "groups": [vo or self.vo],
            "iat": now,
            "exp": int(now + lifetime_s),
            "nonce": secrets.token_hex(8),
        }
        payload = _b64url(json.dumps(claims).encode())
        signature = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(signature)}"

    def revoke(self, token: str) -> None:
        """Make the server refuse ``token`` from now on (as after an IAM revocation)."""
        with self._lock:
            self._revoked.add(token)

    def _authenticate(self, headers: Mapping[str, str] | email.message.Message) -> str | None:
        """The user name of a valid bearer token, `None` without one; raises `_CallError`."""
        authorization = headers.get("Authorization")
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or token.count(".") != 2:
            raise _CallError(403, f"{AUTH_FAILED} invalid token")
        header, payload, signature = token.split(".")
        expected = hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        try:
            valid = hmac.compare_digest(_b64url_decode(signature), expected)
            claims = json.loads(_b64url_decode(payload))
        except (ValueError, UnicodeDecodeError):
            valid, claims = False, {}
        if not valid or token in self._revoked:
            raise _CallError(403, f"{AUTH_FAILED} invalid token")
        if claims.get("exp", 0) <= time.time():
            raise _CallError(403, f"{AUTH_FAILED} token expired")
        origin = headers.get("Origin")
        if origin not in claims.get("groups", []):
            raise _CallError(403, f"{AUTH_FAILED} {origin} is not a VO of the token")
        return str(claims["name"])

    # ------------------------------------------------------------------ inspection
    @property
    def workflows(self) -> list[RecordedWorkflow]:
        """Every workflow received (``submit`` and ``submit_build``), oldest first."""
        with self._lock:
            return list(self._workflows)

    def works(self, request_id: int | str) -> list[dict[str, Any]]:
        """The works of a request's workflow (see `works_of`)."""
        with self._lock:
            return [dict(w) for w in self._request(request_id).works]

    def request(self, request_id: int | str) -> IddsRequest:
        """A request (the live object: read it, change it through the control methods)."""
        with self._lock:
            return self._request(request_id)

    def build_signature(self, request_id: int | str) -> str:
        """The signature iDDS gives a build job (``IDDS_BUIL_SIGNATURE``) for its request."""
        with self._lock:
            return self._request(request_id).signature

    @property
    def requests(self) -> dict[int, IddsRequest]:
        """All requests by id."""
        with self._lock:
            return dict(self._requests)

    @property
    def uploads(self) -> dict[str, bytes]:
        """Files received by ``file_server/upload_cache_file``, by name."""
        with self._lock:
            return dict(self._uploads)

    @property
    def calls(self) -> list[tuple[str, str]]:
        """Every call answered: ``(path, command)`` (command empty outside the relays)."""
        with self._lock:
            return list(self._calls)

    def commands(self, name: str) -> int:
        """How many relay calls of command ``name`` were answered."""
        return sum(1 for _, command in self.calls if command == name)

    # ------------------------------------------------------------------ control
    def fail_next(self, n: int, code: int = 503) -> None:
        """Answer the next ``n`` calls with HTTP ``code`` (an overloaded server, a balancer)."""
        with self._lock:
            self._fail_next.extend([code] * n)

    def start_request(self, request_id: int | str) -> None:
        """iDDS's agents pick the request up: its transforms appear (with JEDI task ids) and run.

        Parameters
        ----------
        request_id : `int` or `str`
            The request.
        """
        with self._lock:
            req = self._request(request_id)
            if not req.transforms:
                for work in req.works:
                    req.transforms.append(
                        Transform(
                            transform_id=self._next_transform_id,
                            name=work["task_name"],
                            label=work["label"],
                            workload_id=self._next_task_id,
                            total=work["n_jobs"],
                        )
                    )
                    self._next_transform_id += 1
                    self._next_task_id += 1
            for t in req.transforms:
                if t.status not in _TERMINAL:
                    t.status, t.processing = "Transforming", t.total - t.processed - t.failed
            self._set_status(req, "Transforming")

    def finish(self, request_id: int | str) -> None:
        """Every job of the request succeeds."""
        with self._lock:
            req = self._request(request_id)
            if not req.transforms:
                self.start_request(request_id)
            for t in req.transforms:
                t.status, t.processed, t.failed, t.processing = "Finished", t.total, 0, 0
            self._set_status(req, "Finished")

    def fail(self, request_id: int | str, failures: Mapping[str, tuple[int, int]]) -> None:
        """Some jobs fail: ``failures`` maps a label to (number of failed jobs, exit code).

        A label with failures ends ``SubFinished`` (``Failed`` if all its jobs failed); the other
        labels finish; the request ends ``SubFinished``, or ``Failed`` if no job succeeded.
        """
        with self._lock:
            req = self._request(request_id)
            if not req.transforms:
                self.start_request(request_id)
            labels = {t.label for t in req.transforms}
            unknown = set(failures) - labels
            if unknown:
                raise KeyError(f"request {req.request_id} has no label {sorted(unknown)}")
            for t in req.transforms:
                n_failed, code = failures.get(t.label, (0, 0))
                n_failed = min(n_failed, t.total)
                t.failed, t.processed, t.processing = n_failed, t.total - n_failed, 0
                t.exit_code = code
                if n_failed == 0:
                    t.status = "Finished"
                else:
                    t.status = "Failed" if n_failed == t.total else "SubFinished"
            any_ok = any(t.processed for t in req.transforms)
            self._set_status(req, "SubFinished" if any_ok else "Failed")

    def suspend(self, request_id: int | str) -> None:
        """An operator or the system suspends the request."""
        with self._lock:
            self._set_status(self._request(request_id), "Suspended")

    def process_commands(self) -> None:
        """Apply the registered ``abort``/``retry`` commands, as iDDS's agents do."""
        with self._lock:
            for req in self._requests.values():
                for command in req.pending:
                    if command == "abort" and req.status == "ToCancel":
                        for t in req.transforms:
                            if t.status not in _TERMINAL:
                                t.status, t.processing = "Cancelled", 0
                        self._set_status(req, "Cancelled")
                    elif command == "retry" and req.status == "ToResume":
                        for t in req.transforms:
                            if t.failed:
                                t.status = "Transforming"
                                t.processing, t.failed, t.exit_code = t.failed, 0, 0
                        self._set_status(req, "Transforming")
                req.pending.clear()

    def set_task_status(self, task_id: int, status: str) -> None:
        """Move a JEDI task (from ``task/submit``) to ``status`` (``running``, ``done``...)."""
        with self._lock:
            self._tasks[task_id].status = status

    def _set_status(self, req: IddsRequest, status: str) -> None:
        req.status, req.updated_at = status, time.time()

    def _request(self, request_id: int | str) -> IddsRequest:
        try:
            return self._requests[int(request_id)]
        except (KeyError, ValueError):
            raise KeyError(f"no request {request_id!r}") from None

    # ------------------------------------------------------------------ iDDS ClientManager
    def _new_request(self, workflow: dict[str, Any], user: str, kind: str) -> int:
        works = works_of(workflow)
        request_id = self._next_request_id
        self._next_request_id += 1
        name = workflow["attributes"]["template"]["attributes"].get("_name") or f"r{request_id}"
        self._requests[request_id] = IddsRequest(request_id, name, user, kind, works)
        command = "submit_build" if kind == "build" else "submit"
        self._workflows.append(RecordedWorkflow(request_id, command, user, workflow))
        return request_id

    def _idds(self, user: str) -> dict[str, Callable[..., Any]]:
        """The ClientManager commands, each returning what the relay wraps in ``(True, ...)``."""

        def ping() -> Any:
            return {"Status": "OK"}

        def submit(
            workflow: dict[str, Any],
            username: str | None = None,
            userdn: str | None = None,
            use_dataset_name: bool = False,
        ) -> Any:
            template = workflow["attributes"]["template"]["attributes"]
            if template.get("_is_workflow_step"):
                # iDDS stores a step of a big workflow and answers request_id 0.
                return 0
            return self._new_request(workflow, user, "workflow")

        def submit_build(
            workflow: dict[str, Any],
            username: str | None = None,
            userdn: str | None = None,
            use_dataset_name: bool = True,
        ) -> Any:
            return self._new_request(workflow, user, "build")

        def update_build_request(request_id: int, signature: str, workflow: dict[str, Any]) -> Any:
            req = self._request(request_id)
            if req.kind != "build":
                raise ValueError(f"request {request_id} is not a build request")
            if not hmac.compare_digest(str(signature), req.signature):
                raise ValueError(f"wrong signature for build request {request_id}")
            req.works, req.kind, req.transforms = works_of(workflow), "workflow", []
            name = workflow["attributes"]["template"]["attributes"].get("_name")
            req.name = name or req.name
            self._workflows.append(
                RecordedWorkflow(req.request_id, "update_build_request", user, workflow)
            )
            self._set_status(req, "Built")
            return {"request_id": req.request_id}

        def get_requests(
            request_id: int | None = None,
            workload_id: int | None = None,
            with_detail: bool = False,
            with_metadata: bool = False,
        ) -> Any:
            reqs = [
                r
                for r in self._requests.values()
                if request_id is None or r.request_id == int(request_id)
            ]
            rows = []
            for req in reqs:
                if not with_detail:
                    rows.append(req.row())
                elif not req.transforms:
                    # The outer join of requests and transforms before iDDS made any transform.
                    rows.append({**req.row(), "transform_id": None, "transform_name": None})
                else:
                    rows.extend({**req.row(), **t.row_fields()} for t in req.transforms)
            return rows

        def get_status(
            request_id: int | None = None,
            workload_id: int | None = None,
            with_detail: bool = False,
            with_metadata: bool = False,
        ) -> Any:
            lines = ["request_id  status  errors"]
            lines += [
                f"{r['request_id']}  {r['status']['attributes']['_name_']}  None"
                for r in get_requests(request_id)
            ]
            return "\n".join(lines)

        def get_contents_output_ext(
            request_id: int | None = None,
            workload_id: int | None = None,
            transform_id: int | None = None,
            group_by_jedi_task_id: bool = False,
        ) -> Any:
            if request_id is None:
                raise ValueError("request_id must not be None")
            req = self._request(request_id)
            contents: dict[Any, list[dict[str, Any]]] = {}
            for t in req.transforms:
                if workload_id is not None and t.workload_id != int(workload_id):
                    continue
                key = t.workload_id if group_by_jedi_task_id else t.transform_id
                contents[key] = [self._job_row(req, t, i) for i in range(t.total)]
            return contents

        def abort(request_id: int | None = None, workload_id: int | None = None) -> Any:
            return register("abort", "ToCancel", request_id)

        def retry(request_id: int | None = None, workload_id: int | None = None) -> Any:
            return register("retry", "ToResume", request_id)

        def register(command: str, status: str, request_id: int | None) -> Any:
            if request_id is None:
                return (
                    -1,
                    "Both request_id and workload_id are None. One of them should not be None",
                )
            req = self._requests.get(int(request_id))
            if req is None:
                return [(-1, {"status": -1, "message": "No match requests"})]
            if req.username != user:
                message = f"User {user} has no permission to update request {req.request_id}"
                return [(-1, {"status": -1, "message": message})]
            req.pending.append(command)
            # The command is registered in any state; the agents act only where it applies
            # (aborting a finished request, or retrying a running one, changes nothing).
            if (command == "abort" and req.status not in _TERMINAL) or (
                command == "retry" and req.status in ("SubFinished", "Failed")
            ):
                self._set_status(req, status)
            return [(0, {"status": 0, "message": "Command registered successfully"})]

        return {
            "ping": ping,
            "submit": submit,
            "submit_build": submit_build,
            "update_build_request": update_build_request,
            "get_requests": get_requests,
            "get_status": get_status,
            "get_contents_output_ext": get_contents_output_ext,
            "abort": abort,
            "retry": retry,
        }

    @staticmethod
    def _job_row(req: IddsRequest, t: Transform, i: int) -> dict[str, Any]:
        if i < t.processed:
            status, code = "Finished", 0
        elif i < t.processed + t.failed:
            status, code = "Failed", t.exit_code
        elif t.status == "Cancelled":
            status, code = "Cancelled", None
        else:
            status, code = "Processing", None
        return {
            "content_id": t.transform_id * 100000 + i,
            "transform_id": t.transform_id,
            "request_id": req.request_id,
            "workload_id": t.workload_id,
            "map_id": i + 1,
            "scope": "pseudo_dataset",
            "name": f"{t.label}:job{i}",
            "status": status,
            "panda_id": t.workload_id * 100000 + i,
            "jedi_task_id": t.workload_id,
            "job_status": status.lower(),
            "trans_exit_code": code,
            "exe_exit_code": code,
            "exe_exit_diag": f"exit code {code}" if code else None,
            "attempt_nr": 1,
        }

    def relay(self, user: str | None, params: Mapping[str, Any], with_owner_check: bool) -> Any:
        """Answer a relayed iDDS command: ``(True, result)`` or ``(False, message)``."""
        if user is None:
            return (False, MESSAGE_SSL)
        command = str(params.get("command_name", ""))
        command = command.split("+", 1)[0]  # "<command>+<iDDS host>"
        with self._lock:
            self._calls.append(("relay", command))
            commands = self._idds(user)
            if command not in commands:
                return (False, f"{command} is not a command of iDDS ClientManager")
            try:
                args = json.loads(params["args"]) if params.get("args") else []
                kwargs = json.loads(params["kwargs"]) if params.get("kwargs") else {}
                if with_owner_check and command in ("abort", "retry"):
                    req = self._requests.get(int(kwargs.get("request_id") or 0))
                    if req is None:
                        return (False, f"request {kwargs.get('request_id')} is not found")
                    if req.username != user:
                        return (False, f"request {req.request_id} is not owned by {user}")
                return (True, commands[command](*args, **kwargs))
            except Exception as exc:
                return (False, f"failed to execute command with {exc}")

    # ------------------------------------------------------------------ PanDA v1 API
    def api(self, user: str | None, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Answer ``/api/v1/<path>`` in the ``{"success", "message", "data"}`` envelope."""

        def response(success: bool, message: str = "", data: Any = None) -> dict[str, Any]:
            return {"success": success, "message": message, "data": data}

        with self._lock:
            self._calls.append((f"api/v1/{path}", ""))
            if path == "system/is_alive":
                return response(True)
            if user is None:
                return response(False, MESSAGE_SSL)
            if path == "task/submit":
                task_params = params.get("task_parameters")
                if isinstance(task_params, str):
                    task_params = json.loads(task_params)
                if not isinstance(task_params, dict) or "taskName" not in task_params:
                    return response(False, "task parameters need taskName", 4)
                new = JediTask(self._next_task_id, user, task_params)
                self._next_task_id += 1
                self._tasks[new.task_id] = new
                return response(True, f"succeeded. new jediTaskID={new.task_id}", new.task_id)
            if path == "job/get_description":
                ids = [int(i) for i in params.get("job_ids") or []]
                jobs = {j: t for t in self._tasks.values() for j in t.job_ids}
                return response(
                    True,
                    data=[
                        {"PandaID": j, "jediTaskID": jobs[j].task_id, "jobStatus": "finished"}
                        if j in jobs
                        else None
                        for j in ids
                    ],
                )
            try:
                task_id = int(params.get("task_id", ""))
            except ValueError:
                return response(False, "task_id must be an integer")
            task = self._tasks.get(task_id)
            if path in ("task/get_status", "task/get_details", "task/get_task_parameters"):
                if task is None:
                    return response(False, "Task not found")
                if path == "task/get_status":
                    return response(True, data=task.status)
                if path == "task/get_task_parameters":
                    return response(True, data=task.params)
                return response(
                    True,
                    data={"jediTaskID": task.task_id, "status": task.status, "owner": task.owner},
                )
            if path == "task/get_job_ids":
                return response(True, data=[] if task is None else list(task.job_ids))
            if path == "job/get_metadata_for_analysis_jobs":
                return response(True, data={})
            command = path.removeprefix("task/")
            if command in ("kill", "finish", "retry", "pause", "resume", "reactivate"):
                if task is None:
                    return response(command == "retry", f"jediTaskID={task_id} not found", 2)
                if task.owner != user:
                    return response(command == "retry", "permission denied", 3)
                if command == "retry" and task.status in ("registered", "defined"):
                    return response(True, f"Command rejected: the task is in {task.status}", 4)
                target = {
                    "kill": "aborting",
                    "finish": "finishing",
                    "retry": "ready",
                    "pause": "paused",
                    "resume": "running",
                    "reactivate": "ready",
                }[command]
                task.status = target
                return response(True, "command is registered. will be executed in a few minutes", 0)
            return response(False, f"method {path} is not emulated")

    def upload(self, user: str | None, name: str, content: bytes) -> dict[str, Any]:
        """Store a file sent to ``file_server/upload_cache_file``."""
        with self._lock:
            self._calls.append(("api/v1/file_server/upload_cache_file", ""))
            if user is None:
                return {"success": False, "message": MESSAGE_SSL, "data": None}
            self._uploads[name] = content
            return {"success": True, "message": "", "data": None}

    def take_failure(self) -> int | None:
        """The HTTP code to answer this call with, if `fail_next` asked for one."""
        with self._lock:
            return self._fail_next.pop(0) if self._fail_next else None

    def record_refused(self, path: str) -> None:
        """Count a call refused before dispatch (a 403 or an injected failure)."""
        with self._lock:
            self._calls.append((path, "<refused>"))


# ----------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    panda: PandaTestServer
    server_version = "PandaTestServer/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        # Tests read the recorded calls; request lines on stderr are noise.
        pass

    def _reply(self, code: int, body: bytes | str, content_type: str = "text/plain") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path = url.path
        body = self._body() if method == "POST" else b""
        failure = self.panda.take_failure()
        if failure is not None:
            self.panda.record_refused(path)
            self._reply(failure, f"ERROR : service unavailable ({failure})")
            return
        for prefix in ("/cache/", "/server/panda/cache/"):
            if method == "GET" and path.startswith(prefix):
                # The cache is served without authentication, as Apache serves it.
                content = self.panda.uploads.get(path[len(prefix) :])
                if content is None:
                    self._reply(404, "not found")
                else:
                    self._reply(200, content, "application/octet-stream")
                return
        if path.startswith("/auth/"):
            # No identity provider here: the device-code flow cannot start.
            self._reply(404, "not found")
            return
        try:
            user = self.panda._authenticate(self.headers)
        except _CallError as err:
            self.panda.record_refused(path)
            self._reply(err.code, err.body)
            return
        try:
            if path in ("/server/panda/relay_idds_command",):
                params = self._legacy_params(body)
                result = self.panda.relay(user, params, with_owner_check=False)
                self._reply(200, json.dumps(result))
            elif path == "/server/panda/execute_idds_workflow_command":
                params = self._legacy_params(body)
                result = self.panda.relay(user, params, with_owner_check=True)
                self._reply(200, json.dumps(result))
            elif path == "/api/v1/file_server/upload_cache_file" and method == "POST":
                name, content = self._multipart_file(body)
                self._reply(
                    200, json.dumps(self.panda.upload(user, name, content)), "application/json"
                )
            elif path.startswith("/api/v1/"):
                params = self._api_params(method, url.query, body)
                result = self.panda.api(user, path.removeprefix("/api/v1/"), params)
                self._reply(200, json.dumps(result), "application/json")
            else:
                self._reply(403, f"ERROR : method {path} is forbidden")
        except Exception as exc:  # a malformed request: panda-server answers 500 with the error
            self._reply(500, str(exc))

    def _legacy_params(self, body: bytes) -> dict[str, Any]:
        if self.headers.get("Content-Type") == "application/json":
            # panda-server's parse_json_parameters_legacy: always gzip, True/False as strings.
            params = json.loads(gzip.decompress(body))
            return {
                k: ("True" if v is True else "False" if v is False else v)
                for k, v in params.items()
            }
        return dict(parse_qsl(body.decode(), keep_blank_values=True))

    def _api_params(self, method: str, query: str, body: bytes) -> dict[str, Any]:
        if method == "POST" and self.headers.get("Content-Type") == "application/json":
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            return dict(json.loads(body or b"{}"))
        pairs: dict[str, list[str]] = {}
        for key, value in parse_qsl(
            query if method == "GET" else body.decode(), keep_blank_values=True
        ):
            pairs.setdefault(key, []).append(value)
        return {k: v[0] if len(v) == 1 else v for k, v in pairs.items()}

    def _multipart_file(self, body: bytes) -> tuple[str, bytes]:
        head = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                filename = part.get_filename() or "upload"
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return filename.rsplit("/", 1)[-1], payload
        raise ValueError("no 'file' part in the upload")


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (for 'server unreachable' tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
