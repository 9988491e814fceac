"""Campaigns whose survey is a visits CSV (``survey: {visits: file.csv}``), and the checks that
``validate``, ``plan`` and ``run`` make before anything moves: every line of the CSV, the
pipeline file and every step's subset. A bad input exits 2 naming the key and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from drp_campaign.backends.pipeline import check_pipeline
from drp_campaign.cli import app
from drp_campaign.ledger import CAMPAIGN, Ledger
from drp_campaign.model.spec import SpecError, load_spec
from drp_campaign.model.survey import make_survey, write_visits_csv
from drp_campaign.preflight import preflight

from .reports import check_report

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"
PIPELINE = ROOT / "pipelines" / "DRP-mock.yaml"
HEADER = "visit,band,ra,dec,rotation\n"


def _spec_text(survey: str = "{visits: visits.csv}", pipeline: str = str(PIPELINE)) -> str:
    """The demo spec (LSSTComCam, three sites) with another survey and pipeline."""
    text = DEMO.read_text()
    old_survey = "{preset: dc2-test-med-1, seed: 1, visits: 8}"
    assert text.count(old_survey) == 1 and text.count("pipelines/DRP-mock.yaml") == 1
    return text.replace(old_survey, survey).replace("pipelines/DRP-mock.yaml", pipeline)


def _campaign(tmp: Path, visits: int = 3, **spec: str) -> Path:
    """A spec file beside a CSV of ``visits`` visits of the dc2-test-med-1 preset."""
    write_visits_csv(make_survey("dc2-test-med-1", seed=1, visits=visits), tmp / "visits.csv")
    path = tmp / "spec.yaml"
    path.write_text(_spec_text(**spec))
    return path


def _args(command: str, spec: Path, work: Path) -> list[str]:
    """``command`` on ``spec``, writing (if it got that far) under ``work``."""
    extra = {
        "validate": [],
        "plan": ["--out", str(work)],
        "run": ["--workdir", str(work), "--no-prefect"],
    }
    return [command, str(spec), *extra[command]]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, importing this checkout's code."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "drp_campaign.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=900,
    )


# ------------------------------------------------------------------------------ good CSV spec
def test_validate_and_plan_a_csv_spec(tmp_path: Path) -> None:
    spec = _campaign(tmp_path, visits=5)
    runner = CliRunner()
    checked = runner.invoke(app, ["validate", str(spec)], env={"COLUMNS": "200"})
    assert checked.exit_code == 0, checked.output
    assert f"{spec}: OK: campaign dc2-test-med-1, 5 visits, 3 sites" in checked.output
    out = tmp_path / "plan"
    planned = runner.invoke(app, ["plan", str(spec), "--out", str(out)])
    assert planned.exit_code == 0, planned.output
    visits = pq.read_table(out / "visits.parquet").to_pandas()
    want = pd.read_csv(tmp_path / "visits.csv")
    assert visits["visit"].tolist() == sorted(want["visit"])
    assert json.loads((out / "summary.json").read_text())["counts"]["visits"] == 5


# ------------------------------------------------------------------------------- bad CSV files
BAD_CSV = {
    "dec-out-of-range": (
        HEADER + "1,r,57,-36,0\n2,r,57,-95,0\n",
        "line 3, column 'dec': -95 is outside [-90, 90]. Fix: give dec in degrees",
    ),
    "duplicate-visit": (
        HEADER + "1,r,57,-36,0\n1,g,57,-36,0\n",
        "line 3, column 'visit': 1 repeats line 2. Fix: give every visit a unique id",
    ),
    "extra-column": (
        "visit,band,ra,dec,rotation,mjd\n1,r,57,-36,0,60000\n",
        "line 1, column 'mjd': is not a visits column",
    ),
    "unknown-band": (
        HEADER + "1,Y,57,-36,0\n",
        "line 2, column 'band': 'Y' is not one of u, g, r, i, z, y (did you mean 'y'?)",
    ),
    "empty-file": ("", "line 1: the file is empty. Fix: make the first line exactly"),
}


@pytest.mark.parametrize(("body", "message"), BAD_CSV.values(), ids=BAD_CSV)
@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_bad_csv_exits_2_naming_file_line_and_column(
    tmp_path: Path, command: str, body: str, message: str
) -> None:
    spec = _campaign(tmp_path)
    (tmp_path / "visits.csv").write_text(body)
    work = tmp_path / "work"
    result = CliRunner().invoke(app, _args(command, spec, work), env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert f"error: {spec}: survey.visits: 'visits.csv' is not valid: " in result.output
    assert f"{tmp_path / 'visits.csv'}: {message}" in result.output
    assert not work.exists()  # checked before anything is written


def test_bad_csv_in_a_subprocess_has_no_traceback(tmp_path: Path) -> None:
    spec = _campaign(tmp_path)
    (tmp_path / "visits.csv").write_text(HEADER + "1,r,361,-36,0\n")
    proc = _cli("plan", str(spec), "--out", str(tmp_path / "plan"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (
        f"{tmp_path / 'visits.csv'}: line 2, column 'ra': 361 is outside [0, 360). "
        "Fix: wrap ra into [0, 360) degrees." in proc.stderr
    )
    assert not (tmp_path / "plan").exists()


def test_preset_count_beyond_the_preset_exits_2(tmp_path: Path) -> None:
    # Not a CSV, but the same check: make_survey's ValueError used to be a traceback in plan.
    spec = _campaign(tmp_path, survey="{preset: dr1, visits: 300000}")
    result = CliRunner().invoke(app, ["validate", str(spec)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert (
        f"error: {spec}: survey.visits: 300000 is not valid: survey preset 'dr1': visits=300000 "
        "exceeds the 240000 visits of the full list. Fix: ask for at most 240000." in result.output
    )


# ------------------------------------------------------------------------------------ pipeline
def test_check_pipeline(tmp_path: Path) -> None:
    spec = load_spec(_campaign(tmp_path))
    assert check_pipeline(spec) == []

    def steps(*subsets: str) -> str:
        return "".join(
            f"  - {{name: s{i}, subset: {s}, shard: visit, placement: per-site}}\n"
            for i, s in enumerate(subsets)
        )

    text = (
        _spec_text().split("steps:")[0]
        + "steps:\n"
        + steps("step1", "stpe2", "calibrateImage", "coadd")
    )
    (tmp_path / "subsets.yaml").write_text(text)
    problems = check_pipeline(load_spec(tmp_path / "subsets.yaml"))
    # A task label is accepted (file.yaml#label takes either); the others are named.
    assert [str(p) for p in problems] == [
        "steps[1].subset: 'stpe2' is not valid: DRP-mock.yaml has no subset 'stpe2' (did you "
        "mean 'step2'?); its subsets are step1, step2, step2c, step3, step4, step5, step6, "
        "step7. Fix: use 'step2'.",
        "steps[3].subset: 'coadd' is not valid: DRP-mock.yaml has no subset 'coadd'; its "
        "subsets are step1, step2, step2c, step3, step4, step5, step6, step7. Fix: set it to "
        "one of the pipeline's subsets, or add a subset 'coadd' under 'subsets:' in "
        "DRP-mock.yaml.",
    ]

    (tmp_path / "broken.yaml").write_text("description: x\ntasks: [\n")
    (tmp_path / "bad-pipeline.yaml").write_text(_spec_text(pipeline="broken.yaml"))
    (problem,) = check_pipeline(load_spec(tmp_path / "bad-pipeline.yaml"))
    assert problem.key == "pipeline.yaml"
    assert f"{tmp_path / 'broken.yaml'} is not a pipeline lsst.pipe.base can read" in str(problem)


@pytest.mark.parametrize(
    ("edit", "key", "message"),
    [
        (
            {"pipeline": "pipelines/missing.yaml"},
            "pipeline.yaml",
            "'pipelines/missing.yaml' is not valid: file not found: ",
        ),
        (
            {"pipeline": "."},
            "pipeline.yaml",
            "'.' is not valid: is a directory, not a file: ",
        ),
    ],
    ids=["missing", "directory"],
)
@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_bad_pipeline_exits_2_naming_the_key(
    tmp_path: Path, command: str, edit: dict[str, str], key: str, message: str
) -> None:
    spec = _campaign(tmp_path, **edit)
    work = tmp_path / "work"
    result = CliRunner().invoke(app, _args(command, spec, work), env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert f"error: {spec}: {key}: {message}" in result.output
    assert "Fix: give the pipeline YAML relative to the spec's directory" in result.output
    assert not work.exists()


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_unknown_subset_exits_2_with_did_you_mean(tmp_path: Path, command: str) -> None:
    spec = _campaign(tmp_path)
    spec.write_text(spec.read_text().replace("subset: step3,", "subset: step03,"))
    work = tmp_path / "work"
    result = CliRunner().invoke(app, _args(command, spec, work), env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert (
        f"error: {spec}: steps[3].subset: 'step03' is not valid: DRP-mock.yaml has no subset "
        "'step03' (did you mean 'step3'?)" in result.output
    )
    assert not work.exists()


def test_plan_stage_checks_before_anything_moves(tmp_path: Path) -> None:
    # A run that does not start from the command (a served deployment) stops at its first
    # stage, with the same message, and the ledger says why.
    from drp_campaign.backends.factory import make_campaign_run

    spec_path = _campaign(tmp_path)
    spec_path.write_text(spec_path.read_text().replace("subset: step4,", "subset: step44,"))
    spec = load_spec(spec_path)
    with pytest.raises(SpecError) as info:
        preflight(spec)
    assert info.value.key == "steps[4].subset"
    run = make_campaign_run(spec, tmp_path / "work", None)
    with pytest.raises(SpecError, match=r"steps\[4\]\.subset: 'step44' is not valid"):
        run.plan()
    record = Ledger(tmp_path / "work" / "ledger.sqlite").get(CAMPAIGN, CAMPAIGN, "plan")
    assert record is not None and record.state == "FAILED"
    assert "steps[4].subset" in (record.error or "")
    assert not (tmp_path / "work" / "plan" / "visits.parquet").exists()
    assert not (tmp_path / "work" / "repos").exists()


# --------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_plan_and_run_a_campaign_from_a_csv(tmp_path: Path) -> None:
    spec = _campaign(tmp_path, visits=3)
    plan = _cli("plan", str(spec), "--out", str(tmp_path / "plan"))
    assert plan.returncode == 0, plan.stdout + plan.stderr
    work = tmp_path / "work"
    # Unseeded, the run stops before anything moves and says how to seed.
    unseeded = _cli("run", str(spec), "--workdir", str(work), "--no-prefect")
    assert unseeded.returncode == 2, unseeded.stdout + unseeded.stderr
    assert "drp-campaign seed SPEC --workdir WORKDIR" in unseeded.stdout + unseeded.stderr
    assert "Traceback" not in unseeded.stdout + unseeded.stderr
    seed = _cli("seed", str(spec), "--workdir", str(work))
    assert seed.returncode == 0, seed.stdout + seed.stderr
    run = _cli("run", str(spec), "--workdir", str(work), "--no-prefect")
    assert "Traceback" not in run.stdout + run.stderr
    csv_visits = sorted(pd.read_csv(tmp_path / "visits.csv")["visit"])
    for out in (tmp_path / "plan", work / "plan"):
        assert sorted(pq.read_table(out / "visits.parquet").to_pandas()["visit"]) == csv_visits
    check_report(work, run.returncode, run.stdout + run.stderr)
