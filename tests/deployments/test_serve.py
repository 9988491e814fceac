"""`make serve` for real: a Prefect server on 127.0.0.1 with API auth, a process worker, the
deployments, and a rerun of one step at one site through `prefect deployment run`.

The sites' Blocks carry known secret values (Rucio password, PanDA token); after the run every
file the campaign and the server wrote, the worker's log and every flow-run log line are
searched for them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drp_campaign.backends.factory import make_campaign_run
from drp_campaign.ledger import Ledger
from drp_campaign.model.spec import load_spec
from drp_campaign.planner import dask_client
from drp_campaign.secrets_scan import scan
from drp_campaign.seed import seed_embedded

from .helpers import client_env

ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
BIN = Path(sys.executable).parent
SECRETS = ("rucio-pw-4f9c1e7a2b", "panda-id-token-8d2e61c0f5")

SAVE_BLOCKS = """
import sys
from pathlib import Path
from blocks import PandaCredentials, RucioCredentials, embedded_data_facility
from drp_campaign.model.spec import load_spec
spec = load_spec(sys.argv[1])
rucio = RucioCredentials(rucio_host="https://rucio.example:8443", auth_host="https://rucio.example:8443",
                         account="drp", username="drp", password=sys.argv[3])
panda = PandaCredentials(panda_url="https://panda.example/server/panda",
                         panda_url_ssl="https://panda.example/server/panda",
                         cache_url="https://panda.example/server/panda", auth_vo="Rubin",
                         id_token=sys.argv[4])
from blocks import data_facility_document_name
for site in spec.site_names:
    f = embedded_data_facility(spec, site, Path(sys.argv[2]))
    f = f.model_copy(update={"rucio": rucio, "panda": panda})
    f.save(data_facility_document_name(spec.campaign, site), overwrite=True)
"""


@pytest.mark.slow
def test_serve_then_rerun_one_step_at_one_site(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        DEMO.read_text()
        .replace("visits: 8}", "visits: 6}")
        .replace("yaml: pipelines/", f"yaml: {ROOT}/pipelines/")
    )
    spec = load_spec(spec_path)
    workdir = tmp_path / "work"
    seed_embedded(spec, workdir)
    # The campaign up to step2c, without Prefect: step3 at FrDF is what the operator reruns.
    with dask_client(workers=2) as client:
        run = make_campaign_run(spec, workdir, client)
        run.run_all(["step1", "step2", "step2c"])

    serve = [str(ROOT / "scripts" / "serve.sh"), str(BIN), str(spec_path), str(workdir)]
    home = workdir / "prefect"
    started = subprocess.run([*serve, "start"], capture_output=True, text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        env = client_env(home)
        assert env.get("PREFECT_API_AUTH_STRING"), "make serve must turn API auth on"
        # Without the auth string the API refuses (Block secrets are not readable by anyone
        # reaching the port).
        import httpx

        api = env["PREFECT_API_URL"]
        assert httpx.post(f"{api}/block_documents/filter", json={}).status_code == 401

        saved = subprocess.run(
            [sys.executable, "-c", SAVE_BLOCKS, str(spec_path), str(workdir), *SECRETS],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert saved.returncode == 0, saved.stderr
        ran = subprocess.run(
            [
                str(BIN / "prefect"), "deployment", "run", "drp-step/default",
                "-p", "step=step3", "-p", 'sites=["FrDF"]',
                "-p", f"spec={spec_path}", "-p", f"workdir={workdir}",
                "--watch", "--watch-timeout", "900",
            ],
            env=env, capture_output=True, text=True, timeout=1000,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert "Completed" in ran.stdout
        # UKDF is lost for good: the operator re-plans without it from a deployment.
        replanned = subprocess.run(
            [
                str(BIN / "prefect"), "deployment", "run", "drp-replan/default",
                "-p", 'without=["UKDF"]', "-p", "reason=UKDF storage lost",
                "-p", f"spec={spec_path}", "-p", f"workdir={workdir}",
                "--watch", "--watch-timeout", "600",
            ],
            env=env, capture_output=True, text=True, timeout=700,
        )  # fmt: skip
        assert replanned.returncode == 0, replanned.stdout[-3000:] + replanned.stderr[-3000:]
        flow_run_logs = _flow_run_logs(env)
    finally:
        stopped = subprocess.run([*serve, "stop"], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr

    ledger = Ledger(workdir / "ledger.sqlite")
    step3 = {(r.site, r.stage): r.state for r in ledger.records("step3")}
    assert {site for site, _ in step3} == {"FrDF"}, step3
    assert set(step3.values()) == {"DONE"}
    assert [r for r in ledger.records("step4")] == []
    revision = ledger.get("*", "*", "replan", group="r1")
    assert revision is not None and revision.done
    assert revision.figures["without"] == ["UKDF"]
    assert revision.figures["reason"] == "UKDF storage lost"
    assert (workdir / "plan-r1" / "groups.json").exists()
    assert "step3@UKDF" not in json.loads((workdir / "plan-r1" / "groups.json").read_text())
    # Secrets: nowhere in what the campaign or the server wrote, nor in any log line.
    logs = [("flow-run logs", "\n".join(flow_run_logs))]
    assert flow_run_logs, "no flow-run logs were read back"
    roots = [workdir]  # includes the server's home (prefect/) and the worker's log
    findings = scan(roots, SECRETS, logs)
    assert findings == [], [str(f) for f in findings]


def _flow_run_logs(env: dict[str, str]) -> list[str]:
    code = (
        "import json, asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import LogFilter\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        logs = await c.read_logs(limit=200)\n"
        "        offset = 200\n"
        "        out = [l.message for l in logs]\n"
        "        while len(logs) == 200:\n"
        "            logs = await c.read_logs(limit=200, offset=offset)\n"
        "            out += [l.message for l in logs]; offset += 200\n"
        "        print(json.dumps(out))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))
