"""A campaign on repositories the project did not create (issue 11 item 8).

The hub is built the way an operator's would be: ``butler create``, then ``butler import`` of an
export of a seeded hub. The three site repositories are empty ones from ``butler create``, one
with a PostgreSQL registry; the sites' Blocks name them (``drp-campaign blocks local --repo``)
and the campaign, planned from the hub's registry (``survey: {butler: ...}``), runs through the
Prefect flows against a real server. Its products at the hub must equal the single-site
reference, and nothing may be written under the work directory's ``repos/`` (the embedded
default's layout, which no stage may derive any more).

daf_butler's CLI has no ``butler export`` (only ``export-calibs``), so the export is written
with ``Butler.export``, the API whose YAML ``butler import`` reads. The mock datasets' storage
classes exist only once ``lsst.pipe.base.tests.mocks`` is imported (middleware-notes.md), so
``butler import`` runs the real CLI entry point in a process that imported it first, as
``butler aggregate-graph --mock-storage-classes`` does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from lsst.daf.butler import Butler

from drp_campaign.backends.butler import ingest_mock_skymap, register_skymap
from drp_campaign.model.spec import load_spec
from drp_campaign.seed import seed_hub

from ..reports import check_report
from .helpers import client_env

ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
BIN = Path(sys.executable).parent
SERVER = [sys.executable, str(ROOT / "scripts" / "prefect_server.py")]
# The real `butler` entry point, with the mock storage classes registered first.
BUTLER_WITH_MOCKS = [
    sys.executable,
    "-c",
    "import sys, lsst.pipe.base.tests.mocks; from lsst.daf.butler.cli.butler import main; "
    "sys.argv[0] = 'butler'; sys.exit(main())",
]


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"{cmd[:3]}... exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def _export(repo: Path, directory: Path) -> int:
    """Everything in ``repo`` (records, collections, datasets with files) as an export."""
    directory.mkdir(parents=True)
    with (
        Butler.from_config(str(repo)) as butler,
        butler.export(directory=str(directory), filename="export.yaml", transfer="copy") as out,
    ):
        for element in butler.dimensions.getStaticElements():
            if element.has_own_table:
                records = list(butler.registry.queryDimensionRecords(element.name))
                if records:
                    out.saveDimensionData(element, records)
        for name in butler.registry.queryCollections(...):
            out.saveCollection(name)
        refs = list(butler.registry.queryDatasets(..., collections=...))
        out.saveDatasets(refs)
    return len(refs)


@pytest.mark.slow
@pytest.mark.postgres
def test_campaign_on_operator_repositories_equals_single_site(tmp_path: Path) -> None:
    url = os.environ.get("DRP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("DRP_TEST_POSTGRES_URL is not set (make test runs under with-postgres.sh)")
    # The observatory's survey (a preset seeds its hub); the operator's spec plans from the hub.
    preset_path = tmp_path / "observatory.yaml"
    preset_path.write_text(
        DEMO.read_text()
        .replace("visits: 8}", "visits: 4}")
        .replace("yaml: pipelines/", f"yaml: {ROOT}/pipelines/")
    )
    preset = load_spec(preset_path)

    # The observatory: a hub somewhere else, exported; then the operator's own repositories.
    seeded = tmp_path / "observatory" / "hub"
    seed_hub(preset, seeded)
    n_refs = _export(seeded, tmp_path / "export")
    ops = tmp_path / "ops"
    hub = ops / "USDF"
    _run([str(BIN / "butler"), "create", str(hub)])
    _run(
        [*BUTLER_WITH_MOCKS, "import", str(hub), str(tmp_path / "export")]
        + ["--export-file", str(tmp_path / "export" / "export.yaml"), "--transfer", "copy"]
    )
    _run([str(BIN / "butler"), "create", str(ops / "FrDF")])
    # FrDF was set up beforehand with the skymap and a skyMap dataset of its own (another UUID
    # than the hub's under the same data ID): setup must keep it and move the rest.
    with Butler.from_config(str(ops / "FrDF"), writeable=True) as frdf:
        register_skymap(frdf, preset.skymap, tracts=[])
        ingest_mock_skymap(frdf, preset.skymap.name, size_bytes=1024)
        (own_skymap,) = frdf.query_datasets("skyMap", "skymaps", skymap=preset.skymap.name)
    # UKDF's registry is PostgreSQL, in a schema of its own (the server is shared by the suite).
    pg_url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    engine = sqlalchemy.create_engine(pg_url)
    with engine.begin() as conn:  # daf_butler's PostgreSQL registry needs btree_gist
        conn.execute(sqlalchemy.text("CREATE EXTENSION IF NOT EXISTS btree_gist"))
    engine.dispose()
    seed_config = tmp_path / "ukdf-seed.yaml"
    namespace = f"ukdf_{uuid.uuid4().hex[:10]}"
    seed_config.write_text(f"registry:\n  db: {pg_url}\n  namespace: {namespace}\n")
    _run([str(BIN / "butler"), "create", str(ops / "UKDF"), "--seed-config", str(seed_config)])
    # The operator's spec: the visits are those the hub's registry holds, their regions as stored.
    spec_path = tmp_path / "spec.yaml"
    survey = re.search(r"^survey: .*$", preset_path.read_text(), re.M)
    assert survey is not None
    spec_path.write_text(
        preset_path.read_text().replace(survey.group(0), f"survey: {{butler: {hub}}}")
    )
    spec = load_spec(spec_path)
    assert spec.survey.is_registry
    repos = {
        "USDF": str(hub / "butler.yaml"),  # a config file,
        "FrDF": (ops / "FrDF").as_uri(),  # a URI,
        "UKDF": str(ops / "UKDF"),  # a directory (PostgreSQL registry)
    }

    workdir = tmp_path / "work"
    home = workdir / "prefect"
    _run([*SERVER, "start", "--home", str(home)])
    try:
        env = client_env(home)
        cli = [str(BIN / "drp-campaign")]
        _run([*cli, "blocks", "register"], env)
        _run(
            [*cli, "blocks", "local", "--spec", str(spec_path), "--workdir", str(workdir)]
            + [arg for site, uri in repos.items() for arg in ("--repo", f"{site}={uri}")],
            env,
        )
        # The campaign through the flows (PREFECT_API_URL set: not --no-prefect).
        done = subprocess.run(
            [*cli, "run", str(spec_path), "--workdir", str(workdir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        out = done.stdout + done.stderr
    finally:
        subprocess.run([*SERVER, "stop", "--home", str(home)], capture_output=True, timeout=120)
    # No traceback through our code. distributed may log one of its own when the cluster's
    # comms close at shutdown (batched.py's background send), after the run has succeeded.
    for package in ("drp_campaign", "flows", "tasks", "blocks"):
        assert f'File "{ROOT / package}' not in out, out[-4000:]

    check_report(workdir, done.returncode, out)
    # Nothing under the embedded layout: every stage used the repositories the Blocks name.
    assert not (workdir / "repos").exists()
    # The hub kept what the observatory gave it, and the campaign's products are in it.
    with Butler.from_config(repos["USDF"]) as butler:
        inputs = spec.inputs.collections(spec.instrument)
        raws = butler.query_datasets("raw", inputs.raws, instrument=spec.instrument)
        assert len(raws) == 4 * 9  # LSSTComCam: 9 detectors
        assert len(list(butler.registry.queryDatasets(..., collections=...))) > n_refs
        assert spec.campaign + "/output" in set(butler.registry.queryCollections(...))
    # FrDF kept its own sky map, and its products were made with it.
    assert spec.pvi is not None
    with Butler.from_config(repos["FrDF"]) as butler:
        (skymap_ref,) = butler.query_datasets("skyMap", "skymaps", skymap=spec.skymap.name)
        assert skymap_ref.id == own_skymap.id
        assert butler.query_datasets(
            spec.pvi, f"{spec.campaign}/FrDF/output", instrument=spec.instrument, limit=1
        )
    # UKDF worked in its PostgreSQL registry.
    with Butler.from_config(repos["UKDF"]) as butler:
        assert "postgresql" in str(butler._config["registry", "db"])  # type: ignore[attr-defined]
        pvis = butler.query_datasets(
            spec.pvi, f"{spec.campaign}/UKDF/output", instrument=spec.instrument, limit=1
        )
        assert pvis
