"""The child process of `drp_campaign.backends.panda.PandaWorkload`: one PanDA call, one site.

panda-client reads its settings (``PANDA_URL_SSL``, ``PANDA_AUTH``...) when ``pandaclient.Client``
is first imported, so a process can talk to one PanDA server with one identity only. The parent
starts this module with the site's environment::

    python -m drp_campaign.backends.panda_worker <op>  < request.json

``<op>`` is ``ping``, ``submit``, ``status``, ``cancel`` or ``restart``; the request (paths, run
id, retry policy) comes on stdin, never on the command line; the ID token comes in
``PANDA_AUTH_ID_TOKEN`` only. Every call goes through the unchanged ``lsst.ctrl.bps`` machinery:
BPS's drivers for a submission, ``PanDAService`` for the others.

The answer is one JSON object on stdout: ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": {"kind", "message", "attempts"}}``, ``kind`` being one of

- ``auth``: the credentials were refused;
- ``unreachable``: no HTTP answer from the server, after the retries;
- ``refused``: the server answered with an error, after the retries;
- ``rejected``: iDDS answered but refused the command (e.g. another user's request);
- ``not_found``: no such run;
- ``invalid``: a bad submit file or request;
- ``internal``: an unexpected exception (its traceback is on stderr).

File descriptor 1 points at stderr while the libraries run (BPS prints ``Run Id:`` lines,
panda-client its logs), so nothing but the answer reaches stdout; logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["FINAL_KINDS", "WorkerError", "classify_failure", "main"]

_LOG = logging.getLogger("drp_campaign.backends.panda_worker")


#: Texts by which the PanDA server, its iDDS relay and iDDS say the credentials were refused
#: (panda-server's 403 body, the text BPS checks in iDDS answers, the relay without a token).
AUTH_MARKERS = (
    "Token authentication failed",
    "Authentication no permission",
    "SSL secure connection is required",
)

#: Failures that another attempt cannot fix: only ``refused`` (an HTTP error, a relay failure)
#: and ``unreachable`` are retried.
FINAL_KINDS = frozenset({"auth", "not_found", "invalid", "rejected", "internal"})

#: Exit status panda-client uses with sys.exit when it cannot get a token (no token and the
#: interactive device-code flow failed, or PANDA_AUTH_VO missing).
PANDA_CLIENT_EXIT = 255


class WorkerError(Exception):
    """A failed PanDA call, classified for the parent.

    Parameters
    ----------
    kind : `str`
        ``auth``, ``unreachable``, ``refused``, ``not_found`` or ``invalid``.
    message : `str`
        What happened, as the server or library said it.
    attempts : `int`, optional
        How many times the call was tried.
    """

    def __init__(self, kind: str, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.attempts = attempts


def classify_failure(message: str) -> str:
    """Return ``auth`` if ``message`` says the credentials were refused, else ``refused``.

    Parameters
    ----------
    message : `str`
        An error text from PanDAService, BPS or panda-client.

    Returns
    -------
    kind : `str`
        ``auth`` or ``refused``.
    """
    return "auth" if any(marker in message for marker in AUTH_MARKERS) else "refused"


def _server_answers() -> bool:
    """Whether the PanDA server answers HTTP at all (with any status).

    Asked only after a failure, to tell "no answer" (retry, then report the URL as unreachable)
    from "the server answered with an error". It uses httpx like panda-client, so proxies and
    host verification behave the same, and the v1 health check, which needs no credentials.
    """
    import httpx

    parsed = urlparse(os.environ["PANDA_URL_SSL"])
    url = f"{parsed.scheme}://{parsed.netloc}/api/v1/system/is_alive"
    verify = os.environ.get("PANDA_VERIFY_HOST") != "off"
    try:
        httpx.get(url, verify=verify, timeout=10)
    except httpx.HTTPError:
        return False
    return True


def _with_retries[T](what: str, call: Callable[[], T], retries: int, backoff_s: float) -> T:
    """Run ``call``; retry failures that are not about credentials, with exponential backoff.

    ``call`` raises `WorkerError`; errors of the `FINAL_KINDS` end the call at once (trying
    again cannot help). After the last attempt the error says whether the server
    answered at all.
    """
    attempts = max(1, retries)
    last: WorkerError | None = None
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except WorkerError as err:
            if err.kind in FINAL_KINDS:
                err.attempts = attempt
                raise
            last = err
            if attempt < attempts:
                delay = backoff_s * 2 ** (attempt - 1)
                _LOG.warning(
                    "%s failed (attempt %d of %d), retrying in %.1f s: %s",
                    what,
                    attempt,
                    attempts,
                    delay,
                    err.message,
                )
                time.sleep(delay)
    assert last is not None
    kind = "refused" if _server_answers() else "unreachable"
    raise WorkerError(kind, last.message, attempts)


# ----------------------------------------------------------------------------------------------
# Operations


def _service() -> Any:
    from lsst.ctrl.bps import BPS_DEFAULTS, BpsConfig
    from lsst.ctrl.bps.panda import PanDAService

    settings: dict[str, Any] = {"wmsServiceClass": "lsst.ctrl.bps.panda.PanDAService"}
    if os.environ.get("DRP_CAMPAIGN_IDDS_SERVER"):
        # Status and control must ask the iDDS instance the submission went to.
        settings["iddsServer"] = os.environ["DRP_CAMPAIGN_IDDS_SERVER"]
    return PanDAService(BpsConfig(settings, defaults=BPS_DEFAULTS))


def _check_command_result(what: str, text: str, run_id: str) -> None:
    """Raise if iDDS did not register an abort/retry command.

    iDDS answers ``[(0, {"status": 0, "message": ...})]`` when it registered the command and
    ``[(-1, {...})]`` when it refused (no such request, another user's request); when iDDS itself
    failed, its client's answer is ``(False, <message>)``.
    """
    try:
        result = json.loads(text)
    except (TypeError, ValueError):
        return
    if isinstance(result, list) and len(result) == 2 and result[0] is False:
        raise WorkerError("refused", f"iDDS failed to {what} request {run_id}: {result[1]}")
    entries = result if isinstance(result, list) else [result]
    for entry in entries:
        if not (isinstance(entry, list) and entry) or isinstance(entry[0], bool):
            continue
        if entry[0] != 0:
            detail = entry[1] if len(entry) > 1 else entry
            message = detail.get("message", str(detail)) if isinstance(detail, dict) else detail
            # The server answered and said no: asking again cannot help.
            kind = "not_found" if "No match" in str(message) else "rejected"
            raise WorkerError(kind, f"iDDS refused to {what} request {run_id}: {message}")


def op_ping(request: dict[str, Any]) -> dict[str, Any]:
    """Ping iDDS through the PanDA relay with the site's credentials."""

    def call() -> None:
        status, message = _service().ping()
        if status != 0:
            raise WorkerError(classify_failure(str(message)), str(message))

    _with_retries("ping", call, request["retries"], request["backoff_s"])
    return {}


def op_status(request: dict[str, Any]) -> dict[str, Any]:
    """State (``PanDAService.get_status``) and per-label counts (``PanDAService.report``)."""
    run_id = str(request["run_id"])

    def call() -> dict[str, Any]:
        service = _service()
        state, message = service.get_status(run_id)
        if state.name == "UNKNOWN":
            if "No records found" in message:
                raise WorkerError("not_found", message)
            raise WorkerError(classify_failure(message), message)
        try:
            reports, report_message = service.report(wms_workflow_id=run_id, return_exit_codes=True)
        except RuntimeError as err:
            raise WorkerError(classify_failure(str(err)), str(err)) from err
        labels = []
        for report in reports:
            for label, counts in report.job_summary.items():
                codes = report.exit_code_summary.get(label, [])
                labels.append(
                    {
                        "label": label,
                        "counts": {s.name: int(n) for s, n in counts.items()},
                        "exit_codes": [_int_or_none(c) for c in codes],
                    }
                )
        return {"state": state.name, "labels": labels, "message": message or report_message}

    return _with_retries(f"status of {run_id}", call, request["retries"], request["backoff_s"])


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def op_cancel(request: dict[str, Any]) -> dict[str, Any]:
    """Abort a request (``PanDAService.cancel``: iDDS ``abort``)."""
    run_id = str(request["run_id"])

    def call() -> None:
        ok, message = _service().cancel(run_id)
        if not ok:
            raise WorkerError(classify_failure(message), message)
        _check_command_result("cancel", message, run_id)

    _with_retries(f"cancel of {run_id}", call, request["retries"], request["backoff_s"])
    return {}


def op_restart(request: dict[str, Any]) -> dict[str, Any]:
    """Retry the failed jobs of a request (``PanDAService.restart``: iDDS ``retry``)."""
    run_id = str(request["run_id"])

    def call() -> str:
        new_id, _, message = _service().restart(run_id)
        if new_id is None:
            raise WorkerError(classify_failure(str(message)), str(message))
        _check_command_result("restart", str(message), run_id)
        return str(new_id)

    new_id = _with_retries(f"restart of {run_id}", call, request["retries"], request["backoff_s"])
    return {"run_id": new_id}


def _remote_build_yaml(submit_yaml: Path, work_dir: Path) -> Path:
    """A copy of the submit file with a ``remoteBuild`` section, unless it has one already.

    With ``remoteBuild`` BPS uploads the file to the PanDA cache and submits one build job to the
    site, which builds the graph against the site's Butler and submits the workflow from there
    (DESIGN.md section 5, step 3). The runner command is bps_remote.yaml's for a pip-installed
    stack: the submit file's ``setupLSSTEnv`` instead of the CVMFS EUPS setup, and the edge-node
    decoder run as a module.
    """
    import yaml

    doc = yaml.safe_load(submit_yaml.read_text())
    if isinstance(doc.get("remoteBuild"), dict):
        return submit_yaml
    doc["remoteBuild"] = {
        "enabled": True,
        "runnerCommand": " ".join(
            [
                "logDir=`pwd`;",
                "chmod ugo+w ${logDir};",
                "export SHELL=/bin/bash;",
                # Literal: BPS resolves this command's {variables} inside remoteBuild only.
                str(doc.get("setupLSSTEnv") or ""),
                'if [[ ! -z "${PANDA_AUTH_DIR}" ]] && [[ ! -z "${PANDA_AUTH_ORIGIN}" ]];',
                "then export PANDA_AUTH_ID_TOKEN=$(cat $PANDA_AUTH_DIR);",
                "export PANDA_AUTH_VO=$PANDA_AUTH_ORIGIN;",
                "export IDDS_OIDC_TOKEN=$(cat $PANDA_AUTH_DIR);",
                "export IDDS_VO=$PANDA_AUTH_ORIGIN;",
                "export PANDA_AUTH=oidc;",
                "else unset PANDA_AUTH; export IDDS_AUTH_TYPE=x509_proxy; fi;",
                "export PANDA_CONFIG_ROOT=$(pwd);",
                "export PANDA_VERIFY_HOST=off;",
                "export PANDA_URL_SSL=${PANDA_SERVER_URL}/server/panda;",
                "export PANDACACHE_URL=$PANDA_URL_SSL;",
                "export PANDA_URL=$PANDA_URL_SSL;",
                "export PANDA_BEHIND_REAL_LB=true;",
                "export IDDS_MAX_NAME_LENGTH={IDDS_MAX_NAME_LENGTH};",
                "python3 -m lsst.ctrl.bps.panda.edgenode.build_cmd_line_decoder",
                "_download_cmd_line_ _build_cmd_line_ _compute_site_;",
                "exit $?",
            ]
        ),
    }
    out_dir = work_dir / "remote-build"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / submit_yaml.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False, width=1 << 30))
    return out


def _check_distribution_end_point(config: Any) -> None:
    """Fail early, and clearly, where BPS would fail late on a missing staging area."""
    found, end_point = config.search(
        "fileDistributionEndPoint", opt={"expandEnvVars": False, "replaceEnvVars": False}
    )
    if not found or "LSST_RUN_TEMP_SPACE" not in str(end_point):
        return
    if "LSST_RUN_TEMP_SPACE" in os.environ:
        return
    found_default, default = config.search("fileDistributionEndPointDefault")
    if not (found_default and default):
        raise WorkerError(
            "invalid",
            f"fileDistributionEndPoint {end_point!r} needs LSST_RUN_TEMP_SPACE, which is not set, "
            "and the submit file has no fileDistributionEndPointDefault: set the site's "
            "run_temp_space in its PanDA settings (a directory or URL that both this host and "
            "the site's worker nodes reach), or render fileDistributionEndPointDefault",
        )


def op_submit(request: dict[str, Any]) -> dict[str, Any]:
    """Submit a BPS submit file: with a prebuilt graph (``qgraphFile``) or built at the site."""
    from lsst.ctrl.bps import BPS_DEFAULTS, BPS_SEARCH_ORDER, BpsConfig
    from lsst.ctrl.bps.drivers import prepare_driver
    from lsst.ctrl.bps.initialize import (
        init_submission,
        out_collection_validator,
        output_run_validator,
        submit_path_validator,
    )
    from lsst.ctrl.bps.submit import submit

    submit_yaml = Path(request["submit_yaml"]).resolve()
    graph = request.get("graph")
    if not submit_yaml.is_file():
        raise WorkerError("invalid", f"no BPS submit file at {submit_yaml}")
    if graph is not None and not Path(graph).is_file():
        raise WorkerError("invalid", f"no quantum graph at {graph}")
    if graph is None:
        submit_yaml = _remote_build_yaml(submit_yaml, Path.cwd())
    config = BpsConfig(str(submit_yaml), search_order=BPS_SEARCH_ORDER, defaults=BPS_DEFAULTS)
    if config["wmsServiceClass"] != "lsst.ctrl.bps.panda.PanDAService":
        raise WorkerError(
            "invalid",
            f"{submit_yaml} has wmsServiceClass {config['wmsServiceClass']!r}, not "
            "lsst.ctrl.bps.panda.PanDAService: render it with workload 'panda'",
        )
    if graph is not None:
        # A remote build stages its files at the site; here only a local prepare does.
        _check_distribution_end_point(config)
    submit_dir = Path(config["submitPath"])

    # Nothing is staged or sent before the server has answered a ping with these credentials:
    # an unreachable server or a refused token leaves no half-made submission behind.
    op_ping(request)

    kwargs: dict[str, Any] = {"runWmsSubmissionChecks": True}
    if graph is not None:
        kwargs["qgraph"] = str(Path(graph).resolve())
    try:
        if graph is None:
            # What bps submit does for remoteBuild (lsst.ctrl.bps.drivers.submit_driver).
            validators = [submit_path_validator, output_run_validator, out_collection_validator]
            config = init_submission(str(submit_yaml), validators=validators, **kwargs)
            remote_build = config.search("remoteBuild", opt={"default": {}})[1]
            _, compute_site = config.search("computeSite", opt={"default": None})
            workflow = submit(
                config,
                None,
                remote_build=remote_build,
                config_file=str(submit_yaml),
                compute_site=compute_site,
            )
            wms_config = config
        else:
            wms_config, workflow = prepare_driver(str(submit_yaml), **kwargs)
            submit(wms_config, workflow)
    except FileExistsError as err:
        # BPS refuses to reuse a submit directory: a run of this outputRun was submitted before.
        raise WorkerError(
            "invalid",
            f"the BPS submit directory of {submit_yaml.name} exists already ({err}): this run "
            "was submitted before. Poll or restart that run, or remove the directory (or use a "
            "new outputRun, as a fresh resubmission does) to submit again",
        ) from err
    except ExceptionGroup as group:
        # ResourcePath.mtransfer (staging the graph): one exception per file that failed.
        messages = "; ".join(str(e) for e in group.exceptions)
        exists = all(isinstance(e, FileExistsError) for e in group.exceptions)
        raise WorkerError(
            "invalid" if exists else "refused",
            f"staging the files of {submit_yaml.name} failed: {messages}"
            + (
                " (a previous submission of this run staged them: remove them, or use a new "
                "outputRun)"
                if exists
                else ""
            ),
        ) from group
    except (RuntimeError, OSError) as err:
        message = str(err)
        raise WorkerError(
            classify_failure(message),
            f"PanDA did not accept the submission of {submit_yaml.name}: {message}",
        ) from err
    finally:
        _scrub_submit_dir(submit_dir)
    return {
        "run_id": str(workflow.run_id),
        "run_name": str(wms_config["uniqProcName"]),
        "submit_path": str(wms_config["submitPath"]),
        "remote_build": graph is None,
    }


def _scrub_submit_dir(submit_dir: Path) -> None:
    """Remove the ID token from the environment dump BPS writes into the submit directory.

    ``init_submission`` saves ``os.environ`` to ``<submitPath>/<run>.env.info.yaml`` for
    provenance; the token must not stay on disk there.
    """
    token = os.environ.get("PANDA_AUTH_ID_TOKEN")
    if not token or not submit_dir.is_dir():
        return
    for path in submit_dir.glob("*.env.info.yaml"):
        text = path.read_text()
        if token in text:
            path.write_text(text.replace(token, "<redacted>"))


# ----------------------------------------------------------------------------------------------
# Entry point

OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ping": op_ping,
    "status": op_status,
    "cancel": op_cancel,
    "restart": op_restart,
    "submit": op_submit,
}


def _run(op: str, request: dict[str, Any]) -> dict[str, Any]:
    if op not in OPS:
        return {"ok": False, "error": {"kind": "invalid", "message": f"unknown op {op!r}"}}
    request.setdefault("retries", 3)
    request.setdefault("backoff_s", 1.0)
    try:
        return {"ok": True, "result": OPS[op](request)}
    except WorkerError as err:
        error = {"kind": err.kind, "message": err.message, "attempts": err.attempts}
        return {"ok": False, "error": error}
    except SystemExit as exc:
        # panda-client calls sys.exit(255) when it has no usable token (the device-code flow it
        # falls back to cannot run here) or no VO.
        code = exc.code if isinstance(exc.code, int) else 1
        kind = "auth" if code == PANDA_CLIENT_EXIT else "refused"
        message = f"panda-client exited with status {code} while getting an OIDC token"
        return {"ok": False, "error": {"kind": kind, "message": message, "attempts": 1}}
    except Exception as exc:
        # A bug or an unexpected library failure: the traceback goes to stderr, which the parent
        # logs; the answer names the exception.
        _LOG.exception("PanDA %s failed unexpectedly", op)
        message = f"{type(exc).__name__}: {exc}"
        return {"ok": False, "error": {"kind": "internal", "message": message, "attempts": 1}}


def main(argv: list[str] | None = None) -> int:
    """Run one operation; print its JSON answer on stdout.

    Parameters
    ----------
    argv : `list` [`str`], optional
        ``[op]``; `sys.argv` [1:] by default.

    Returns
    -------
    status : `int`
        0 when an answer was printed (success or a classified failure), 2 on a bad call.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m drp_campaign.backends.panda_worker OP < request.json", file=sys.stderr
        )
        return 2
    request = json.load(sys.stdin)
    # Keep the real stdout for the answer; everything the libraries print goes to stderr.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    answer = _run(args[0], request)
    sys.stdout.flush()
    with os.fdopen(answer_fd, "w") as out:
        out.write(json.dumps(answer))
        out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
