"""A data facility lost for good: re-plan without it and finish the campaign at the others.

(a) UKDF's storage goes away during step3 and stays away. ``drp-campaign replan --without
UKDF`` gives its patches and visits to the others; the campaign then finishes at USDF and FrDF,
its products equal a single-site run's (none missing, none duplicated), and nothing UKDF
published before the loss is made again.
(b) The replans the command refuses (exit 2, naming the problem and the fix): without the hub,
without every site, without a site the spec does not have, twice without the same site, and
while a step is running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from drp_campaign.backends.butler import open_repo
from drp_campaign.backends.factory import make_campaign_run
from drp_campaign.campaign import campaign_output
from drp_campaign.model.spec import load_spec
from drp_campaign.planner import dask_client, run_plan
from drp_campaign.report.milestone import write_milestone
from drp_campaign.seed import seed_embedded
from drp_campaign.verify import reference_and_compare

from .reports import check_report
from .test_campaign_faults import _spec_file

CLI = [sys.executable, "-m", "drp_campaign.cli"]


def _replan(spec: Path, workdir: Path, *without: str) -> subprocess.CompletedProcess[str]:
    args = [a for site in without for a in ("--without", site)]
    return subprocess.run(
        [*CLI, "replan", str(spec), "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _hub_products(repo: Path, collection: str) -> pd.DataFrame:
    """Every dataset of the hub's output chain: type, data ID and RUN."""
    rows = []
    with open_repo(repo, writeable=False) as butler:
        for dt in butler.registry.queryDatasetTypes():
            for ref in butler.query_datasets(dt, collections=collection, explain=False, limit=None):
                rows.append({"type": dt.name, "data_id": str(ref.dataId.required), "run": ref.run})
    return pd.DataFrame(rows, columns=["type", "data_id", "run"])


@pytest.mark.slow
def test_a_site_lost_during_step3_is_replanned_and_the_campaign_equals_single_site(
    tmp_path: Path,
) -> None:
    spec_path = _spec_file(tmp_path, visits=4)
    spec = load_spec(spec_path)
    workdir = tmp_path / "work"
    seed_embedded(spec, workdir)
    with dask_client(workers=2) as client:
        run = make_campaign_run(spec, workdir, client)
        run.run_all(["step1", "step2", "step2c"])
        output = campaign_output(spec.campaign)
        before = _hub_products(run.repo(run.hub), output)
        from_ukdf = before.loc[before["run"].str.contains("/UKDF/")]
        assert len(from_ukdf), "UKDF published nothing before it was lost"
        # UKDF's storage goes away during step3, for good.
        repo = run.repo("UKDF")
        repo.rename(repo.with_name("UKDF.lost"))
        with pytest.raises(RuntimeError, match="step3 failed at UKDF"):
            run.run_step("step3")

        done = _replan(spec_path, workdir, "UKDF")
        assert done.returncode == 0, done.stderr
        info = json.loads((workdir / "plan-r1" / "revision.json").read_text())
        assert info["without"] == ["UKDF"] and info["lost"] == ["UKDF"]
        # Only UKDF's patches and visits moved, and its published groups are kept.
        first = pd.read_parquet(workdir / "plan" / "patches.parquet")
        second = pd.read_parquet(workdir / "plan-r1" / "patches.parquet")
        both = first.merge(second, on=["tract", "patch"], suffixes=("_0", "_1"))
        assert len(both) == len(first) == len(second)
        changed = both.loc[both["site_0"] != both["site_1"]]
        assert len(changed) and set(changed["site_0"]) == {"UKDF"}
        assert "UKDF" not in set(second["site"])
        visits0 = pd.read_parquet(workdir / "plan" / "visits.parquet").set_index("visit")
        visits1 = pd.read_parquet(workdir / "plan-r1" / "visits.parquet").set_index("visit")
        rehomed = visits0.index[visits0["site"] != visits1["site"]]
        assert set(visits0.loc[rehomed, "site"]) == {"UKDF"}
        assert len(rehomed) == int((visits0["site"] == "UKDF").sum())
        assert any(k.startswith("step1@UKDF") for k in info["kept"])
        assert set(info["redone_groups"]) == {
            f"step3@{t['to']}" for t in info["moved"]["tracts"].values()
        } | {f"step4@{site}" for site in set(visits1.loc[rehomed, "site"])}
        # The same site twice: refused, nothing written.
        again = _replan(spec_path, workdir, "UKDF")
        assert again.returncode == 2 and "re-planned away already" in again.stderr
        assert not (workdir / "plan-r2").exists()

        # The campaign resumes on the new plan (the plain driver, as a rerun would).
        assert run.spec.site_names == ["USDF", "FrDF"] and run.lost == ("UKDF",)
        assert run.sites_of("step3") == ["USDF", "FrDF"]
        run.run_all()
        verification = reference_and_compare(run)
        report = write_milestone(run, verification, workdir / "report")

    assert verification.equal, verification.summary()
    checked = check_report(workdir, None, report.markdown)
    # Exactly one dataset per data ID in the hub's output, and UKDF's are the ones it made.
    after = _hub_products(run.repo(run.hub), output)
    assert not after.duplicated(["type", "data_id"]).any()
    merged = from_ukdf.merge(after, on=["type", "data_id"], suffixes=("_before", "_after"))
    assert len(merged) == len(from_ukdf)
    assert (merged["run_before"] == merged["run_after"]).all()
    # The redone work ran in runs named for the revision, at the remaining sites.
    redone = after.loc[after["run"].str.contains("/r1g")]
    assert len(redone) and not redone["run"].str.contains("/UKDF/").any()
    assert set(redone["run"].str.split("/").str[1]) == {"step3", "step4"}
    (revision,) = checked["revisions"]
    assert revision["measured"]["done"] == revision["measured"]["groups"] > 0
    assert "## Plan revision 1: without UKDF" in report.markdown
    assert (workdir / "report" / "replan-r1.png").exists()


def test_replans_that_cannot_be_made_exit_2_naming_the_fix(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path, visits=3)
    spec = load_spec(spec_path)
    workdir = tmp_path / "work"
    nothing = _replan(spec_path, workdir, "UKDF")
    assert nothing.returncode == 2 and "no plan to revise" in nothing.stderr
    run_plan(spec, workdir / "plan", plots=False)

    cases = {
        ("USDF",): "USDF is the hub",
        ("USDF", "FrDF", "UKDF"): "no site would be left",
        ("SLAC",): "has no site SLAC",
    }
    for without, message in cases.items():
        result = _replan(spec_path, workdir, *without)
        assert result.returncode == 2, (without, result.stdout, result.stderr)
        assert message in result.stderr, (without, result.stderr)

    # A step is running at a site (another process holds its lease): refused, naming it.
    code = (
        "import sys, time; from drp_campaign.ledger import Ledger\n"
        f"with Ledger({str(workdir / 'ledger.sqlite')!r}).claim('step3', 'FrDF'):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        busy = _replan(spec_path, workdir, "UKDF")
        assert busy.returncode == 2
        assert f"step3 at FrDF (process {holder.pid}" in busy.stderr
        assert "Wait for it to finish, or stop it" in busy.stderr
    finally:
        holder.kill()
        holder.wait()
    assert not (workdir / "plan-r1").exists()
    # Once it is gone, the re-plan goes through, and a second one without the same site not.
    assert _replan(spec_path, workdir, "UKDF").returncode == 0
    second = _replan(spec_path, workdir, "UKDF")
    assert second.returncode == 2 and "re-planned away already" in second.stderr
