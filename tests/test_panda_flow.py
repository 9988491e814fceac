"""A site on PanDA driven by the same site-step stages: real BPS, panda-client, PanDA test server.

FrDF's `DataFacility` would select PanDA: its step1 is submitted through the unchanged
``lsst.ctrl.bps.panda`` service to ``tests/panda_server.py`` and polled; a partial failure
names the labels and exit codes; the rerun restarts the same request (no second submission);
cancellation reaches the server; an expired token and an unreachable server fail the stage with
a clear message and nothing marked done. (The test server runs no jobs, so no products appear.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drp_campaign.backends.local.catalog import EmbeddedCatalog
from drp_campaign.backends.local.workload import LocalService
from drp_campaign.backends.panda import PandaSettings, PandaWorkload
from drp_campaign.campaign import CampaignRun, SiteStepFailed
from drp_campaign.model.spec import load_spec
from drp_campaign.planner import dask_client

from .panda_server import PandaTestServer
from .test_campaign_faults import _spec_file

SITE = "FrDF"


@pytest.fixture(scope="module")
def server() -> Iterator[PandaTestServer]:
    with PandaTestServer() as s:
        yield s


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with dask_client(workers=2) as c:
        yield c


def _run(tmp: Path, client: Any, panda: PandaWorkload) -> CampaignRun:
    spec = load_spec(_spec_file(tmp, visits=3))
    workdir = tmp / "work"
    catalog = EmbeddedCatalog(workdir / "catalog")
    workloads: dict[str, Any] = {
        s: LocalService(client, workdir / "workload" / s) for s in spec.site_names
    }
    workloads[SITE] = panda
    return CampaignRun(
        spec,
        workdir,
        catalog=catalog,
        workloads=workloads,
        client=client,
        pump=catalog.process_transfers,
        poll_s=0.05,
    )


def _panda(server: PandaTestServer, tmp: Path, token: str, **kw: Any) -> PandaWorkload:
    retries = kw.pop("retries", 2)
    settings = PandaSettings(
        site=SITE,
        panda_url=kw.pop("url", server.url),
        panda_url_ssl=kw.pop("url_ssl", server.url),
        cache_url=server.url,
        auth_vo=server.vo,
        id_token=token,
        verify_host=False,
        config_root=tmp / "panda-config",
        run_temp_space=str(tmp / "panda-stage"),
        **kw,
    )
    return PandaWorkload(settings, work_dir=tmp / "bps", retries=retries, backoff_s=0.05)


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=target)
    t.start()
    return t, out


def _wait(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_partial_failure_restart_and_success(
    server: PandaTestServer, client: Any, tmp_path: Path
) -> None:
    token = server.issue_token("operator")
    run = _run(tmp_path, client, _panda(server, tmp_path, token))
    run.run_all([])
    before = len(server.workflows)
    t, out = _in_thread(lambda: run.run_site_step("step1", SITE))
    _wait(lambda: run.ledger.name("step1", SITE, "run_id") is not None, "the submission")
    run_id = run.ledger.name("step1", SITE, "run_id")
    assert run_id is not None
    assert len(server.workflows) == before + 1
    works = server.works(run_id)
    assert {(w["site"], w["cloud"]) for w in works} == {("CC-IN2P3", "EU")}
    assert {w["queue"] for w in works if w["label"] == "finalJob"} == {"CC-IN2P3_Rubin_Merge"}
    server.fail(run_id, {"isr": (2, 137)})
    t.join(300)
    assert isinstance(out[0], SiteStepFailed), out
    message = str(out[0])
    assert "step1 at FrDF failed in stage 'submit'" in message
    assert "isr: 2/" in message and "137" in message
    assert run.ledger.get("step1", SITE, "submit").state == "FAILED"  # type: ignore[union-attr]
    # The operator reruns: the same request is restarted, not submitted again.
    t, out = _in_thread(lambda: run.run_site_step("step1", SITE))
    _wait(lambda: server.commands("retry") >= 1, "the restart")
    server.process_commands()
    server.finish(run_id)
    t.join(300)
    assert not isinstance(out[0], BaseException), out
    assert len(server.workflows) == before + 1
    assert run.ledger.name("step1", SITE, "run_id") == run_id
    assert run.ledger.is_done("step1", SITE, "arrive")
    assert token not in (tmp_path / "work" / "ledger.sqlite").read_bytes().decode("latin-1")


@pytest.mark.slow
def test_a_rerun_polls_a_running_request_and_cancel_reaches_the_server(
    server: PandaTestServer, client: Any, tmp_path: Path
) -> None:
    token = server.issue_token("operator")
    panda = _panda(server, tmp_path, token)
    run = _run(tmp_path, client, panda)
    run.run_all([])
    before = len(server.workflows)
    t, out = _in_thread(lambda: run.run_site_step("step1", SITE))
    _wait(lambda: run.ledger.name("step1", SITE, "run_id") is not None, "the submission")
    run_id = run.ledger.name("step1", SITE, "run_id")
    assert run_id is not None
    server.start_request(run_id)
    # The flow is cancelled: what flows/campaign.py's on_cancellation hook does.
    panda.cancel(run_id)
    server.process_commands()
    t.join(300)
    assert isinstance(out[0], SiteStepFailed) and "CANCELLED" in str(out[0]), out
    assert server.request(run_id).status == "Cancelled"
    assert len(server.workflows) == before + 1


@pytest.mark.slow
def test_expired_token_and_unreachable_server_mark_nothing_done(
    server: PandaTestServer, client: Any, tmp_path: Path
) -> None:
    expired = server.issue_token("operator", lifetime_s=-60)
    run = _run(tmp_path, client, _panda(server, tmp_path, expired))
    run.run_all([])
    with pytest.raises(SiteStepFailed) as info:
        run.run_site_step("step1", SITE)
    message = str(info.value)
    assert "stage 'submit'" in message and "panda_auth" in message and expired not in message
    assert run.ledger.name("step1", SITE, "run_id") is None
    assert not run.ledger.is_done("step1", SITE, "submit")
    # Nothing answers at this address: retried, then a failure naming it.
    dead = "http://127.0.0.1:9/server/panda"
    run.workloads[SITE] = _panda(
        server, tmp_path, server.issue_token("operator"), url=dead, url_ssl=dead
    )
    with pytest.raises(SiteStepFailed, match="127.0.0.1:9"):
        run.run_site_step("step1", SITE)
    assert run.ledger.name("step1", SITE, "run_id") is None
    record = run.ledger.get("step1", SITE, "submit")
    assert record is not None and record.state == "FAILED"
