"""The PanDA workload service: BPS submissions of one site, through the real ctrl_bps_panda.

`PandaWorkload` implements `~drp_campaign.backends.interfaces.WorkloadService` for one data
facility. Each call runs in a child process (`drp_campaign.backends.panda_worker`) whose
environment is built from the site's `PandaSettings`, because panda-client reads its settings
(``PANDA_URL_SSL``, ``PANDA_AUTH_VO``...) once, when ``pandaclient.Client`` is imported: one
process can only ever talk to one PanDA server as one identity, and the sites of a campaign may
use different servers, VOs or tokens. The child uses the unchanged ``lsst.ctrl.bps`` machinery:

- ``submit``: BPS's prepare + submit of our rendered submit file (`drp_campaign.model.bps`).
  With a prebuilt graph, BPS's ``qgraphFile`` (BPS copies it, rewrites its output run with
  ``pipetask update-graph-run``, stages it to ``fileDistributionEndPoint`` and sends the iDDS
  workflow). Without one, a ``remoteBuild`` submission: BPS uploads the submit file to the PanDA
  cache and one build job at the site builds the graph against the site's Butler and submits the
  workflow from there (DESIGN.md section 5, step 3).
- ``status``: ``PanDAService.get_status`` for the state (iDDS ``Finished`` -> ``SUCCEEDED``;
  ``SubFinished``, ``Failed``, ``Expired`` -> ``FAILED``; ``Cancelled`` -> ``CANCELLED``;
  ``Suspended`` -> ``HELD``; anything else, including ``ToCancel`` and ``ToResume`` while iDDS has
  not acted yet, -> ``RUNNING``) and ``PanDAService.report`` for the per-label counts and exit
  codes, as ``bps report`` shows them.
- ``cancel``: iDDS ``abort``; ``restart``: iDDS ``retry`` of the failed jobs (same request id).
  iDDS only registers these commands: the state changes when its agents act, so callers poll.

Errors: refused credentials (panda-client's ``SystemExit(255)``, the server's HTTP 403) raise
`WorkloadAuthError` with what to run to get a new token; a server that does not answer is tried
again with exponential backoff, then `WorkloadError` names the URL. The ID token goes to the
child in ``PANDA_AUTH_ID_TOKEN`` only: never on a command line, in a ``repr``, a log line or an
exception message (every message is scrubbed), nor in BPS's environment dump in the submit
directory (the child redacts it).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .interfaces import (
    LabelReport,
    WorkloadAuthError,
    WorkloadError,
    WorkloadState,
    WorkloadStatus,
)

__all__ = [
    "DEFAULT_CONFIG_ROOT",
    "WORKER_MODULE",
    "PandaSettings",
    "PandaWorkload",
    "label_reports",
    "workload_state",
]

_LOG = logging.getLogger(__name__)

WORKER_MODULE = "drp_campaign.backends.panda_worker"

#: Parent of the sites' default ``PANDA_CONFIG_ROOT`` (``~/.panda/drp-campaign/<site>``).
DEFAULT_CONFIG_ROOT = Path("~/.panda/drp-campaign")

#: Environment variables of panda-client, iDDS and OIDC tools that must not leak from this
#: process into a site's child: the child's identity comes from its `PandaSettings` only.
_CLIENT_ENV_PREFIXES = ("PANDA", "OIDC_", "IDDS_", "X509_USER_PROXY", "DRP_CAMPAIGN_IDDS")

#: BPS's ``WmsStates`` names (what ``PanDAService.get_status`` returns) -> our states.
_BPS_STATES = {
    "SUCCEEDED": WorkloadState.SUCCEEDED,
    "FAILED": WorkloadState.FAILED,
    "PRUNED": WorkloadState.FAILED,
    "DELETED": WorkloadState.CANCELLED,
    "HELD": WorkloadState.HELD,
    "RUNNING": WorkloadState.RUNNING,
    "PENDING": WorkloadState.RUNNING,
    "READY": WorkloadState.RUNNING,
    "UNREADY": WorkloadState.RUNNING,
    "MISFIT": WorkloadState.RUNNING,
}


def workload_state(bps_state: str) -> WorkloadState:
    """Fold a BPS ``WmsStates`` name into a `WorkloadState`.

    Parameters
    ----------
    bps_state : `str`
        ``SUCCEEDED``, ``FAILED``, ``DELETED``, ``HELD``, ``RUNNING``...

    Returns
    -------
    state : `WorkloadState`
        ``DELETED`` is ``CANCELLED``; ``PRUNED`` is ``FAILED``; states of a run still in
        progress are ``RUNNING``.

    Raises
    ------
    WorkloadError
        For ``UNKNOWN`` or a name BPS does not define.
    """
    try:
        return _BPS_STATES[bps_state]
    except KeyError:
        raise WorkloadError(
            f"PanDA reported the state {bps_state!r}, which means nothing here"
        ) from None


def label_reports(labels: list[Mapping[str, Any]]) -> tuple[LabelReport, ...]:
    """Build `LabelReport` objects from the per-label summary of ``PanDAService.report``.

    Parameters
    ----------
    labels : `list` [mapping]
        Each with ``label``, ``counts`` (``WmsStates`` name -> jobs; they add up to the label's
        jobs, BPS counting the not-yet-ready ones as ``UNREADY``) and ``exit_codes`` (of the
        failed jobs).

    Returns
    -------
    reports : `tuple` [`LabelReport`, ...]
        In the order PanDA reported them; ``exit_codes`` are the distinct non-zero codes, sorted.
    """
    reports = []
    for entry in labels:
        counts = {str(k): int(v) for k, v in entry["counts"].items()}
        codes = {int(c) for c in entry.get("exit_codes", []) if c not in (None, 0)}
        reports.append(
            LabelReport(
                label=str(entry["label"]),
                total=sum(counts.values()),
                succeeded=counts.get("SUCCEEDED", 0),
                failed=counts.get("FAILED", 0),
                exit_codes=tuple(sorted(codes)),
            )
        )
    return tuple(reports)


def _token_expiry(token: str) -> datetime | None:
    """The ``exp`` of a JWT (read, not verified: the server verifies), `None` if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return datetime.fromtimestamp(float(claims["exp"]), UTC)
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True, kw_only=True)
class PandaSettings:
    """How one data facility reaches PanDA: panda-client's environment, from its credentials.

    Parameters
    ----------
    site : `str`
        The site's name in the campaign spec (``USDF``); names the site in messages.
    panda_url : `str`
        ``PANDA_URL``, e.g. ``https://usdf-panda-server.slac.stanford.edu:8443/server/panda``.
    panda_url_ssl : `str`
        ``PANDA_URL_SSL`` (iDDS relay calls go to ``<panda_url_ssl>/relay_idds_command``, v1 API
        calls to its scheme and host).
    cache_url : `str`
        ``PANDACACHE_URL`` (remote builds upload the submit file there).
    auth : `str`, optional
        ``PANDA_AUTH``; only ``"oidc"`` is supported.
    auth_vo : `str`, optional
        ``PANDA_AUTH_VO``, sent as the ``Origin`` header (``Rubin``, ``Rubin:production``).
    id_token : `str`
        The OIDC ID token (``PANDA_AUTH_ID_TOKEN``). Secret: left out of ``repr``, passed to the
        child process in its environment only.
    verify_host : `bool`, optional
        Verify the server's certificate (``PANDA_VERIFY_HOST``).
    config_root : `pathlib.Path`, optional
        ``PANDA_CONFIG_ROOT``: panda-client's token cache directory (one per site, so sites do
        not overwrite each other's cache); ``~/.panda/drp-campaign/<site>`` by default.
    run_temp_space : `str`, optional
        ``LSST_RUN_TEMP_SPACE``: where a submission with a prebuilt graph stages the graph and
        the Butler config (the rendered ``fileDistributionEndPoint`` is
        ``${LSST_RUN_TEMP_SPACE}/panda_cache_box/...``); it must be reachable from this host
        and from the site's worker nodes. Not needed for remote builds.
    idds_server : `str`, optional
        The iDDS server, when not the PanDA relay's default; must match the submit file's
        ``iddsServer``.

    Notes
    -----
    Build it where the token is unwrapped (the ``PandaCredentials`` block's ``panda_settings``)
    and hand it straight to `PandaWorkload`; do not return it from a Prefect task or pickle it.
    """

    site: str
    panda_url: str
    panda_url_ssl: str
    cache_url: str
    auth: str = "oidc"
    auth_vo: str = "Rubin"
    id_token: str = field(repr=False)
    verify_host: bool = True
    config_root: Path = DEFAULT_CONFIG_ROOT
    run_temp_space: str | None = None
    idds_server: str | None = None

    def __post_init__(self) -> None:
        root = Path(self.config_root)
        if root == DEFAULT_CONFIG_ROOT:
            root = root.expanduser() / str(self.site)
        object.__setattr__(self, "config_root", root)
        who = f"PanDA settings of site {self.site!r}"
        if not isinstance(self.site, str) or not self.site.strip():
            raise ValueError(f"PanDA settings need a site name, not {self.site!r}")
        for key in ("panda_url", "panda_url_ssl", "cache_url"):
            value = getattr(self, key)
            parsed = urlparse(value) if isinstance(value, str) else None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(
                    f"{who}: {key} {value!r} is not an http(s) URL such as "
                    "https://usdf-panda-server.slac.stanford.edu:8443/server/panda"
                )
        if self.auth != "oidc":
            raise ValueError(f"{who}: auth {self.auth!r} is not supported; use 'oidc'")
        if not isinstance(self.auth_vo, str) or not self.auth_vo.strip():
            raise ValueError(f"{who}: auth_vo must name the VO (Rubin), not {self.auth_vo!r}")
        # The token's value is never quoted, even in these errors.
        if not isinstance(self.id_token, str) or not self.id_token.strip():
            raise ValueError(f"{who}: id_token is empty; set the OIDC ID token PanDA issued")
        if any(c.isspace() for c in self.id_token):
            raise ValueError(
                f"{who}: id_token contains whitespace (a pasted line break?); set the bare token"
            )

    @classmethod
    def from_mapping(
        cls, site: str, values: Mapping[str, Any], *, config_root: str | Path | None = None
    ) -> PandaSettings:
        """Build settings from a mapping, e.g. ``PandaCredentials.panda_settings(site)``.

        Parameters
        ----------
        site : `str`
            The site's name.
        values : mapping
            ``panda_url``, ``panda_url_ssl``, ``cache_url``, ``id_token``, and optionally
            ``auth``, ``auth_vo``, ``verify_host``, ``config_root``, ``run_temp_space``,
            ``idds_server``. Other keys are refused (a typo would silently drop a setting).
        config_root : `str` or `pathlib.Path`, optional
            Overrides ``values["config_root"]``; default ``~/.panda/drp-campaign/<site>``.

        Returns
        -------
        settings : `PandaSettings`
            The validated settings.
        """
        known = {
            "panda_url",
            "panda_url_ssl",
            "cache_url",
            "auth",
            "auth_vo",
            "id_token",
            "verify_host",
            "config_root",
            "run_temp_space",
            "idds_server",
        }
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"PanDA settings of site {site!r}: unknown keys {unknown}; known: {sorted(known)}"
            )
        missing = sorted({"panda_url", "panda_url_ssl", "cache_url", "id_token"} - set(values))
        if missing:
            raise ValueError(f"PanDA settings of site {site!r}: missing {missing}")
        kwargs = dict(values)
        given_root = kwargs.pop("config_root", None)
        root = Path(config_root or given_root or DEFAULT_CONFIG_ROOT)
        verify = kwargs.pop("verify_host", True)
        if isinstance(verify, str):
            verify = verify.strip().lower() not in ("off", "false", "0", "no")
        return cls(site=site, config_root=root, verify_host=bool(verify), **kwargs)

    @property
    def token_expiry(self) -> datetime | None:
        """When the ID token expires (its JWT ``exp``), `None` if it is not a JWT."""
        return _token_expiry(self.id_token)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a child process talking to this site's PanDA.

        Parameters
        ----------
        base : mapping, optional
            The environment to start from (`os.environ` by default). Its panda-client, iDDS and
            OIDC variables are dropped, so nothing but these settings decides the identity.

        Returns
        -------
        env : `dict` [`str`, `str`]
            ``base`` plus ``PANDA_URL``, ``PANDA_URL_SSL``, ``PANDACACHE_URL``, ``PANDA_AUTH``,
            ``PANDA_AUTH_VO``, ``PANDA_AUTH_ID_TOKEN``, ``PANDA_CONFIG_ROOT``,
            ``PANDA_VERIFY_HOST``, ``PANDA_BEHIND_REAL_LB`` (no DNS lookup of the cache host at
            import), ``CTRL_MPEXEC_DIR``/``DAF_BUTLER_DIR`` (BPS command templates) and the
            interpreter's ``bin`` first on ``PATH`` (BPS runs ``pipetask``).
        """
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith(_CLIENT_ENV_PREFIXES)
        }
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
        env.setdefault("CTRL_MPEXEC_DIR", sys.prefix)
        env.setdefault("DAF_BUTLER_DIR", sys.prefix)
        env.update(
            {
                "PANDA_URL": self.panda_url,
                "PANDA_URL_SSL": self.panda_url_ssl,
                "PANDACACHE_URL": self.cache_url,
                "PANDA_AUTH": self.auth,
                "PANDA_AUTH_VO": self.auth_vo,
                "PANDA_AUTH_ID_TOKEN": self.id_token,
                "PANDA_CONFIG_ROOT": str(self.config_root),
                "PANDA_VERIFY_HOST": "on" if self.verify_host else "off",
                "PANDA_BEHIND_REAL_LB": "1",
            }
        )
        if self.run_temp_space is not None:
            env["LSST_RUN_TEMP_SPACE"] = self.run_temp_space
        if self.idds_server is not None:
            env["DRP_CAMPAIGN_IDDS_SERVER"] = self.idds_server
        return env

    def refresh_hint(self) -> str:
        """What an operator runs to get a new ID token for this site."""
        root = self.config_root
        return (
            f"Get a new token: in a shell with PANDA_URL={self.panda_url} "
            f"PANDA_URL_SSL={self.panda_url_ssl} PANDA_AUTH=oidc PANDA_AUTH_VO={self.auth_vo} "
            f"PANDA_CONFIG_ROOT={root} exported, run `panda_auth reset` (with a pip-installed "
            "stack: python -c 'from lsst.ctrl.bps.panda.cli.panda_auth import main; main()' "
            "reset) and log in at the URL it prints (`panda_auth refresh` renews a token that "
            f"has not expired yet); then copy the id_token from {root}/.token into the id_token "
            f"of site {self.site}'s PandaCredentials block."
        )


class PandaWorkload:
    """`~drp_campaign.backends.interfaces.WorkloadService` on PanDA for one data facility.

    Parameters
    ----------
    settings : `PandaSettings`
        The site's PanDA settings and credentials.
    work_dir : `pathlib.Path`, optional
        The child's working directory: BPS's default ``submitPath`` is
        ``${PWD}/submit/{outputRun}``. The current directory by default.
    retries : `int`, optional
        Attempts of a call (and of the ping before a submission) before giving up.
    backoff_s : `float`, optional
        Delay before the second attempt; it doubles for each further attempt.
    timeout_s : `float`, optional
        Longest a child may run (a submission stages the graph; large graphs take minutes).
    python : `str`, optional
        The interpreter of the child; this one by default.
    """

    def __init__(
        self,
        settings: PandaSettings,
        *,
        work_dir: str | Path | None = None,
        retries: int = 4,
        backoff_s: float = 5.0,
        timeout_s: float = 3600.0,
        python: str | None = None,
    ) -> None:
        if retries < 1:
            raise ValueError(f"retries must be at least 1, not {retries}")
        self.settings = settings
        self.work_dir = Path(work_dir) if work_dir is not None else Path.cwd()
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.python = python or sys.executable

    def __repr__(self) -> str:
        return f"PandaWorkload(site={self.settings.site!r}, url={self.settings.panda_url_ssl!r})"

    @property
    def site(self) -> str:
        """The data facility this service submits for."""
        return self.settings.site

    # ------------------------------------------------------------------ WorkloadService
    def ping(self) -> None:
        """Check that PanDA (through its iDDS relay) answers and accepts the credentials.

        Raises
        ------
        WorkloadAuthError
            If the credentials are refused.
        WorkloadError
            If the server cannot be reached or answers with an error.
        """
        self._call("ping", {})

    def submit(self, submit_yaml: Path, graph: Path | None = None) -> str:
        """Submit a BPS submit file rendered with ``workload="panda"``.

        Parameters
        ----------
        submit_yaml : `pathlib.Path`
            The submit file (`drp_campaign.model.bps.render_submit_yaml`).
        graph : `pathlib.Path`, optional
            A prebuilt QuantumGraph (BPS ``qgraphFile``); without one, the graph is built at the
            site (BPS ``remoteBuild``).

        Returns
        -------
        run_id : `str`
            The iDDS request id.

        Raises
        ------
        WorkloadAuthError, WorkloadError
            If nothing was submitted; the message says why.
        """
        payload: dict[str, Any] = {"submit_yaml": str(Path(submit_yaml).resolve())}
        payload["graph"] = None if graph is None else str(Path(graph).resolve())
        result = self._call("submit", payload)
        _LOG.info(
            "site %s: submitted %s as PanDA request %s (%s)",
            self.site,
            Path(submit_yaml).name,
            result["run_id"],
            "remote build" if result.get("remote_build") else "prebuilt graph",
        )
        return str(result["run_id"])

    def status(self, run_id: str) -> WorkloadStatus:
        """State of a request, with per-label job counts and exit codes.

        Parameters
        ----------
        run_id : `str`
            The iDDS request id.

        Returns
        -------
        status : `WorkloadStatus`
            The folded state and a `LabelReport` per pipetask label (and ``pipetaskInit``,
            ``finalJob``) once iDDS has made the label's PanDA task.
        """
        result = self._call("status", {"run_id": str(run_id)}, run_id=run_id)
        return WorkloadStatus(
            run_id=str(run_id),
            state=workload_state(result["state"]),
            labels=label_reports(result["labels"]),
            message=self._scrub(result.get("message") or ""),
        )

    def cancel(self, run_id: str) -> None:
        """Ask iDDS to abort a request; `status` shows ``CANCELLED`` once iDDS has acted.

        Parameters
        ----------
        run_id : `str`
            The iDDS request id.
        """
        self._call("cancel", {"run_id": str(run_id)}, run_id=run_id)

    def restart(self, run_id: str) -> str:
        """Ask iDDS to retry the failed jobs of a finished request.

        Parameters
        ----------
        run_id : `str`
            The iDDS request id.

        Returns
        -------
        run_id : `str`
            The id to poll from now on (iDDS retries in place: the same id).
        """
        result = self._call("restart", {"run_id": str(run_id)}, run_id=run_id)
        return str(result["run_id"])

    # ------------------------------------------------------------------ the child
    def _scrub(self, text: str) -> str:
        token = self.settings.id_token
        return text.replace(token, "<redacted>") if token else text

    def _check_token(self, op: str) -> None:
        expiry = self.settings.token_expiry
        if expiry is not None and expiry <= datetime.now(UTC):
            raise WorkloadAuthError(
                f"the PanDA ID token of site {self.site} expired at "
                f"{expiry:%Y-%m-%d %H:%M:%S} UTC, so {op} was not attempted. "
                + self.settings.refresh_hint()
            )

    def _call(self, op: str, payload: dict[str, Any], run_id: str | None = None) -> Any:
        self._check_token(op)
        request = {**payload, "retries": self.retries, "backoff_s": self.backoff_s}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.settings.config_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        argv = [self.python, "-m", WORKER_MODULE, op]
        try:
            proc = subprocess.run(
                argv,
                input=json.dumps(request),
                capture_output=True,
                text=True,
                # BPS's default submitPath is ${PWD}/submit/...: PWD must be the child's cwd.
                env={**self.settings.environment(), "PWD": str(self.work_dir.resolve())},
                cwd=self.work_dir,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise WorkloadError(
                f"PanDA {op} for site {self.site} did not finish within {self.timeout_s:.0f} s "
                f"({self.settings.panda_url_ssl})"
            ) from exc
        stderr = self._scrub(proc.stderr or "")
        if stderr:
            _LOG.debug("site %s: PanDA %s child output:\n%s", self.site, op, stderr[-20000:])
        answer = self._answer(proc.stdout)
        if answer is None:
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            raise WorkloadError(
                f"the PanDA {op} process for site {self.site} failed (exit status "
                f"{proc.returncode}) without an answer; its last output:\n{tail}"
            )
        if answer.get("ok"):
            return answer.get("result", {})
        raise self._error(op, answer.get("error") or {}, run_id)

    @staticmethod
    def _answer(stdout: str) -> dict[str, Any] | None:
        for line in reversed((stdout or "").strip().splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "ok" in value:
                return value
        return None

    def _error(self, op: str, error: Mapping[str, Any], run_id: str | None) -> WorkloadError:
        kind = str(error.get("kind", "refused"))
        message = self._scrub(str(error.get("message", "no message")))
        attempts = int(error.get("attempts", 1))
        url = self.settings.panda_url_ssl
        what = f"{op} of request {run_id}" if run_id is not None else op
        if kind == "auth":
            return WorkloadAuthError(
                f"PanDA at {url} refused the credentials of site {self.site} (VO "
                f"{self.settings.auth_vo}) for {what}: the OIDC ID token is expired, revoked or "
                f"not valid for this VO ({message}). " + self.settings.refresh_hint()
            )
        if kind == "unreachable":
            return WorkloadError(
                f"PanDA server {url} of site {self.site} did not answer {what} after {attempts} "
                f"attempt(s) ({message}); check the URL in the site's PanDA settings, this "
                "host's network and proxy, and the server's status. Nothing was changed."
            )
        if kind == "not_found":
            return WorkloadError(
                f"PanDA at {url} has no request {run_id} for site {self.site} ({message}); "
                "check the run id (drp-campaign records it in the ledger as run_id)"
            )
        if kind == "invalid":
            return WorkloadError(f"site {self.site}: {message}")
        if kind == "rejected":
            return WorkloadError(f"PanDA at {url} rejected {what} for site {self.site}: {message}")
        if kind == "internal":
            return WorkloadError(
                f"PanDA {what} for site {self.site} failed unexpectedly: {message} (the "
                f"traceback is in the debug log of {__name__})"
            )
        return WorkloadError(
            f"PanDA server {url} of site {self.site} answered {what} with an error after "
            f"{attempts} attempt(s): {message}"
        )
