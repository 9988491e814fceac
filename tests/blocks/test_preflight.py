"""``drp-campaign preflight`` on the demo's campaign: every check PASS, then exactly three FAILs.

The sites' Blocks live on the session's real Prefect server; USDF submits to PanDA (the PanDA
test server on 127.0.0.1, pinged through the real client in its own process), the others run
locally. Then one site's repository is removed, one RSE is made read-only (Rucio's
``availability_write``) and USDF's Block names a PanDA URL where nothing listens: preflight
must print exactly those three FAILs, each with its fix, and exit 1, with no secret anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blocks import PandaCredentials, data_facility_document_name, embedded_data_facility
from drp_campaign.backends.ingest import storage_root
from drp_campaign.backends.local.catalog import EmbeddedCatalog
from drp_campaign.model.spec import load_spec
from drp_campaign.preflight import PreflightFailed
from drp_campaign.seed import seed_embedded
from flows.campaign import drp_campaign_flow

from ..panda_server import PandaTestServer, free_port
from .conftest import Server

ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
CLI = Path(sys.executable).parent / "drp-campaign"


def _preflight(spec: Path, work: Path, server: Server, out: Path) -> tuple[int, str, list]:
    env = {
        **os.environ,
        "PREFECT_API_URL": server.api_url,
        "PREFECT_API_AUTH_STRING": server.auth_string,
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [str(CLI), "preflight", str(spec), "--workdir", str(work), "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, json.loads(out.read_text())


@pytest.mark.slow
def test_preflight_passes_then_names_three_faults(prefect_api: Server, tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        DEMO.read_text()
        .replace("visits: 8}", "visits: 4}")
        .replace("yaml: pipelines/", f"yaml: {ROOT}/pipelines/")
    )
    spec = load_spec(spec_path)
    work = tmp_path / "work"
    seed_embedded(spec, work, file_size=64)
    with PandaTestServer() as panda:
        token = panda.issue_token("operator", lifetime_s=48 * 3600)

        def save(panda_url: str) -> None:
            for site in spec.site_names:
                f = embedded_data_facility(spec, site, work)
                if site == spec.hub:
                    creds = PandaCredentials(
                        panda_url=panda_url,
                        panda_url_ssl=panda_url,
                        cache_url=panda_url,
                        auth_vo=panda.vo,
                        id_token=token,
                        verify_host=False,
                        retries=1,
                    )
                    f = f.model_copy(update={"workload_backend": "panda", "panda": creds})
                f.save(data_facility_document_name(spec.campaign, site), overwrite=True)

        save(panda.url)
        rc, output, rows = _preflight(spec_path, work, prefect_api, tmp_path / "ok.json")
        assert rc == 0, output
        assert rows and {r["status"] for r in rows} == {"PASS"}, output
        checks = {(r["site"], r["check"]) for r in rows}
        for site in spec.site_names:
            for check in ("block", "butler", "instrument", "skymap", "catalog", "space"):
                assert (site, check) in checks
        assert ("USDF", "panda-token") in checks
        hub_workload = next(r for r in rows if (r["site"], r["check"]) == ("USDF", "workload"))
        assert panda.url in hub_workload["value"]

        # The three faults.
        shutil.rmtree(work / "repos" / "FrDF")
        catalog = EmbeddedCatalog(work / "catalog")
        catalog.add_rse("UKDF_RAW_DISK", storage_root(work, "UKDF_RAW_DISK"))
        catalog.set_rse_writable("UKDF_RAW_DISK", False)
        dead = f"http://127.0.0.1:{free_port()}/server/panda"
        save(dead)
        rc, output, rows = _preflight(spec_path, work, prefect_api, tmp_path / "bad.json")
        # The campaign flow stops at its first task: nothing planned, set up or moved.
        with pytest.raises(PreflightFailed, match=r"FrDF butler: .*Fix: "):
            drp_campaign_flow(str(spec_path), str(work), verify=False)
    assert not (work / "plan").exists() and not (work / "ledger.sqlite").exists()
    assert EmbeddedCatalog(work / "catalog").list_rses() == ["UKDF_RAW_DISK"]
    assert rc == 1, output
    failed = {(r["site"], r["check"]): r for r in rows if r["status"] == "FAIL"}
    assert set(failed) == {("FrDF", "butler"), ("UKDF", "rse:UKDF_RAW_DISK"), ("USDF", "workload")}
    assert "butler_repo" in failed["FrDF", "butler"]["fix"]
    assert "availability_write" in failed["UKDF", "rse:UKDF_RAW_DISK"]["fix"]
    assert dead in failed["USDF", "workload"]["value"]
    assert "panda_url" in failed["USDF", "workload"]["fix"]
    assert all(r["fix"] for r in failed.values())
    # The checks that needed FrDF's repository say so instead of failing again.
    assert {r["check"] for r in rows if r["status"] == "SKIP"} == {"instrument", "skymap"}
    assert "3 FAIL" in output and "FrDF/butler" in output
    assert token not in output and token not in json.dumps(rows)
