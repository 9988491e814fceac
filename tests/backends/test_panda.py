"""The PanDA workload service against a faithful PanDA/iDDS test server.

Everything between `PandaWorkload` and the wire is real: the child process, BPS's drivers, the
unchanged ``lsst.ctrl.bps.panda.PanDAService`` and panda-client 2.2.0; the server
(`tests.panda_server`) answers as PanDA and iDDS do and records what it received. The submit
files are rendered by `drp_campaign.model.bps` for the sites of the dc2-test-med-1 spec, with
graphs built against small real site repositories.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from drp_campaign.backends.butler import copy_raws, populate_site_repos
from drp_campaign.backends.interfaces import (
    WorkloadAuthError,
    WorkloadError,
    WorkloadService,
    WorkloadState,
)
from drp_campaign.backends.panda import (
    WORKER_MODULE,
    PandaSettings,
    PandaWorkload,
    label_reports,
    workload_state,
)
from drp_campaign.backends.qgraph import GraphSummary, build_request, site_selections, step_requests
from drp_campaign.cli_panda import EXIT_AUTH, EXIT_USAGE, app, settings_for_site
from drp_campaign.ledger import Ledger
from drp_campaign.model.bps import (
    SiteStepSubmit,
    output_collection,
    output_run,
    render_submit_yaml,
)
from drp_campaign.model.spec import load_spec

from ..panda_server import PandaTestServer, free_port, idds_enum, works_of
from .test_butler_repos import INSTRUMENT, REPO_ROOT, small_campaign

SPEC = load_spec(REPO_ROOT / "deployments" / "campaigns" / "dc2-test-med-1.yaml")
PIPELINE = str(REPO_ROOT / "pipelines" / "DRP-mock.yaml")
SETUP = "source /opt/rubin/venv/bin/activate;"
STEP = "step1"
LABELS = {"pipetaskInit", "isr", "calibrateImage", "finalJob"}

#: Per site: the default requestMemory (pipetaskInit's) and per-label memory, chosen so that the
#: three sites together use every memory class.
MEMORY: dict[str, tuple[int, dict[str, int]]] = {
    "USDF": (4096, {"isr": 2048, "calibrateImage": 8192}),
    "FrDF": (6000, {"isr": 12000, "calibrateImage": 4096}),
    "UKDF": (2048, {"isr": 30000, "calibrateImage": 18432}),
}
#: The PanDA queue each label must land on (DESIGN.md section 1), written out by hand.
QUEUES = {
    "USDF": {
        "pipetaskInit": "SLAC_Rubin",
        "isr": "SLAC_Rubin",
        "calibrateImage": "SLAC_Rubin_Medium",
        "finalJob": "SLAC_Rubin_Merge",
    },
    "FrDF": {
        "pipetaskInit": "CC-IN2P3_Rubin_Medium",
        "isr": "CC-IN2P3_Rubin_Himem",
        "calibrateImage": "CC-IN2P3_Rubin",
        "finalJob": "CC-IN2P3_Rubin_Merge",
    },
    "UKDF": {
        "pipetaskInit": "LANCS_Rubin",
        "isr": "LANCS_Rubin_Extra_Himem",
        "calibrateImage": "LANCS_Rubin_Himem",
        "finalJob": "LANCS_Rubin_Merge",
    },
}


@dataclass
class Site:
    """One site's rendered submit file, prebuilt graph and submission."""

    name: str
    submit_yaml: Path
    graph: GraphSummary
    stage: Path  # LSST_RUN_TEMP_SPACE
    workload: PandaWorkload | None = None
    run_id: str = ""


@dataclass
class Campaign:
    tmp: Path
    repos: dict[str, Path]
    sites: dict[str, Site]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    """Small real site repositories, the step1 graph of each site, and its submit file."""
    tmp = tmp_path_factory.mktemp("panda")
    spec, plan = small_campaign(tmp)
    # The small campaign has the sites of the dc2-test-med-1 spec: same compute sites and clouds.
    assert {s: (v.compute_site, v.cloud) for s, v in spec.sites.items()} == {
        s: (v.compute_site, v.cloud) for s, v in SPEC.sites.items()
    }
    repos = {s: r.root for s, r in populate_site_repos(tmp, spec, plan, file_size=200).items()}
    selections = site_selections(plan, spec.site_names)
    for site, root in repos.items():
        if site != spec.hub:
            copy_raws(repos[spec.hub], root, INSTRUMENT, selections[site].visits.tolist())
    sites = {}
    for request in step_requests(spec, plan, STEP, repos, tmp / "graphs"):
        site = request.site
        summary = build_request(request)
        default_mb, memory = MEMORY[site]
        submit = SiteStepSubmit(
            campaign=spec.campaign,
            step=STEP,
            subset=STEP,
            site=site,
            compute_site=SPEC.sites[site].compute_site,
            cloud=SPEC.sites[site].cloud,
            pipeline_yaml=PIPELINE,
            butler_config=str(repos[site]),
            data_query=request.where,
            input_collections=list(request.input_collections),
            output_run=output_run(spec.campaign, STEP, site),
            output_collection=output_collection(spec.campaign, site),
            task_memory_mb=memory,
            default_memory_mb=default_mb,
            workload="panda",
            setup_command=SETUP,
        )
        path = tmp / "bps" / submit.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_submit_yaml(submit))
        sites[site] = Site(site, path, summary, tmp / "stage" / site)
    assert sorted(sites) == sorted(SPEC.site_names)
    return Campaign(tmp, repos, sites)


@pytest.fixture(scope="module")
def server() -> Iterator[PandaTestServer]:
    with PandaTestServer() as s:
        yield s


def settings(
    server: PandaTestServer, site: str, token: str, root: Path, **kw: Any
) -> PandaSettings:
    values: dict[str, Any] = {
        "panda_url": server.url,
        "panda_url_ssl": server.url,
        "cache_url": server.url,
        "auth_vo": server.vo,
        "id_token": token,
        "verify_host": False,
        "config_root": root / "panda-config" / site,
    }
    values.update(kw)
    return PandaSettings(site=site, **values)


def workload(
    server: PandaTestServer, site: str, token: str, root: Path, **kw: Any
) -> PandaWorkload:
    """A site's service with a fast retry policy; ``kw`` are `PandaSettings` fields or
    ``retries``."""
    retries = kw.pop("retries", 2)
    s = settings(server, site, token, root, **kw)
    return PandaWorkload(s, work_dir=root / "work" / site, retries=retries, backoff_s=0.05)


@pytest.fixture(scope="module")
def operator_token(server: PandaTestServer) -> str:
    return server.issue_token("operator")


@pytest.fixture(scope="module")
def submitted(campaign: Campaign, server: PandaTestServer, operator_token: str) -> Campaign:
    """Every site's step1 submitted with its prebuilt graph, the three in parallel."""

    def submit(site: Site) -> None:
        site.workload = workload(
            server, site.name, operator_token, campaign.tmp, run_temp_space=str(site.stage)
        )
        site.run_id = site.workload.submit(site.submit_yaml, site.graph.file)

    with ThreadPoolExecutor(len(campaign.sites)) as pool:
        list(pool.map(submit, campaign.sites.values()))
    return campaign


def _no_token_in(token: str, *roots: Path) -> list[Path]:
    """Files under ``roots`` that contain ``token``."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and token.encode() in path.read_bytes():
                found.append(path)
    return found


# ----------------------------------------------------------------------------------------------
# Pure parts


def test_settings_validate_and_keep_the_token_out_of_repr(tmp_path: Path) -> None:
    token = "eyJhbGciOi.secret-token-value.sig"
    s = PandaSettings(
        site="FrDF",
        panda_url="https://panda.example.org:8443/server/panda",
        panda_url_ssl="https://panda.example.org:8443/server/panda",
        cache_url="https://panda.example.org:8443/server/panda",
        auth_vo="Rubin",
        id_token=token,
        config_root=tmp_path,
    )
    assert token not in repr(s) and token not in str(s)
    assert isinstance(PandaWorkload(s), WorkloadService)
    assert token not in repr(PandaWorkload(s))
    base = {
        "PATH": "/usr/bin",
        "HOME": "/home/op",
        "PANDA_AUTH_ID_TOKEN": "someone-else",
        "OIDC_AUTH_TOKEN_FILE": "/tmp/other",
        "PANDA_URL": "https://wrong.example.org",
    }
    env = s.environment(base)
    assert env["PANDA_AUTH_ID_TOKEN"] == token and "OIDC_AUTH_TOKEN_FILE" not in env
    assert env["PANDA_URL"] == s.panda_url and env["PANDA_URL_SSL"] == s.panda_url_ssl
    assert env["PANDACACHE_URL"] == s.cache_url and env["PANDA_AUTH"] == "oidc"
    assert env["PANDA_AUTH_VO"] == "Rubin" and env["PANDA_CONFIG_ROOT"] == str(tmp_path)
    assert env["PANDA_VERIFY_HOST"] == "on" and env["PANDA_BEHIND_REAL_LB"] == "1"
    assert env["CTRL_MPEXEC_DIR"] == sys.prefix == env["DAF_BUTLER_DIR"]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["HOME"] == "/home/op" and "LSST_RUN_TEMP_SPACE" not in env
    for bad, match in [
        ({"panda_url": "usdf-panda-server:8443"}, "not an http"),
        ({"auth": "x509"}, "not supported"),
        ({"id_token": ""}, "id_token is empty"),
        ({"id_token": token + "\n"}, "whitespace"),
    ]:
        fields = {**s.__dict__, **bad}
        with pytest.raises(ValueError, match=match) as info:
            PandaSettings(**fields)
        assert token not in str(info.value)


def test_settings_from_a_panda_credentials_block(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from blocks.credentials import PandaCredentials

    block = PandaCredentials(
        panda_url="https://usdf-panda-server.slac.stanford.edu:8443/server/panda",
        panda_url_ssl="https://usdf-panda-server.slac.stanford.edu:8443/server/panda",
        cache_url="https://usdf-panda-server.slac.stanford.edu:8443/server/panda",
        auth_vo="Rubin",
        id_token=SecretStr("a.b.c"),
        verify_host=False,
    )
    s = PandaSettings.from_mapping("USDF", block.panda_settings("USDF"), config_root=tmp_path)
    assert (s.site, s.auth_vo, s.id_token, s.verify_host) == ("USDF", "Rubin", "a.b.c", False)
    assert s.environment({})["PANDA_VERIFY_HOST"] == "off" and s.config_root == tmp_path
    # What the backend factory does with the block's settings: the cache dir defaults per site.
    default = PandaSettings(site="FrDF", **block.panda_settings("FrDF"))
    assert default.config_root == Path("~/.panda/drp-campaign/FrDF").expanduser()
    with pytest.raises(ValueError, match="unknown keys") as info:
        PandaSettings.from_mapping("USDF", {**block.panda_settings("USDF"), "tokn": "x"})
    assert "a.b.c" not in str(info.value)


def test_state_and_label_mapping() -> None:
    assert workload_state("SUCCEEDED") is WorkloadState.SUCCEEDED
    assert workload_state("FAILED") is WorkloadState.FAILED
    assert workload_state("DELETED") is WorkloadState.CANCELLED
    assert workload_state("HELD") is WorkloadState.HELD
    assert workload_state("RUNNING") is WorkloadState.RUNNING
    with pytest.raises(WorkloadError, match="UNKNOWN"):
        workload_state("UNKNOWN")
    (report,) = label_reports(
        [
            {
                "label": "isr",
                "counts": {"SUCCEEDED": 5, "FAILED": 2, "RUNNING": 1, "UNREADY": 2},
                "exit_codes": [137, 1, 137, 0, None],
            }
        ]
    )
    assert (report.total, report.succeeded, report.failed) == (10, 5, 2)
    assert report.exit_codes == (1, 137)


def test_server_serialises_idds_enums_as_idds_does() -> None:
    from idds.common.constants import RequestStatus, TransformStatus

    for kind, enum in (("RequestStatus", RequestStatus), ("TransformStatus", TransformStatus)):
        for member in enum:
            assert idds_enum(kind, member.name) == member.to_dict()


PANDA_CLIENT_SCRIPT = """
import json, re, sys, tempfile, os
from pandaclient import Client

out = {"hello": Client.hello()}
params = {"taskName": "drp.test.1", "vo": "wlcg", "prodSourceLabel": "managed",
          "site": "CC-IN2P3_Rubin", "cloud": "EU", "PandaSite": "CC-IN2P3"}
status, (code, message) = Client.insertTaskParams(params)
task_id = int(re.search(r"jediTaskID=(\\d+)", message).group(1))
out["insert"] = [status, code]
out["status"] = Client.getTaskStatus(task_id)
out["params"] = Client.getTaskParamsMap(task_id)
out["retry_registered"] = Client.retryTask(task_id)
out["kill"] = Client.killTask(task_id)
out["status_after_kill"] = Client.getTaskStatus(task_id)
out["missing"] = Client.getTaskStatus(999999)
path = os.path.join(tempfile.mkdtemp(), "sandbox.tar.gz")
open(path, "wb").write(b"payload bytes")
out["put"] = Client.putFile(path)
copy = path + ".copy"
out["get"] = Client.getFile("sandbox.tar.gz", output_path=copy)
out["copy"] = open(copy, "rb").read().decode()
sys.stdout.write(json.dumps(out))
"""


def test_server_speaks_panda_clients_v1_api(server: PandaTestServer, tmp_path: Path) -> None:
    """panda-client's own task and cache calls (what iDDS and the edge node use) work too."""
    s = settings(server, "FrDF", server.issue_token("operator"), tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", PANDA_CLIENT_SCRIPT],
        capture_output=True,
        text=True,
        env=s.environment(),
        cwd=tmp_path,
        check=True,
    )
    out = json.loads(proc.stdout.splitlines()[-1])  # panda-client logs to stdout before
    assert out["hello"][0] == 0 and out["insert"] == [0, 0]
    assert out["status"] == [0, "registered"]
    assert out["params"][1]["PandaSite"] == "CC-IN2P3"
    # JEDI refuses to retry a task it has not defined yet (code 4), accepts the kill (code 0).
    assert out["retry_registered"][0] == 0 and out["retry_registered"][1][0] == 4
    assert out["kill"] == [0, [True, 0]] and out["status_after_kill"] == [0, "aborting"]
    assert out["missing"] == [255, None]
    assert out["put"] == [0, "True"] and out["get"] == [0, True]
    assert out["copy"] == "payload bytes"


# ----------------------------------------------------------------------------------------------
# Submission: what iDDS receives for each site


def test_every_work_carries_site_cloud_and_queue(
    submitted: Campaign, server: PandaTestServer
) -> None:
    for name, site in submitted.sites.items():
        compute_site, cloud = SPEC.sites[name].compute_site, SPEC.sites[name].cloud
        (recorded,) = [w for w in server.workflows if str(w.request_id) == site.run_id]
        assert recorded.command == "submit" and recorded.username == "operator"
        works = {w["label"]: w for w in works_of(recorded.workflow)}
        assert set(works) == LABELS, name
        default_mb, memory = MEMORY[name]
        expected_mb = {**memory, "pipetaskInit": default_mb, "finalJob": 4096}
        expected_jobs = {**site.graph.per_task, "pipetaskInit": 1, "finalJob": 1}
        for label, work in works.items():
            where = (name, label)
            assert work["site"] == compute_site, where  # PanDA's PandaSite
            assert work["cloud"] == cloud, where
            assert work["queue"] == QUEUES[name][label], where
            assert work["rss"] == expected_mb[label], where
            assert work["core_count"] == 1 and work["prod_source_label"] == "managed", where
            assert work["priority"] == 500 and work["n_jobs"] == expected_jobs[label], where
            assert work["max_attempt"] == 5, where  # BPS's numberOfRetries
            merge = "Rubin_Merge" if label == "finalJob" else None
            assert work["processing_type"] == merge, where
            # BPS names tasks <run>_<NN>_<label>_<chunk>, the run being the outputRun.
            assert work["task_name"].startswith(f"dc2-test-small_step1_{name}_run_"), where
            # The job runs the pip-installed decoder after our setup command.
            assert SETUP in work["executable"], where
            assert "python3 -m lsst.ctrl.bps.panda.edgenode.cmd_line_decoder" in work["executable"]
        # The DAG: isr after pipetaskInit, calibrateImage after isr.
        assert works["isr"]["dependency_tasks"] == [works["pipetaskInit"]["task_name"]]
        assert works["calibrateImage"]["dependency_tasks"] == [works["isr"]["task_name"]]
        # BPS staged the graph where the site's jobs read it.
        run_name = f"dc2-test-small_step1_{name}_run"
        staged = sorted(p.relative_to(site.stage) for p in site.stage.rglob("*") if p.is_file())
        assert staged == [
            Path("panda_cache_box/payload") / run_name / site.graph.file.name,
            Path("panda_cache_box/payload") / run_name / "final_job.bash",
        ]


def test_status_and_report_until_success(submitted: Campaign, server: PandaTestServer) -> None:
    site = submitted.sites["USDF"]
    assert site.workload is not None
    status = site.workload.status(site.run_id)
    # Submitted, but iDDS has not made the PanDA tasks yet: running, nothing to count.
    assert status.state is WorkloadState.RUNNING and status.labels == ()
    server.start_request(site.run_id)
    status = site.workload.status(site.run_id)
    assert status.state is WorkloadState.RUNNING
    totals = {r.label: (r.total, r.succeeded, r.failed) for r in status.labels}
    jobs = {**site.graph.per_task, "pipetaskInit": 1, "finalJob": 1}
    assert totals == {label: (n, 0, 0) for label, n in jobs.items()}
    server.suspend(site.run_id)
    assert site.workload.status(site.run_id).state is WorkloadState.HELD
    server.finish(site.run_id)
    status = site.workload.status(site.run_id)
    assert status.state is WorkloadState.SUCCEEDED and status.failed_labels == []
    assert {r.label: (r.total, r.succeeded) for r in status.labels} == {
        label: (n, n) for label, n in jobs.items()
    }


def test_partial_failure_then_restart(submitted: Campaign, server: PandaTestServer) -> None:
    site = submitted.sites["FrDF"]
    assert site.workload is not None
    server.fail(site.run_id, {"isr": (3, 137), "calibrateImage": (1, 1)})
    status = site.workload.status(site.run_id)
    assert status.state is WorkloadState.FAILED
    failed = {r.label: (r.total, r.succeeded, r.failed, r.exit_codes) for r in status.failed_labels}
    n_isr, n_cal = site.graph.per_task["isr"], site.graph.per_task["calibrateImage"]
    assert failed == {
        "isr": (n_isr, n_isr - 3, 3, (137,)),
        "calibrateImage": (n_cal, n_cal - 1, 1, (1,)),
    }
    assert site.workload.restart(site.run_id) == site.run_id
    assert server.commands("retry") == 1
    # iDDS has registered the retry; until its agents act the run is not terminal.
    assert site.workload.status(site.run_id).state is WorkloadState.RUNNING
    assert server.request(site.run_id).status == "ToResume"
    server.process_commands()
    server.finish(site.run_id)
    status = site.workload.status(site.run_id)
    assert status.state is WorkloadState.SUCCEEDED and status.failed_labels == []


def test_cancel(submitted: Campaign, server: PandaTestServer) -> None:
    site = submitted.sites["UKDF"]
    assert site.workload is not None
    server.start_request(site.run_id)
    # Another user cannot cancel the operator's run: iDDS refuses, and it is not an auth error.
    intruder = workload(server, "UKDF", server.issue_token("intruder"), submitted.tmp / "x")
    aborts = server.commands("abort")
    with pytest.raises(WorkloadError, match="rejected cancel .* no permission") as info:
        intruder.cancel(site.run_id)
    assert not isinstance(info.value, WorkloadAuthError)
    assert server.commands("abort") == aborts + 1  # a refusal is final: not retried
    site.workload.cancel(site.run_id)
    assert site.workload.status(site.run_id).state is WorkloadState.RUNNING  # ToCancel
    server.process_commands()
    site.workload.cancel(site.run_id)  # idempotent
    status = site.workload.status(site.run_id)
    assert status.state is WorkloadState.CANCELLED
    assert server.request(site.run_id).status == "Cancelled"


def test_unknown_run(submitted: Campaign, server: PandaTestServer) -> None:
    site = submitted.sites["USDF"]
    assert site.workload is not None
    with pytest.raises(WorkloadError, match="has no request 424242"):
        site.workload.status("424242")


def test_remote_build_at_the_site(
    campaign: Campaign, server: PandaTestServer, operator_token: str, tmp_path: Path
) -> None:
    site = campaign.sites["UKDF"]
    w = workload(server, site.name, operator_token, tmp_path)
    run_id = w.submit(site.submit_yaml)  # no graph: BPS remoteBuild
    (build,) = server.works(run_id)
    assert build["label"] == "build_task" and build["task_type"] == "lsst_build"
    assert (build["site"], build["cloud"], build["queue"]) == ("LANCS", "EU", "LANCS_Rubin")
    (archive,) = [n for n in server.uploads if n in build["executable"]]
    with tarfile.open(fileobj=io.BytesIO(server.uploads[archive])) as tar:
        shipped = yaml.safe_load(tar.extractfile(site.submit_yaml.name).read())  # type: ignore[union-attr]
    assert shipped["remoteBuild"]["enabled"] is True and shipped["computeSite"] == "LANCS"
    assert SETUP in build["executable"]
    # Run the build job as the pilot at the site would: it downloads the archive from the
    # PanDA cache, builds the graph against the site's Butler, stages it and hands the
    # workflow back to iDDS.
    edge = tmp_path / "edge"
    edge.mkdir()
    (edge / "token").write_text(operator_token)
    env = {
        **w.settings.environment(),
        "PWD": str(edge),
        "PANDA_SERVER_URL": server.base_url,
        "PANDA_AUTH_DIR": str(edge / "token"),
        "PANDA_AUTH_ORIGIN": server.vo,
        "IDDS_BUILD_REQUEST_ID": run_id,
        "IDDS_BUIL_SIGNATURE": server.build_signature(run_id),
        "LSST_RUN_TEMP_SPACE": str(tmp_path / "site-stage"),
    }
    job = subprocess.run(
        ["/bin/bash", "-c", build["executable"]],
        cwd=edge,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    works = {x["label"]: x for x in server.works(run_id)}
    assert {label: x["queue"] for label, x in works.items()} == QUEUES["UKDF"]
    jobs = {**site.graph.per_task, "pipetaskInit": 1, "finalJob": 1}
    assert {label: x["n_jobs"] for label, x in works.items()} == jobs
    assert server.workflows[-1].command == "update_build_request"
    server.finish(run_id)
    assert w.status(run_id).state is WorkloadState.SUCCEEDED


# ----------------------------------------------------------------------------------------------
# Credentials


def test_expired_token_is_refused_before_any_call(server: PandaTestServer, tmp_path: Path) -> None:
    token = server.issue_token("operator", lifetime_s=-60)
    calls = len(server.calls)
    w = workload(server, "USDF", token, tmp_path)
    with pytest.raises(WorkloadAuthError) as info:
        w.ping()
    message = str(info.value)
    assert "USDF" in message and "expired" in message and "panda_auth reset" in message
    assert token not in message and len(server.calls) == calls


def test_rejected_token_or_vo(
    server: PandaTestServer, tmp_path: Path, campaign: Campaign, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked = server.issue_token("operator")
    server.revoke(revoked)
    seen: list[tuple[list[str], dict[str, str]]] = []
    real_run = subprocess.run

    def spy(argv: list[str], **kwargs: Any) -> Any:
        seen.append((list(argv), dict(kwargs["env"])))
        return real_run(argv, **kwargs)

    monkeypatch.setattr("drp_campaign.backends.panda.subprocess.run", spy)
    site = campaign.sites["FrDF"]
    stage = tmp_path / "stage"
    w = workload(server, "FrDF", revoked, tmp_path, run_temp_space=str(stage))
    submitted_before = len(server.workflows)
    with pytest.raises(WorkloadAuthError) as info:
        w.submit(site.submit_yaml, site.graph.file)
    message = str(info.value)
    assert server.url in message and "VO Rubin" in message and "panda_auth reset" in message
    assert "Token authentication failed" in message and revoked not in message
    # Nothing submitted, staged or written: the ping before the submission was refused.
    assert len(server.workflows) == submitted_before
    assert not stage.exists() and not (tmp_path / "work" / "FrDF" / "submit").exists()
    # A valid token presented for another VO is refused too.
    token = server.issue_token("operator", vo="Rubin")
    other_vo = workload(server, "FrDF", token, tmp_path, auth_vo="Rubin:production")
    with pytest.raises(WorkloadAuthError, match="Rubin:production") as info:
        other_vo.ping()
    assert token not in str(info.value)
    # The token travelled in the child's environment only.
    assert len(seen) == 2
    for (argv, env), secret in zip(seen, [revoked, token], strict=True):
        assert argv[1:3] == ["-m", WORKER_MODULE]
        assert all(secret not in arg for arg in argv)
        assert env["PANDA_AUTH_ID_TOKEN"] == secret


def test_no_token_makes_panda_client_exit_and_is_an_auth_error(
    server: PandaTestServer, tmp_path: Path
) -> None:
    # Without a token panda-client starts the device-code login, which fails, and sys.exit(255)s.
    s = settings(server, "USDF", server.issue_token(), tmp_path)
    env = {k: v for k, v in s.environment().items() if k != "PANDA_AUTH_ID_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", WORKER_MODULE, "ping"],
        input=json.dumps({"retries": 1, "backoff_s": 0}),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    answer = json.loads(proc.stdout)  # stdout holds the answer and nothing else
    assert answer["ok"] is False and answer["error"]["kind"] == "auth"
    assert "status 255" in answer["error"]["message"]


# ----------------------------------------------------------------------------------------------
# An unreachable or failing server


def test_unreachable_server_is_retried_then_named(
    campaign: Campaign, operator_token: str, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/server/panda"
    stage = tmp_path / "stage"
    s = PandaSettings(
        site="UKDF",
        panda_url=url,
        panda_url_ssl=url,
        cache_url=url,
        id_token=operator_token,
        config_root=tmp_path / "cfg",
        run_temp_space=str(stage),
    )
    w = PandaWorkload(s, work_dir=tmp_path / "work", retries=3, backoff_s=0.01)
    site = campaign.sites["UKDF"]
    for call in (w.ping, lambda: w.submit(site.submit_yaml, site.graph.file)):
        with pytest.raises(WorkloadError) as info:
            call()
        message = str(info.value)
        assert not isinstance(info.value, WorkloadAuthError)
        assert url in message and "after 3 attempt(s)" in message and "did not answer" in message
        assert operator_token not in message
    # Nothing was prepared or staged for the submission that could not reach the server.
    assert not stage.exists() and not (tmp_path / "work" / "submit").exists()


def test_server_errors_are_retried(
    server: PandaTestServer, operator_token: str, tmp_path: Path
) -> None:
    w = workload(server, "USDF", operator_token, tmp_path, retries=3)
    before = server.calls
    server.fail_next(2)
    w.ping()  # two 503s, then an answer
    assert [c for _, c in server.calls[len(before) :]] == ["<refused>", "<refused>", "ping"]
    server.fail_next(3)
    with pytest.raises(WorkloadError, match=r"answered ping with an error after 3 attempt") as info:
        w.ping()
    assert "did not answer" not in str(info.value)


def test_no_secret_left_on_disk(submitted: Campaign, operator_token: str) -> None:
    roots = [submitted.tmp / "work", submitted.tmp / "stage", submitted.tmp / "panda-config"]
    assert _no_token_in(operator_token, *[r for r in roots if r.exists()]) == []
    # BPS dumps the environment into the submit directory; the token there is redacted.
    dumps = list((submitted.tmp / "work").rglob("*.env.info.yaml"))
    assert len(dumps) == 3
    assert all(yaml.safe_load(p.read_text())["PANDA_AUTH_ID_TOKEN"] == "<redacted>" for p in dumps)


# ----------------------------------------------------------------------------------------------
# Operator commands


def _settings_file(server: PandaTestServer, tmp: Path, token: str) -> Path:
    (tmp / "token").write_text(token)
    (tmp / "token").chmod(0o600)
    doc = {
        "sites": {
            site: {
                "panda_url": server.url,
                "panda_url_ssl": server.url,
                "cache_url": server.url,
                "auth_vo": server.vo,
                "id_token_file": "token",
                "verify_host": False,
                "config_root": str(tmp / "cfg" / site),
            }
            for site in SPEC.site_names
        }
    }
    path = tmp / "panda.json"
    path.write_text(json.dumps(doc))
    return path


def test_settings_for_site_sources(tmp_path: Path) -> None:
    cache = tmp_path / ".token"
    cache.write_text(json.dumps({"id_token": "x.y.z", "refresh_token": "r"}))
    env = {
        "PANDA_URL_SSL": "https://usdf-panda-server.slac.stanford.edu:8443/server/panda",
        "PANDA_AUTH_VO": "Rubin",
        "PANDA_CONFIG_ROOT": str(tmp_path),
        "PANDA_VERIFY_HOST": "off",
    }
    s = settings_for_site("USDF", environ=env)
    assert s.id_token == "x.y.z" and s.cache_url == s.panda_url == env["PANDA_URL_SSL"]
    assert s.verify_host is False and s.config_root == tmp_path
    with pytest.raises(ValueError, match="PANDA_AUTH_VO"):
        settings_for_site("USDF", environ={"PANDA_URL_SSL": env["PANDA_URL_SSL"]})


def test_cli_ping_and_status(
    submitted: Campaign,
    server: PandaTestServer,
    operator_token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the commands' PanDA processes run in the current directory
    monkeypatch.delenv("DRP_CAMPAIGN_PANDA_SETTINGS", raising=False)
    runner = CliRunner()
    settings_file = _settings_file(server, tmp_path, operator_token)
    result = runner.invoke(app, ["ping", "--site", "FrDF", "--settings", str(settings_file)])
    assert result.exit_code == 0, result.output
    assert "FrDF" in result.output and "answers" in result.output
    # status by step: the run id comes from the campaign ledger.
    site = submitted.sites["USDF"]
    server.fail(site.run_id, {"calibrateImage": (2, 139)})
    workdir = tmp_path / "campaign"
    workdir.mkdir()
    Ledger(workdir / "ledger.sqlite").set_name(STEP, "USDF", "run_id", site.run_id)
    args = ["status", "--site", "USDF", "--step", STEP, "--workdir", str(workdir)]
    result = runner.invoke(app, [*args, "--settings", str(settings_file)])
    assert result.exit_code == 0, result.output
    assert f"run {site.run_id}" in result.output and "FAILED" in result.output
    cells = [[c.strip() for c in line.split("│")] for line in result.output.splitlines()]
    # LABEL TOTAL SUCCEEDED FAILED OTHER EXIT CODES
    rows = {row[0]: row[1:] for row in cells if len(row) == 6}
    jobs = {**site.graph.per_task, "pipetaskInit": 1, "finalJob": 1}
    for label, n in jobs.items():
        if label == "calibrateImage":
            assert rows[label] == [str(n), str(n - 2), "2", "0", "139"], result.output
        else:
            assert rows[label] == [str(n), str(n), "0", "0", ""], result.output
    total = sum(jobs.values())
    assert rows["Total"] == [str(total), str(total - 2), "2", "0", ""], result.output
    result = runner.invoke(app, ["status", "--site", "UKDF", "--settings", str(settings_file)])
    assert result.exit_code == EXIT_USAGE and "--run-id" in result.output
    # A refused token: exit status 3 and what to run.
    bad = server.issue_token("operator")
    server.revoke(bad)
    (tmp_path / "bad").mkdir()
    bad_file = _settings_file(server, tmp_path / "bad", bad)
    result = runner.invoke(app, ["ping", "--site", "UKDF", "--settings", str(bad_file)])
    assert result.exit_code == EXIT_AUTH and "panda_auth reset" in result.output
    assert bad not in result.output
