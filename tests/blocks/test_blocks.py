"""Blocks: secrets stay wrapped, blocks save and load through a real authenticated server."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import httpx
import pytest
from prefect import flow, get_client, get_run_logger, task
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from pydantic import SecretStr, ValidationError
from typer.testing import CliRunner

from blocks import (
    DataFacility,
    PandaCredentials,
    RucioCredentials,
    data_facility_document_name,
    load_data_facility,
)
from blocks.cli import app
from drp_campaign.backends.butler import site_repo_root
from drp_campaign.backends.factory import make_workload
from drp_campaign.backends.panda import PandaWorkload
from drp_campaign.model.spec import load_spec
from drp_campaign.secrets_scan import scan

from .conftest import REPO, Server

SPEC = REPO / "deployments" / "campaigns" / "dc2-test-med-1.yaml"
runner = CliRunner()


def _secret(label: str) -> str:
    return f"{label}-{secrets.token_urlsafe(16)}"


def _rucio(password: str) -> RucioCredentials:
    return RucioCredentials(
        rucio_host="https://rucio.example.org:8443",
        auth_host="https://rucio-auth.example.org:8443",
        account="drp-test",
        vo="def",
        auth_type="userpass",
        username="drp-user",
        password=SecretStr(password),
    )


def _panda(token: str) -> PandaCredentials:
    return PandaCredentials(
        panda_url="http://panda.example.org:25080/server/panda",
        panda_url_ssl="https://panda.example.org:25443/server/panda",
        cache_url="https://panda.example.org:25443/server/panda",
        auth_vo="Rubin",
        id_token=SecretStr(token),
        verify_host=False,
    )


def _facility(site: str, password: str, token: str) -> DataFacility:
    return DataFacility(
        site=site,
        compute_site="CC-IN2P3",
        cloud="EU",
        butler_repo="s3://butler-frdf/repo",
        raw_rse="FRDF_RAW_DISK",
        butler_rse="FRDF_BUTLER_DISK",
        storage_root="/sps/lsst/rucio",
        catalog_backend="rucio",
        workload_backend="panda",
        rucio=_rucio(password),
        panda=_panda(token),
    )


# ----------------------------------------------------------------------------------------------
# Without a server


def test_secrets_hidden_in_every_rendering() -> None:
    password, token = _secret("pw"), _secret("tok")
    facility = _facility("FrDF", password, token)
    for text in (
        repr(facility),
        str(facility),
        facility.model_dump_json(),
        json.dumps(facility.model_dump(mode="json")),
        repr(facility.rucio),
        repr(facility.panda),
    ):
        assert password not in text and token not in text
        assert "**********" in text


def test_validation_errors_do_not_quote_secrets() -> None:
    password = _secret("pw")
    with pytest.raises(ValidationError) as info:
        RucioCredentials(
            rucio_host="h",
            auth_host="a",
            account="x",
            auth_type="oidc",
            username="u",
            password=password,  # type: ignore[arg-type]
        )
    assert "needs 'token'" in str(info.value)
    assert password not in str(info.value)


def test_settings_unwrap_secrets() -> None:
    password, token = _secret("pw"), _secret("tok")
    facility = _facility("FrDF", password, token)
    assert facility.rucio is not None and facility.panda is not None
    assert facility.rucio.client_settings() == {
        "host": "https://rucio.example.org:8443",
        "auth_host": "https://rucio-auth.example.org:8443",
        "account": "drp-test",
        "vo": "def",
        "auth_type": "userpass",
        "username": "drp-user",
        "password": password,
        "token": None,
    }
    assert facility.panda.panda_settings("FrDF") == {
        "panda_url": "http://panda.example.org:25080/server/panda",
        "panda_url_ssl": "https://panda.example.org:25443/server/panda",
        "cache_url": "https://panda.example.org:25443/server/panda",
        "auth": "oidc",
        "auth_vo": "Rubin",
        "id_token": token,
        "verify_host": False,
    }
    assert facility.panda.retry_policy() == {"retries": 4, "backoff_s": 5.0}
    # The staging space and an iDDS server are passed on only when the block sets them, and
    # the factory builds the site's PanDA service from exactly what the block holds.
    staged = facility.panda.model_copy(
        update={"run_temp_space": "s3://rubin-frdf/panda-staging", "retries": 2, "backoff_s": 0.5}
    )
    settings = staged.panda_settings("FrDF")
    assert settings["run_temp_space"] == "s3://rubin-frdf/panda-staging"
    assert "idds_server" not in settings
    workload = make_workload("FrDF", "/work", None, settings, retry=staged.retry_policy())
    assert isinstance(workload, PandaWorkload)
    assert workload.settings.run_temp_space == "s3://rubin-frdf/panda-staging"
    assert workload.settings.verify_host is False and workload.settings.id_token == token
    assert (workload.retries, workload.backoff_s) == (2, 0.5)


@pytest.mark.parametrize(
    ("backends", "missing"),
    [
        ({"catalog_backend": "rucio"}, ["RucioCredentials"]),
        ({"workload_backend": "panda"}, ["PandaCredentials"]),
        ({"catalog_backend": "rucio", "workload_backend": "panda"}, ["Rucio", "Panda"]),
    ],
)
def test_validator_names_the_missing_credentials(
    backends: dict[str, str], missing: list[str]
) -> None:
    with pytest.raises(ValidationError) as info:
        DataFacility(
            site="FrDF",
            compute_site="CC-IN2P3",
            cloud="EU",
            butler_repo="/r",
            raw_rse="FRDF_RAW_DISK",
            butler_rse="FRDF_BUTLER_DISK",
            storage_root="/s",
            **backends,  # type: ignore[arg-type]
        )
    message = str(info.value)
    assert "data facility 'FrDF'" in message
    for name in missing:
        assert f"{name}" in message
    other = {"RucioCredentials": "PandaCredentials", "PandaCredentials": "RucioCredentials"}
    if len(missing) == 1:
        assert other[missing[0]] not in message


def test_rucio_auth_type_needs_its_credentials() -> None:
    with pytest.raises(ValidationError, match="'userpass' needs both"):
        RucioCredentials(rucio_host="h", auth_host="a", account="x", username="u")
    oidc = RucioCredentials(
        rucio_host="h",
        auth_host="a",
        account="x",
        auth_type="oidc",
        token=SecretStr("oidc-token-value"),
    )
    assert oidc.client_settings()["token"] == "oidc-token-value"
    assert oidc.client_settings()["password"] is None


def test_document_names() -> None:
    assert data_facility_document_name("dc2-test-med-1", "USDF") == "dc2-test-med-1-usdf"
    assert data_facility_document_name("dr1", "Fr_DF") == "dr1-fr-df"
    assert DataFacility.get_block_type_slug() == "data-facility"
    assert RucioCredentials.get_block_type_slug() == "rucio-credentials"
    assert PandaCredentials.get_block_type_slug() == "panda-credentials"


def test_commands_refuse_ephemeral_mode(tmp_path: Path) -> None:
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        for args in (["register"], ["local", "--spec", str(SPEC), "--workdir", str(tmp_path)]):
            result = runner.invoke(app, args)
            assert result.exit_code == 1
            assert "PREFECT_API_URL is not set" in result.output


# ----------------------------------------------------------------------------------------------
# Against the server


def test_register_types(prefect_api: Server) -> None:
    result = runner.invoke(app, ["register"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "registered block type rucio-credentials",
        "registered block type panda-credentials",
        "registered block type data-facility",
    ]
    secret_fields: dict[str, set[str]] = {}
    with get_client(sync_client=True) as client:
        for slug in ("rucio-credentials", "panda-credentials", "data-facility"):
            block_type = client.read_block_type_by_slug(slug)
            schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
            assert schema is not None
            secret_fields[slug] = set(schema.fields.get("secret_fields", []))
    # Prefect knows which fields to obfuscate, nested ones included.
    assert secret_fields["rucio-credentials"] == {"password", "token"}
    assert secret_fields["panda-credentials"] == {"id_token"}
    assert secret_fields["data-facility"] == {
        "rucio.password",
        "rucio.token",
        "panda.id_token",
    }


def test_save_load_and_what_the_api_shows(prefect_api: Server) -> None:
    campaign = f"blk-{secrets.token_hex(4)}"
    password, token = _secret("pw"), _secret("tok")
    facility = _facility("FrDF", password, token)
    block_id = facility.save(data_facility_document_name(campaign, "FrDF"))

    loaded = load_data_facility(campaign, "FrDF")
    assert loaded.site == "FrDF" and loaded.catalog_backend == "rucio"
    assert loaded.rucio is not None and loaded.panda is not None
    assert loaded.rucio.client_settings()["password"] == password
    assert loaded.panda.panda_settings("FrDF")["id_token"] == token
    assert password not in repr(loaded) and token not in repr(loaded)

    api = prefect_api.api_url
    url = f"{api}/block_documents/{block_id}"
    auth = {"Authorization": "Basic " + base64.b64encode(prefect_api.auth_string.encode()).decode()}
    # Anyone reaching the port without the auth string gets nothing.
    assert httpx.get(url, timeout=10).status_code == 401
    # With it, secrets are obfuscated by default...
    default = httpx.get(url, headers=auth, timeout=10)
    assert default.status_code == 200
    assert password not in default.text and token not in default.text
    assert default.json()["data"]["rucio"]["password"] == "********"
    # ...but any client may ask for them in clear: this is why the server needs API auth.
    revealed = httpx.get(url, params={"include_secrets": "true"}, headers=auth, timeout=10)
    assert password in revealed.text and token in revealed.text

    # At rest Prefect encrypts block data (Fernet; the key sits in the same database unless
    # PREFECT_SERVER_ENCRYPTION_KEY is set), so the database files hold no clear secret. The
    # one place the auth string belongs is the private env.sh clients source.
    findings = scan([prefect_api.home], [password, token, prefect_api.auth_string])
    assert {(Path(f.source).name, f.secret) for f in findings} == {("env.sh", 2)}


def test_load_errors(prefect_api: Server) -> None:
    campaign = f"blk-{secrets.token_hex(4)}"
    with pytest.raises(ValueError, match=data_facility_document_name(campaign, "USDF")):
        load_data_facility(campaign, "USDF")
    # A block saved for another spelling of the site is refused, not used.
    _facility("usdf", _secret("pw"), _secret("tok")).save(
        data_facility_document_name(campaign, "USDF")
    )
    with pytest.raises(ValueError, match="describes site 'usdf', not 'USDF'"):
        load_data_facility(campaign, "USDF")


def test_blocks_local(prefect_api: Server, tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    workdir = tmp_path / "work"
    result = runner.invoke(app, ["local", "--spec", str(SPEC), "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"created     data-facility/{spec.campaign}-{site.lower()}  (site {site})"
        for site in spec.site_names
    ]
    for site in spec.site_names:
        facility = load_data_facility(spec.campaign, site)
        upper = site.upper()
        assert facility.model_dump(include=set(DataFacility.model_fields)) == {
            "site": site,
            "compute_site": spec.sites[site].compute_site,
            "cloud": spec.sites[site].cloud,
            "butler_repo": str(site_repo_root(workdir.resolve(), site)),
            "raw_rse": f"{upper}_RAW_DISK",
            "butler_rse": f"{upper}_BUTLER_DISK",
            "storage_root": str(workdir.resolve() / "storage"),
            "catalog_backend": "embedded",
            "workload_backend": "local",
            "groups_in_flight": 2,
            "rucio": None,
            "panda": None,
        }
        assert facility.rse_root(f"{upper}_RAW_DISK") == workdir.resolve() / "storage" / (
            f"{upper}_RAW_DISK"
        )

    # Rerunning with the same values changes nothing; other values need --overwrite.
    again = runner.invoke(app, ["local", "--spec", str(SPEC), "--workdir", str(workdir)])
    assert again.exit_code == 0
    assert [line.split()[0] for line in again.output.splitlines()] == ["unchanged"] * 3
    other = tmp_path / "other"
    refused = runner.invoke(app, ["local", "--spec", str(SPEC), "--workdir", str(other)])
    assert refused.exit_code == 1
    assert "pass --overwrite" in refused.output
    assert load_data_facility(spec.campaign, "USDF").storage_root == str(
        workdir.resolve() / "storage"
    )
    replaced = runner.invoke(
        app, ["local", "--spec", str(SPEC), "--workdir", str(other), "--overwrite"]
    )
    assert replaced.exit_code == 0
    assert [line.split()[0] for line in replaced.output.splitlines()] == ["overwritten"] * 3
    assert load_data_facility(spec.campaign, "USDF").storage_root == str(
        other.resolve() / "storage"
    )


def test_blocks_local_names_existing_repositories(prefect_api: Server, tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    workdir = tmp_path / "work"
    repo = tmp_path / "frdf-repo" / "butler.yaml"
    args = ["local", "--spec", str(SPEC), "--workdir", str(workdir), "--overwrite"]
    result = runner.invoke(app, [*args, "--repo", f"FrDF={repo}"])
    assert result.exit_code == 0, result.output
    assert load_data_facility(spec.campaign, "FrDF").butler_repo == str(repo)
    # The other sites keep the embedded layout.
    assert load_data_facility(spec.campaign, "UKDF").butler_repo == str(
        site_repo_root(workdir.resolve(), "UKDF")
    )
    unknown = runner.invoke(app, [*args, "--repo", "XXDF=/repo"])
    assert unknown.exit_code == 2 and "XXDF" in unknown.output and "FrDF" in unknown.output
    malformed = runner.invoke(app, [*args, "--repo", "FrDF"])
    assert malformed.exit_code == 2 and "give SITE=URI" in malformed.output
    assert load_data_facility(spec.campaign, "FrDF").butler_repo == str(repo)


def test_blocks_local_bad_spec_and_wrong_auth(prefect_api: Server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.read_text().replace("hub: USDF", "hub: XXDF"))
    result = runner.invoke(app, ["local", "--spec", str(bad), "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "hub" in result.output
    with temporary_settings(updates={PREFECT_API_AUTH_STRING: "drp-test:not-the-password"}):
        refused = runner.invoke(app, ["register"])
    assert refused.exit_code == 1
    assert "refused the request (401)" in refused.output
    assert "not-the-password" not in refused.output


# ----------------------------------------------------------------------------------------------
# A flow using the credentials leaks them nowhere


@task
def _use_facility(campaign: str, site: str) -> str:
    facility = load_data_facility(campaign, site)
    logger = get_run_logger()
    logger.info("loaded %r", facility)
    logger.info("rucio block %s; panda block %s", facility.rucio, facility.panda)
    assert facility.rucio is not None and facility.panda is not None
    rucio = facility.rucio.client_settings()
    panda = facility.panda.panda_settings(site)
    # What a task may report: counts and names, never the settings themselves.
    return f"{len(rucio)} rucio and {len(panda)} panda settings for {facility.site}"


@flow(name="drp-blocks-secret-check")
def _secret_check(campaign: str, site: str) -> str:
    get_run_logger().info("checking campaign %s at %s", campaign, site)
    return _use_facility(campaign, site)


def test_flow_leaks_no_secret(
    prefect_api: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    campaign = f"blk-{secrets.token_hex(4)}"
    password, token = _secret("pw"), _secret("tok")
    _facility("FrDF", password, token).save(data_facility_document_name(campaign, "FrDF"))

    caplog.set_level("DEBUG")
    state = _secret_check(campaign, "FrDF", return_state=True)
    assert state.is_completed()
    assert state.result() == "8 rucio and 7 panda settings for FrDF"
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    APILogHandler().flush()  # drain the background log worker into the API

    with get_client(sync_client=True) as client:
        # The log worker ships records asynchronously: wait (with a deadline) for the last.
        deadline = time.monotonic() + 60
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            if any("rucio block" in log.message for log in logs):
                break
            assert time.monotonic() < deadline, "the task's log lines never reached the API"
            time.sleep(0.5)
        flow_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        task_runs = client.read_task_runs()
    texts = [(f"api log {log.id}", log.message) for log in logs]
    texts += [(f"record {r.name}", r.message) for r in caplog.records]
    texts += [(f"flow run {r.id}", r.model_dump_json()) for r in flow_runs]
    texts += [(f"task run {r.id}", r.model_dump_json()) for r in task_runs]
    known = [password, token, prefect_api.auth_string]
    # Positive control: these texts do show the run, and the scanner does see a leak in them.
    assert any(campaign in text for _, text in texts)
    assert scan([], known, [("control", f"oops {token} leaked")])
    findings = scan([prefect_api.home, tmp_path], known, texts)
    assert {(Path(f.source).name, f.secret) for f in findings} == {("env.sh", 2)}
