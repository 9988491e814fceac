"""A PanDA site driven by the drp-site-step stages: submit, partial failure and restart, crash and
poll, cancellation and a fresh attempt, token expiry and refresh, an unreachable server, and the
site's DataFacility block.

A small real campaign (3 LSSTComCam visits: real Butler repositories, graphs and transfers with
the embedded catalog) whose FrDF site uses PanDA: ``make_campaign_run(..., panda={"FrDF": ...})``
gives it a `PandaWorkload` that talks, through the real child process, BPS and panda-client, to
the faithful test server of ``tests/panda_server.py``. Each test runs
``CampaignRun.run_site_step("step1", "FrDF")`` (the work of the ``drp-site-step`` flow) in a
thread while it drives the server as iDDS and PanDA's jobs would.

The test server runs no job, so no product ever appears in FrDF's repository: ``publish``
registers 0 files and ``arrive`` waits for the graph's rule only. That is expected here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from pydantic import SecretStr
from typer.testing import CliRunner

import tasks.runtime
from blocks import (
    DataFacility,
    PandaCredentials,
    data_facility_document_name,
    embedded_data_facility,
)
from drp_campaign.backends.factory import make_campaign_run, make_workload
from drp_campaign.backends.interfaces import WorkloadAuthError, WorkloadError
from drp_campaign.backends.local.workload import LocalService
from drp_campaign.backends.panda import PandaSettings, PandaWorkload
from drp_campaign.campaign import CampaignRun, SiteStepFailed, SiteStepResult
from drp_campaign.cli_panda import SettingsError, app, settings_for_site
from drp_campaign.ledger import StageState
from drp_campaign.model.spec import load_spec
from drp_campaign.planner import dask_client
from drp_campaign.seed import seed_embedded
from flows.campaign import _cancel_submitted_run, drp_site_step

from .blocks import conftest as blocks_conftest
from .panda_server import PandaTestServer, free_port, works_of
from .test_campaign_faults import _spec_file, until_submit

# A real authenticated Prefect server (scripts/prefect_server.py), for the DataFacility blocks.
prefect_server = blocks_conftest.prefect_server
prefect_api = blocks_conftest.prefect_api

STEP = "step1"
SITE = "FrDF"
G = "g000"  # FrDF runs step1 as one group (3 visits)
AFTER_SUBMIT = ["submit", "publish", "arrive"]
WAIT_S = 300.0  # generous: every PanDA call is a child process importing BPS


@pytest.fixture(scope="module")
def server() -> Iterator[PandaTestServer]:
    with PandaTestServer() as s:
        yield s


@pytest.fixture(scope="module")
def token(server: PandaTestServer) -> str:
    return server.issue_token("operator")


def panda_values(server: PandaTestServer, token: str, tmp: Path) -> dict[str, Any]:
    """A site's PanDA settings as the factory takes them (a ``PandaCredentials`` block's
    ``panda_settings`` plus where this test keeps panda-client's cache and the staged graph)."""
    return {
        "panda_url": server.url,
        "panda_url_ssl": server.url,
        "cache_url": server.url,
        "auth_vo": server.vo,
        "id_token": token,
        "verify_host": False,
        "config_root": str(tmp / "panda-config"),
        "run_temp_space": str(tmp / "panda-stage"),
    }


@dataclass
class Campaign:
    spec_path: Path
    workdir: Path
    client: Any
    run: CampaignRun


@pytest.fixture(scope="module")
def campaign(
    tmp_path_factory: pytest.TempPathFactory, server: PandaTestServer, token: str
) -> Iterator[Campaign]:
    """Planned, set up, inputs distributed; FrDF's step1 staged, rendered and built."""
    tmp = tmp_path_factory.mktemp("panda-site-step")
    spec_path = _spec_file(tmp, visits=3)
    spec = load_spec(spec_path)
    workdir = tmp / "work"
    seed_embedded(spec, workdir)
    with dask_client(workers=1) as client:
        run = make_campaign_run(
            spec,
            workdir,
            client,
            panda={SITE: panda_values(server, token, tmp / "initial")},
            poll_s=0.05,
        )
        assert isinstance(run.workloads[SITE], PandaWorkload)
        assert all(isinstance(run.workloads[s], LocalService) for s in spec.site_names if s != SITE)
        run.plan()
        for site in spec.site_names:
            run.setup_site(site)
        run.distribute_inputs()
        with pytest.raises(SiteStepFailed, match="StopBeforeSubmit"):
            run.run_site_step(STEP, SITE, runner=until_submit)
        assert run.ledger.get(STEP, SITE, "submit", group=G) is None
        assert run.ledger.is_done(STEP, SITE, "build", group=G)
        assert int(run.ledger.get(STEP, SITE, "build", group=G).figures["n_quanta"]) > 0  # type: ignore[union-attr]
        yield Campaign(spec_path, workdir, client, run)


def fresh_submission(
    campaign: Campaign, server: PandaTestServer, token: str, tmp: Path
) -> PandaWorkload:
    """Forget FrDF's step1 submission (stages after build, its run id, BPS's submit directory)
    and give FrDF a new PandaWorkload from the factory, staging under ``tmp``."""
    run = campaign.run
    run.ledger.reset(STEP, SITE, AFTER_SUBMIT, group=G)
    run.ledger.delete_names(STEP, SITE, ["run_id"], group=G)
    shutil.rmtree(_submit_yaml(run)["submitPath"], ignore_errors=True)
    workload = make_workload(
        SITE, campaign.workdir, campaign.client, panda_values(server, token, tmp)
    )
    assert isinstance(workload, PandaWorkload)
    run.workloads[SITE] = workload
    return workload


def _graph_file(run: CampaignRun) -> Path:
    """Where the graph of FrDF's step1 (its one group) is, in its current attempt."""
    (unit,) = run.units(STEP, SITE)
    return run.repo(SITE) / unit.graph_path


def _submit_yaml(run: CampaignRun) -> dict[str, Any]:
    """The BPS submit file the ``bps`` stage rendered for FrDF's step1."""
    bps = run.ledger.get(STEP, SITE, "bps", group=G)
    assert bps is not None
    return dict(yaml.safe_load(Path(bps.figures["file"]).read_text()))


def _per_label_jobs(run: CampaignRun) -> dict[str, int]:
    build = run.ledger.get(STEP, SITE, "build", group=G)
    assert build is not None
    return {**build.figures["per_task"], "pipetaskInit": 1, "finalJob": 1}


class Background:
    """``run_site_step`` in a thread; its result or exception once joined."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.outcome: list[Any] = []

        def target() -> None:
            try:
                self.outcome.append(fn())
            except BaseException as exc:  # handed to the test
                self.outcome.append(exc)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self, timeout: float = WAIT_S) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the site-step did not end"
        return self.outcome[0]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        """Wait until ``condition()``; fail at once if the site-step ended before."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.thread.is_alive():
                raise AssertionError(f"the site-step ended before {what}: {self.outcome}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)


_JOBS: list[Background] = []


def site_step(run: CampaignRun) -> Background:
    job = Background(lambda: run.run_site_step(STEP, SITE))
    _JOBS.append(job)
    return job


@pytest.fixture(autouse=True)
def _no_site_step_left(server: PandaTestServer) -> Iterator[None]:
    """After a failed test, end the site-steps it left polling (they hold FrDF's lease)."""
    yield
    while _JOBS:
        job = _JOBS.pop()
        if job.thread.is_alive():
            for request_id, request in server.requests.items():
                if request.status not in ("Finished", "SubFinished", "Failed", "Cancelled"):
                    server.finish(request_id)
            job.thread.join(WAIT_S)


def wait_for_run_id(run: CampaignRun, job: Background) -> str:
    job.wait_for(
        lambda: run.ledger.name(STEP, SITE, "run_id", group=G) is not None, "the submission"
    )
    run_id = run.ledger.name(STEP, SITE, "run_id", group=G)
    assert run_id is not None
    return run_id


@pytest.fixture
def cancel_hook(campaign: Campaign, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call ``drp-site-step``'s on_cancellation hook for FrDF's step1 as Prefect would.

    The hook gets its CampaignRun from ``tasks.runtime.campaign_run(spec, workdir)``, which
    builds it once per process from the sites' DataFacility blocks and caches it: in this
    process that run is the test's (FrDF on PanDA).
    """
    assert _cancel_submitted_run in drp_site_step.on_cancellation_hooks
    key = (str(campaign.spec_path.absolute()), str(campaign.workdir.absolute()))
    monkeypatch.setitem(tasks.runtime._RUNS, key, campaign.run)
    flow_run = SimpleNamespace(
        parameters={
            "spec": str(campaign.spec_path),
            "step": STEP,
            "site": SITE,
            "workdir": str(campaign.workdir),
        }
    )
    return lambda: _cancel_submitted_run(
        drp_site_step, flow_run, SimpleNamespace(name="Cancelling")
    )


def _ledger_bytes(workdir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(workdir.glob("ledger.sqlite*")))


# ----------------------------------------------------------------------------------------------


def test_success_submits_once_to_the_sites_panda_queue(
    campaign: Campaign, server: PandaTestServer, token: str, tmp_path: Path, cancel_hook: Any
) -> None:
    run = campaign.run
    fresh_submission(campaign, server, token, tmp_path)
    before = len(server.workflows)
    submits = server.commands("submit")
    job = site_step(run)
    run_id = wait_for_run_id(run, job)
    # Exactly one workflow reached iDDS, for FrDF's compute site and cloud, with every quantum.
    (recorded,) = server.workflows[before:]
    assert str(recorded.request_id) == run_id and recorded.command == "submit"
    assert recorded.username == "operator"
    works = works_of(recorded.workflow)
    assert {(w["site"], w["cloud"]) for w in works} == {("CC-IN2P3", "EU")}
    assert {w["label"]: w["n_jobs"] for w in works} == _per_label_jobs(run)
    assert {w["queue"] for w in works if w["label"] == "finalJob"} == {"CC-IN2P3_Rubin_Merge"}
    # Submitted and recorded, not done: the stage polls until the run ends.
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.RUNNING
    server.start_request(run_id)
    server.finish(run_id)
    result = job.result()
    assert isinstance(result, SiteStepResult), result
    assert not result.skipped and result.n_quanta == sum(_per_label_jobs(run).values()) - 2
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.DONE
    assert submit.figures["run_id"] == run_id == run.ledger.name(STEP, SITE, "run_id", group=G)
    assert submit.figures["labels"] == _per_label_jobs(run)  # every job succeeded
    # No job really ran on the test server: nothing to publish, only the graph to ship.
    assert result.published_files == 0
    assert run.ledger.get(STEP, SITE, "publish", group=G).figures["files"] == 0  # type: ignore[union-attr]
    assert run.ledger.is_done(STEP, SITE, "arrive", group=G)
    assert server.commands("submit") == submits + 1 and len(server.workflows) == before + 1
    # A cancellation arriving after the run ended cancels nothing.
    aborts = server.commands("abort")
    cancel_hook()
    assert server.commands("abort") == aborts and run.ledger.is_done(STEP, SITE, "submit", group=G)


def test_partial_failure_names_labels_and_exit_codes_then_rerun_restarts(
    campaign: Campaign, server: PandaTestServer, token: str, tmp_path: Path
) -> None:
    run = campaign.run
    fresh_submission(campaign, server, token, tmp_path)
    jobs = _per_label_jobs(run)
    before, submits, retries = (
        len(server.workflows),
        server.commands("submit"),
        server.commands("retry"),
    )
    job = site_step(run)
    run_id = wait_for_run_id(run, job)
    server.start_request(run_id)
    server.fail(run_id, {"isr": (2, 137), "calibrateImage": (1, 1)})
    failure = job.result()
    assert isinstance(failure, SiteStepFailed), failure
    assert (failure.step, failure.site, failure.stage) == (STEP, SITE, "submit")
    message = str(failure)
    assert f"step1 at FrDF failed in stage 'submit': run {run_id} FAILED" in message
    assert f"isr: 2/{jobs['isr']} failed (exit codes [137])" in message
    assert f"calibrateImage: 1/{jobs['calibrateImage']} failed (exit codes [1])" in message
    assert "pipetaskInit" not in message and "finalJob" not in message
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.FAILED
    # The ledger keeps the group's own failure, which the site-step's message begins with.
    assert submit.error is not None and submit.error.startswith(
        f"GroupFailure: step1@FrDF#{G[1:]} failed in stage 'submit': run {run_id} FAILED"
    )
    assert run.ledger.get(STEP, SITE, "publish", group=G) is None  # nothing after the failed stage
    assert run.ledger.name(STEP, SITE, "run_id", group=G) == run_id

    # The operator reruns the site-step: iDDS retries the failed jobs of the same request.
    job = site_step(run)
    job.wait_for(lambda: server.commands("retry") == retries + 1, "the restart")
    assert server.request(run_id).status == "ToResume"  # registered; iDDS has not acted yet
    server.process_commands()
    server.finish(run_id)
    result = job.result()
    assert isinstance(result, SiteStepResult), result
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.DONE and submit.attempts == 2
    assert submit.figures["run_id"] == run_id == run.ledger.name(STEP, SITE, "run_id", group=G)
    assert submit.figures["labels"] == jobs
    assert run.ledger.is_done(STEP, SITE, "arrive", group=G)
    # One submission in all; one retry.
    assert server.commands("submit") == submits + 1 and len(server.workflows) == before + 1
    assert server.commands("retry") == retries + 1


CRASHING_DRIVER = """
import json, sys
from drp_campaign.backends.factory import make_campaign_run
from drp_campaign.model.spec import load_spec

args = json.load(sys.stdin)
run = make_campaign_run(
    load_spec(args["spec"]), args["workdir"], None, panda={args["site"]: args["panda"]},
    poll_s=0.05,
)
run.run_site_step(args["step"], args["site"])
"""


def test_rerun_after_a_crash_polls_the_running_request(
    campaign: Campaign, server: PandaTestServer, token: str, tmp_path: Path
) -> None:
    """The process running the site-step is SIGKILLed while its PanDA run is RUNNING: the rerun
    takes over the lease and polls the recorded request; nothing is submitted twice."""
    run = campaign.run
    fresh_submission(campaign, server, token, tmp_path)
    before, submits = len(server.workflows), server.commands("submit")
    retries = server.commands("retry")
    request = {
        "spec": str(campaign.spec_path),
        "workdir": str(campaign.workdir),
        "step": STEP,
        "site": SITE,
        "panda": panda_values(server, token, tmp_path / "crashed"),
    }
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_DRIVER],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=log,
        text=True,
        start_new_session=True,  # its PanDA child too: killed as one process group
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(request))
        proc.stdin.close()
        deadline = time.monotonic() + WAIT_S
        while run.ledger.name(STEP, SITE, "run_id", group=G) is None:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver did not submit"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    run_id = run.ledger.name(STEP, SITE, "run_id", group=G)
    assert run_id is not None and len(server.workflows) == before + 1
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.RUNNING  # what the crash left
    with sqlite3.connect(run.ledger.path) as c:
        holders = c.execute("SELECT pid FROM leases WHERE step=? AND site=?", (STEP, SITE))
        assert [pid for (pid,) in holders] == [proc.pid]  # the dead driver's lease
    server.start_request(run_id)

    polls = server.commands("get_requests")
    job = site_step(run)
    job.wait_for(lambda: server.commands("get_requests") > polls, "a poll of the request")
    server.finish(run_id)
    result = job.result()
    assert isinstance(result, SiteStepResult), result
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.DONE
    assert submit.figures["run_id"] == run_id == run.ledger.name(STEP, SITE, "run_id", group=G)
    assert server.commands("submit") == submits + 1 and len(server.workflows) == before + 1
    assert server.commands("retry") == retries  # RUNNING: polled, not restarted


def test_flow_cancellation_cancels_the_panda_request(
    campaign: Campaign, server: PandaTestServer, token: str, tmp_path: Path, cancel_hook: Any
) -> None:
    """``drp-site-step``'s on_cancellation hook aborts the site's request at PanDA."""
    run = campaign.run
    fresh_submission(campaign, server, token, tmp_path)
    before, aborts = len(server.workflows), server.commands("abort")
    job = site_step(run)
    run_id = wait_for_run_id(run, job)
    server.start_request(run_id)
    cancel_hook()
    assert server.commands("abort") == aborts + 1
    assert server.request(run_id).status == "ToCancel"
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.FAILED
    assert submit.error == f"cancelled with the flow run (run {run_id})"
    # iDDS's agents act on the abort: the request ends cancelled, and so does the stage.
    server.process_commands()
    failure = job.result()
    assert isinstance(failure, SiteStepFailed), failure
    assert f"run {run_id} CANCELLED" in str(failure) and failure.stage == "submit"
    assert server.request(run_id).status == "Cancelled"
    assert all(t.status == "Cancelled" for t in server.request(run_id).transforms)
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.FAILED
    assert "CANCELLED" in (submit.error or "")
    assert run.ledger.get(STEP, SITE, "publish", group=G) is None
    assert len(server.workflows) == before + 1
    assert "Rerun the group to submit it afresh as attempt" in str(failure)
    cancel_hook()  # a second cancellation is harmless
    assert server.request(run_id).status == "Cancelled"

    # The operator reruns the site-step: a cancelled run cannot be resumed, so it is submitted
    # afresh as the next attempt, with its own output run, graph and BPS directory.
    attempt = run.attempt(STEP, SITE, G) + 1
    old_graph = _graph_file(run)
    job = site_step(run)
    job.wait_for(
        lambda: run.ledger.name(STEP, SITE, "run_id", group=G) not in (None, run_id),
        "the new submission",
    )
    new_id = run.ledger.name(STEP, SITE, "run_id", group=G)
    assert new_id is not None and len(server.workflows) == before + 2
    assert run.attempt(STEP, SITE, G) == attempt
    new_run = f"{run.spec.campaign}/{STEP}/{SITE}/{G}-attempt{attempt}"
    assert run.units(STEP, SITE)[0].output_run == new_run
    submitted = _submit_yaml(run)
    assert submitted["payload"]["outputRun"] == new_run
    assert submitted["submitPath"].endswith(f"{STEP}/{G}-attempt{attempt}")
    assert _graph_file(run) != old_graph and old_graph.exists()
    assert run.ledger.get(STEP, SITE, "stage", group=G).attempts == 1  # type: ignore[union-attr]
    server.start_request(new_id)
    server.finish(new_id)
    result = job.result()
    assert isinstance(result, SiteStepResult), result
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.DONE
    assert submit.figures["run_id"] == new_id
    assert server.request(run_id).status == "Cancelled"  # the old one was left alone
    with pytest.raises(ValueError, match="published already"):
        run.forget_site_step(STEP, SITE)


def test_expired_token_tells_the_operator_what_to_run(
    campaign: Campaign, server: PandaTestServer, tmp_path: Path
) -> None:
    run = campaign.run
    expired = server.issue_token("operator", lifetime_s=-60)
    workload = fresh_submission(campaign, server, expired, tmp_path)
    calls = len(server.calls)
    with pytest.raises(SiteStepFailed) as info:
        run.run_site_step(STEP, SITE)
    assert info.value.stage == "submit" and isinstance(info.value.__cause__, WorkloadAuthError)
    message = str(info.value)
    assert message.startswith("step1 at FrDF failed in stage 'submit': WorkloadAuthError: ")
    assert "PanDA ID token of site FrDF expired" in message and "not attempted" in message
    # What to run, where, and what to do with the new token.
    assert "`panda_auth reset`" in message and "`panda_auth refresh`" in message
    assert f"PANDA_URL_SSL={server.url}" in message and "PANDA_AUTH_VO=Rubin" in message
    assert f"PANDA_CONFIG_ROOT={workload.settings.config_root}" in message
    assert "PandaCredentials block" in message
    assert len(server.calls) == calls  # refused before any call
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.FAILED
    assert submit.error is not None and "panda_auth reset" in submit.error
    assert run.ledger.name(STEP, SITE, "run_id", group=G) is None
    assert run.ledger.get(STEP, SITE, "publish", group=G) is None
    assert expired not in message and expired.encode() not in _ledger_bytes(campaign.workdir)


def test_token_refused_while_polling_then_refreshed_rerun_resumes(
    campaign: Campaign, server: PandaTestServer, tmp_path: Path
) -> None:
    """The token stops working mid-run (revoked at the server, as after its expiry there): the
    stage fails saying what to run; with a new token the rerun polls the same request."""
    run = campaign.run
    old = server.issue_token("operator")
    fresh_submission(campaign, server, old, tmp_path / "old")
    before = len(server.workflows)
    job = site_step(run)
    run_id = wait_for_run_id(run, job)
    server.start_request(run_id)
    server.revoke(old)
    failure = job.result()
    assert isinstance(failure, SiteStepFailed), failure
    assert isinstance(failure.__cause__, WorkloadAuthError)
    message = str(failure)
    assert f"refused the credentials of site FrDF (VO Rubin) for status of request {run_id}" in (
        message
    )
    assert "Token authentication failed" in message and "`panda_auth reset`" in message
    assert old not in message and old.encode() not in _ledger_bytes(campaign.workdir)
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.FAILED
    assert (
        run.ledger.name(STEP, SITE, "run_id", group=G) == run_id
    )  # kept: the run goes on at PanDA

    # The operator stores a new token (the factory builds FrDF's service from it) and reruns.
    new = server.issue_token("operator")
    run.workloads[SITE] = make_workload(
        SITE, campaign.workdir, campaign.client, panda_values(server, new, tmp_path / "new")
    )
    polls = server.commands("get_requests")
    job = site_step(run)
    job.wait_for(lambda: server.commands("get_requests") > polls, "a poll of the request")
    server.finish(run_id)
    result = job.result()
    assert isinstance(result, SiteStepResult), result
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.DONE
    assert submit.figures["run_id"] == run_id and len(server.workflows) == before + 1


def test_unreachable_server_is_retried_then_named_and_nothing_is_done(
    campaign: Campaign, server: PandaTestServer, token: str, tmp_path: Path
) -> None:
    run = campaign.run
    fresh_submission(campaign, server, token, tmp_path)
    dead = f"http://127.0.0.1:{free_port()}/server/panda"
    values = panda_values(server, token, tmp_path)
    values.update(panda_url=dead, panda_url_ssl=dead, cache_url=dead)
    run.workloads[SITE] = PandaWorkload(
        PandaSettings.from_mapping(SITE, values),
        work_dir=campaign.workdir / "bps" / SITE,
        retries=3,
        backoff_s=0.05,
    )
    before = len(server.workflows)
    with pytest.raises(SiteStepFailed) as info:
        run.run_site_step(STEP, SITE)
    cause = info.value.__cause__
    assert isinstance(cause, WorkloadError) and not isinstance(cause, WorkloadAuthError)
    message = str(info.value)
    assert message.startswith("step1 at FrDF failed in stage 'submit': WorkloadError: ")
    assert f"PanDA server {dead} of site FrDF did not answer submit after 3 attempt(s)" in message
    assert "Nothing was changed" in message and token not in message
    # Nothing marked done, nothing recorded, nothing staged or prepared for BPS.
    submit = run.ledger.get(STEP, SITE, "submit", group=G)
    assert submit is not None and submit.state == StageState.FAILED
    assert submit.error == f"WorkloadError: {cause}"
    assert run.ledger.name(STEP, SITE, "run_id", group=G) is None
    assert [r.stage for r in run.ledger.records(STEP, SITE) if not r.done] == ["submit"]
    assert run.ledger.get(STEP, SITE, "publish", group=G) is None
    assert not (tmp_path / "panda-stage").exists()
    assert not Path(_submit_yaml(run)["submitPath"]).exists()
    assert len(server.workflows) == before


# ----------------------------------------------------------------------------------------------
# Through the sites' DataFacility blocks, as the flows and the operator commands find them


def test_data_facility_block_selects_panda_for_the_flow_and_the_cli(
    campaign: Campaign,
    server: PandaTestServer,
    token: str,
    tmp_path: Path,
    prefect_api: blocks_conftest.Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FrDF's block selects PanDA: ``tasks.runtime.campaign_run`` (what the flows and the
    cancellation hook use) gives FrDF a PandaWorkload from it, and ``drp-campaign panda``
    commands find the site's settings in it with ``--spec``."""
    run = campaign.run
    spec = run.spec
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # panda-client's default cache dir
    monkeypatch.delenv("DRP_CAMPAIGN_PANDA_SETTINGS", raising=False)
    monkeypatch.chdir(tmp_path)  # the commands' PanDA processes run in the current directory
    facility = embedded_data_facility(spec, SITE, campaign.workdir).model_copy(
        update={
            "workload_backend": "panda",
            "panda": PandaCredentials(
                panda_url=server.url,
                panda_url_ssl=server.url,
                cache_url=server.url,
                auth_vo=server.vo,
                id_token=SecretStr(token),
                verify_host=False,
            ),
        }
    )
    assert isinstance(facility, DataFacility)
    facility.save(data_facility_document_name(spec.campaign, SITE), overwrite=True)

    # The operator commands' settings: the block's, with --spec (or the campaign's name).
    settings = settings_for_site(SITE, campaign=spec.campaign)
    assert (settings.panda_url_ssl, settings.id_token, settings.verify_host) == (
        server.url,
        token,
        False,
    )
    assert settings.config_root == tmp_path / "home" / ".panda" / "drp-campaign" / SITE
    with pytest.raises(SettingsError, match=f"data-facility/{spec.campaign}-usdf") as info:
        settings_for_site("USDF", campaign=spec.campaign)  # no block saved for USDF
    assert "--settings" in str(info.value)
    # An explicit environment's PREFECT_API_URL is the API asked.
    dead = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(SettingsError, match=f"cannot load the DataFacility block .* at {dead}"):
        settings_for_site(SITE, campaign=spec.campaign, environ={"PREFECT_API_URL": dead})
    # Without a campaign the PANDA_* environment is used, as before.
    with pytest.raises(SettingsError, match="--spec SPEC with PREFECT_API_URL"):
        settings_for_site(SITE, environ={"PREFECT_API_URL": prefect_api.api_url})
    cli = CliRunner()
    result = cli.invoke(app, ["ping", "--site", SITE, "--spec", str(campaign.spec_path)])
    assert result.exit_code == 0, result.output
    assert f"{SITE}: PanDA at {server.url} answers" in result.output
    assert token not in result.output

    # The flow's runtime builds the campaign run from the blocks: FrDF on PanDA, the other
    # sites (no block) on the embedded defaults. It is cached per process; here it starts
    # empty and reuses this module's Dask client instead of starting a cluster.
    monkeypatch.setattr(tasks.runtime, "_RUNS", {})
    monkeypatch.setattr(
        tasks.runtime, "_CLIENTS", {None: (campaign.client, contextlib.ExitStack())}
    )
    fresh_submission(campaign, server, token, tmp_path)
    aborts = server.commands("abort")
    job = site_step(run)
    run_id = wait_for_run_id(run, job)
    server.start_request(run_id)
    args = ["--site", SITE, "--spec", str(campaign.spec_path), "--workdir", str(campaign.workdir)]
    result = cli.invoke(app, ["status", *args, "--step", STEP])
    assert result.exit_code == 0, result.output
    assert f"step {STEP} run {run_id} at {SITE} ({server.url}): RUNNING" in result.output
    # The flow run is cancelled: its hook cancels the request with the block's credentials.
    flow_run = SimpleNamespace(
        parameters={
            "spec": str(campaign.spec_path),
            "step": STEP,
            "site": SITE,
            "workdir": str(campaign.workdir),
        }
    )
    _cancel_submitted_run(drp_site_step, flow_run, SimpleNamespace(name="Cancelling"))
    (hook_run,) = tasks.runtime._RUNS.values()
    assert hook_run is not run
    workload = hook_run.workloads[SITE]
    assert isinstance(workload, PandaWorkload) and workload.settings.id_token == token
    assert workload.work_dir == campaign.workdir / "bps" / SITE
    assert all(
        isinstance(hook_run.workloads[s], LocalService) for s in spec.site_names if s != SITE
    )
    assert server.commands("abort") == aborts + 1
    server.process_commands()
    failure = job.result()
    assert isinstance(failure, SiteStepFailed) and f"run {run_id} CANCELLED" in str(failure)
    assert server.request(run_id).status == "Cancelled"
