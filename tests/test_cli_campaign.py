"""`drp-campaign run` and `status`: what an operator sees before and after a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drp_campaign.cli import app
from drp_campaign.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"


def test_run_refuses_ephemeral_prefect(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = CliRunner().invoke(app, ["run", str(DEMO), "--workdir", str(tmp_path)])
    assert result.exit_code == 2
    assert "PREFECT_API_URL is not set" in result.output and "make serve" in result.output
    assert not (tmp_path / "ledger.sqlite").exists()  # nothing started


def test_run_names_an_unknown_step(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", str(DEMO), "--workdir", str(tmp_path), "--step", "step9", "--no-prefect"]
    )
    assert result.exit_code == 2
    assert "unknown step(s) ['step9']" in result.output and "step2c" in result.output


def test_status_prints_the_ledger(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["status", "--workdir", str(tmp_path)])
    assert missing.exit_code == 2 and "no ledger" in missing.output
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start("step3", "FrDF", "build")
    ledger.finish("step3", "FrDF", "build", {"n_quanta": 1124})
    ledger.start("step3", "UKDF", "stage")
    ledger.fail("step3", "UKDF", "stage", "ArrivalTimeout: 3 file(s) not ingested at UKDF")
    result = CliRunner().invoke(app, ["status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = _cells(result.output)  # the table wraps long cells at the terminal's width
    assert "n_quanta=1124" in text and "DONE" in text
    assert "FAILED" in text and "notingestedatUKDF" in text
    only = CliRunner().invoke(app, ["status", "--workdir", str(tmp_path), "--site", "FrDF"])
    assert "UKDF" not in only.output and "FrDF" in only.output


def test_status_counts_each_site_steps_groups(tmp_path: Path) -> None:
    (tmp_path / "plan").mkdir()
    groups = {"step1@FrDF": [{"group": f"g00{i}", "visits": [i]} for i in range(4)]}
    (tmp_path / "plan" / "groups.json").write_text(json.dumps(groups))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for stage in ("stage", "bps", "build", "submit", "publish", "arrive"):
        ledger.start("step1", "FrDF", stage, group="g000")
        ledger.finish("step1", "FrDF", stage, group="g000")
    ledger.start("step1", "FrDF", "submit", group="g001")
    ledger.fail("step1", "FrDF", "submit", "run FAILED: calibrateImage 1/9", group="g001")
    ledger.start("step1", "FrDF", "build", group="g002")
    result = CliRunner().invoke(app, ["status", "--workdir", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "step1@FrDF" in line)
    # groups, done, running, failed, waiting, the failed group's name
    assert [c.strip() for c in row.split("│")[1:-1]] == [
        "step1@FrDF",
        "4",
        "1",
        "1",
        "1",
        "1",
        "g001",
    ]


def _cells(output: str) -> str:
    """The table's text with borders and whitespace removed (cells wrap across lines)."""
    return "".join(ch for ch in output if not ch.isspace() and ch not in "│┃┏┓┗┛┡┩└┘━─┳┻╇╈┼┬┴")


def test_seed_refuses_a_registry_survey(tmp_path: Path) -> None:
    # A registry survey reads visits that exist; seeding would invent others.
    spec = tmp_path / "spec.yaml"
    text = DEMO.read_text()
    survey = next(line for line in text.splitlines() if line.startswith("survey:"))
    spec.write_text(text.replace(survey, f"survey: {{butler: {tmp_path / 'hub'}}}"))
    result = CliRunner().invoke(
        app, ["seed", str(spec), "--repo", str(tmp_path / "hub")], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 2, result.output
    assert "nothing to seed" in result.output and "preset or a visits CSV" in result.output
    assert not (tmp_path / "hub").exists()
