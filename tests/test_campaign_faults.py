"""A whole multi-site campaign on real repos, graphs, executions and transfers, under faults.

(a) The campaign process is SIGKILLed at several points and rerun; the final outputs equal a
single-site run's, with no duplicate run, rule, submission or dataset.
(b) A site becomes unavailable during a step: the other sites finish, the failure names the
site and its cause, and rerunning that step at that site alone completes the campaign.
(c) Two concurrent runs of one site-step: one proceeds, the other stops with a clear message.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drp_campaign.backends.butler import has_collection, open_repo
from drp_campaign.backends.factory import make_campaign_run
from drp_campaign.backends.local.catalog import EmbeddedCatalog
from drp_campaign.campaign import CampaignRun, SiteStepFailed, campaign_output
from drp_campaign.ledger import CAMPAIGN, Ledger, SiteStepBusy
from drp_campaign.model.spec import load_spec
from drp_campaign.planner import dask_client
from drp_campaign.report.milestone import write_milestone
from drp_campaign.seed import seed_embedded
from drp_campaign.verify import reference_and_compare

from .reports import check_report, finished

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deployments" / "campaigns" / "dc2-test-med-1-demo.yaml"


def _spec_file(tmp: Path, visits: int = 6) -> Path:
    text = DEMO.read_text().replace("visits: 8}", f"visits: {visits}}}")
    text = text.replace("yaml: pipelines/", f"yaml: {ROOT}/pipelines/")
    path = tmp / "spec.yaml"
    path.write_text(text)
    return path


class StopBeforeSubmit(Exception):
    pass


def until_submit(phase: str, label: str, fn: Callable[[], Any]) -> Any:
    """A phase runner (as the flow passes one) that stops every group before it submits."""
    if phase == "run":
        raise StopBeforeSubmit
    return fn()


def _site_step_done(run: CampaignRun, step: str, site: str) -> bool:
    return all(
        run.ledger.is_done(step, site, "arrive", group=u.name) for u in run.units(step, site)
    )


def _ledger_state(workdir: Path, step: str, stage: str) -> set[str]:
    """States of a stage over every site (read-only, tolerant of a ledger not yet created)."""
    path = workdir / "ledger.sqlite"
    if not path.exists():
        return set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as c:
        try:
            rows = c.execute(
                "SELECT state FROM stages WHERE step=? AND stage=?", (step, stage)
            ).fetchall()
        except sqlite3.OperationalError:
            return set()
    return {r[0] for r in rows}


def _groups_built_while_others_run(workdir: Path, step: str) -> bool:
    """Whether, at some site, a group is executing while another has a graph, not submitted."""
    path = workdir / "ledger.sqlite"
    if not path.exists():
        return False
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as c:
        try:
            rows = c.execute(
                "SELECT site, grp, stage, state FROM stages WHERE step=?", (step,)
            ).fetchall()
        except sqlite3.OperationalError:
            return False
    by_group: dict[tuple[str, str], dict[str, str]] = {}
    for site, group, stage, state in rows:
        by_group.setdefault((site, group), {})[stage] = state
    for site in {site for site, _ in by_group}:
        mine = [g for (s, _), g in by_group.items() if s == site]
        running = any(g.get("submit") == "RUNNING" for g in mine)
        waiting = any(g.get("build") in ("RUNNING", "DONE") and "submit" not in g for g in mine)
        if running and waiting:
            return True
    return False


def _run_until(spec: Path, workdir: Path, condition: Callable[[], bool] | None) -> int:
    """Run the plain driver; SIGKILL its whole process group once ``condition`` holds."""
    cmd = [
        sys.executable, "-m", "drp_campaign.cli", "run", str(spec), "--workdir", str(workdir),
        "--no-prefect", "--no-verify",
    ]  # fmt: skip
    log = (workdir.parent / "driver.log").open("a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None:
        if condition is not None and condition():
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Dask workers, no cleanup
            proc.wait()
            return -9
        assert time.monotonic() < deadline, "the campaign did not reach the kill point"
        time.sleep(0.05)
    return proc.returncode


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_equals_single_site(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    workdir = tmp_path / "work"
    seed_embedded(load_spec(spec_path), workdir)  # the observatory's part, never killed

    def when(step: str, stage: str, states: set[str]) -> Callable[[], bool]:
        return lambda: bool(_ledger_state(workdir, step, stage) & states)

    kill_points = [
        when(CAMPAIGN, "distribute", {"RUNNING"}),  # transfers in flight
        when("step1", "submit", {"RUNNING"}),  # quanta executing
        when("step1", "arrive", {"RUNNING", "DONE"}),  # products moving to the hub
        when("step3", "stage", {"RUNNING"}),  # overlap PVIs staging
        # Some groups of a site executing while its next groups' graphs are built.
        lambda: _groups_built_while_others_run(workdir, "step3"),
        when("step3", "submit", {"DONE"}),  # between a step's stages
        when("step4", "publish", {"RUNNING", "DONE"}),
    ]
    killed = 0
    for point in kill_points:
        rc = _run_until(spec_path, workdir, point)
        if rc == -9:
            killed += 1
        else:
            assert finished(workdir, rc), (workdir.parent / "driver.log").read_text()[-3000:]
    assert killed >= 5, f"only {killed} kill points were reached before the campaign ended"
    rc = _run_until(spec_path, workdir, None)
    assert finished(workdir, rc), (workdir.parent / "driver.log").read_text()[-3000:]

    spec = load_spec(spec_path)
    ledger = Ledger(workdir / "ledger.sqlite")
    # Every stage done once in the end; some needed more than one attempt.
    assert all(r.done for r in ledger.records()), [r for r in ledger.records() if not r.done]
    assert any(r.attempts > 1 for r in ledger.records())
    # One submission per group: the local executor's run id is deterministic and recorded
    # once; its state files are one per group, and every group of the plan ran once.
    states = sorted((workdir / "workload").glob("*/*.json"))
    assert (
        len(states)
        == len({p.stem for p in states})
        == sum(1 for r in ledger.records() if r.stage == "submit" and r.state == "DONE")
    )
    submitted = [r for r in ledger.records() if r.stage == "submit" and r.state == "DONE"]
    assert len({(r.step, r.site, r.group) for r in submitted}) == len(submitted)
    assert any(len(ledger.groups("step3", s)) > 1 for s in spec.site_names)
    # No duplicate rule: one per (DID, destination).
    catalog = EmbeddedCatalog(workdir / "catalog")
    rules = catalog.list_rules()
    assert len(rules) == len({(r.did, r.rse_expression) for r in rules})
    assert all(r.state.value == "OK" for r in rules)
    with dask_client(workers=2) as client:
        run = make_campaign_run(spec, workdir, client)
        _assert_no_duplicate_runs(run)
        verification = reference_and_compare(run)
        report = write_milestone(run, verification, workdir / "report")
    assert verification.equal, verification.summary()
    assert verification.duplicated == [] and verification.missing == []
    check_report(workdir, None, report.markdown)


def _assert_no_duplicate_runs(run: CampaignRun) -> None:
    from drp_campaign.backends.butler import open_repo

    with open_repo(run.repo(run.hub), writeable=False) as butler:
        chain = list(butler.collections.get_info(campaign_output(run.spec.campaign)).children)
        runs = list(butler.collections.query(f"{run.spec.campaign}/*/*/g*"))
    assert len(chain) == len(set(chain))
    # Exactly one RUN per group that had work: no "-attempt" runs, no strays.
    expected = {
        f"{run.spec.campaign}/{r.step}/{r.site}/{r.group}"
        for r in run.ledger.records()
        if r.stage == "publish" and int(r.figures.get("files", 0)) > 0
    }
    assert set(runs) == expected and all(
        r.figures["run"] in expected
        for r in run.ledger.records()
        if r.stage == "publish" and int(r.figures.get("files", 0)) > 0
    )


@pytest.mark.slow
def test_site_outage_then_rerun_of_that_site_completes(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path))
    workdir = tmp_path / "work"
    seed_embedded(spec, workdir)
    with dask_client(workers=2) as client:
        run = make_campaign_run(spec, workdir, client)
        run.run_all(["step1", "step2", "step2c"])
        # UKDF's storage goes away during step3 (its repository is unreachable).
        repo = run.repo("UKDF")
        hidden = repo.with_name("UKDF.unavailable")
        repo.rename(hidden)
        try:
            with pytest.raises(RuntimeError) as info:
                run.run_step("step3")
        finally:
            hidden.rename(repo)
        message = str(info.value)
        assert "step3 failed at UKDF" in message and "UKDF" in message
        assert "FrDF" not in message.split("failed at")[1].split("\n")[0]
        # The other sites finished step3 completely.
        for site in ("USDF", "FrDF"):
            assert _site_step_done(run, "step3", site)
        assert not _site_step_done(run, "step3", "UKDF")
        failed = [r for r in run.ledger.records("step3", "UKDF") if r.state == "FAILED"]
        assert failed and failed[0].error
        # The operator reruns step3 at UKDF alone, then the rest of the campaign.
        run.run_step("step3", ["UKDF"])
        run.run_step("step4")
        verification = reference_and_compare(run)
    assert verification.equal, verification.summary()


@pytest.mark.slow
def test_concurrent_runs_of_one_site_step_never_submit_twice(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path, visits=3)
    spec = load_spec(spec_path)
    workdir = tmp_path / "work"
    seed_embedded(spec, workdir)
    with dask_client(workers=2) as client:
        run = make_campaign_run(spec, workdir, client)
        run.run_all([])  # plan, set up the sites, distribute the inputs
        # A second process holds step1 at the hub (it is mid-run).
        code = (
            "import sys, time; from drp_campaign.ledger import Ledger\n"
            f"with Ledger({str(workdir / 'ledger.sqlite')!r}).claim('step1', 'USDF'):\n"
            "    print('held', flush=True); time.sleep(120)\n"
        )
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            with pytest.raises(
                SiteStepBusy, match=f"step1 at USDF is already being run by process {holder.pid}"
            ):
                run.run_site_step("step1", "USDF")
            assert run.ledger.records("step1", "USDF") == []  # nothing started, nothing submitted
        finally:
            holder.kill()
            holder.wait()
        result = run.run_site_step("step1", "USDF")  # the holder died: the lease is taken over
        assert result.n_quanta > 0
        assert run.ledger.name("step1", "USDF", "run_id", group="g000") is not None

        # An operator's fresh rerun of a site-step built but not yet run (e.g. after changing
        # its inputs): a new attempt, with its own output run, graph and BPS directory.
        with pytest.raises(SiteStepFailed, match="StopBeforeSubmit"):
            run.run_site_step("step1", "FrDF", runner=until_submit)
        (unit,) = run.units("step1", "FrDF")
        first_graph = run.repo("FrDF") / unit.graph_path
        assert first_graph.exists() and unit.attempt == 0
        assert run.forget_site_step("step1", "FrDF") == {"g000": 1}
        assert run.ledger.records("step1", "FrDF") == []
        result = run.run_site_step("step1", "FrDF")
        assert result.n_quanta > 0 and result.published_files > 0
        fresh = f"{spec.campaign}/step1/FrDF/g000-attempt1"
        (unit,) = run.units("step1", "FrDF")
        assert unit.output_run == fresh
        publish = run.ledger.get("step1", "FrDF", "publish", group="g000")
        assert publish is not None and publish.figures["run"] == fresh
        assert unit.graph_path.endswith("/g000-attempt1.qg") and first_graph.exists()
        with open_repo(run.repo("FrDF"), writeable=False) as butler:
            assert butler.query_datasets("pvi", collections=fresh, explain=False)
            # The first attempt never ran: its RUN was never even created.
            assert not has_collection(butler, f"{spec.campaign}/step1/FrDF/g000")
        # Once published, a fresh attempt would publish the products twice: refused.
        with pytest.raises(ValueError, match="published already"):
            run.forget_site_step("step1", "FrDF")


def test_a_failing_stage_names_step_site_and_cause(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, visits=3))
    with dask_client(workers=1) as client:
        run = make_campaign_run(spec, tmp_path / "work", client)
        run.plan()
        # No setup: the site's repository does not exist yet. step1 reads only campaign inputs
        # (nothing to stage), so the first stage that opens the site's repository fails.
        with pytest.raises(SiteStepFailed, match="step1 at FrDF failed in stage 'bps'") as info:
            run.run_site_step("step1", "FrDF")
    assert "step1@FrDF#000 failed in stage 'bps'" in str(info.value)
    assert "-p step=step1 -p site=FrDF -p group=g000" in str(info.value)
    assert run.ledger.is_done("step1", "FrDF", "stage", group="g000")
    record = run.ledger.get("step1", "FrDF", "bps", group="g000")
    assert record is not None and record.state == "FAILED" and record.error


@pytest.mark.slow
def test_one_failing_group_names_its_quanta_and_rerun_and_the_others_finish(
    tmp_path: Path,
) -> None:
    spec_path = _spec_file(tmp_path, visits=8)
    # The pipeline is the spec's own copy, so that one visit's calibrateImage can be made to
    # fail (the mock task's fail_condition) once the plan says which group holds it.
    pipeline = tmp_path / "DRP-mock.yaml"
    pipeline.write_text((ROOT / "pipelines" / "DRP-mock.yaml").read_text())
    spec_path.write_text(
        spec_path.read_text().replace(f"yaml: {ROOT}/pipelines/DRP-mock.yaml", f"yaml: {pipeline}")
    )
    spec = load_spec(spec_path)
    workdir = tmp_path / "work"
    seed_embedded(spec, workdir)
    with dask_client(workers=2) as client:
        run = make_campaign_run(spec, workdir, client)
        run.run_all([])
        site = next(s for s in spec.site_names if len(run.groups("step1", s)) > 1)
        groups = run.groups("step1", site)
        assert groups[1].visits is not None
        bad_visit = groups[1].visits[0]
        text = pipeline.read_text().replace(
            '        config.outputs["exposure"] = C(dataset_type_name="pvi"',
            f'        config.fail_condition = "visit = {bad_visit}"\n'
            '        config.outputs["exposure"] = C(dataset_type_name="pvi"',
        )
        assert "fail_condition" in text
        pipeline.write_text(text)
        with pytest.raises(SiteStepFailed) as info:
            run.run_site_step("step1", site)
    failure = info.value
    message = str(failure)
    assert failure.groups == [groups[1].name], message
    assert f"step1@{site}#001 failed in stage 'submit'" in message
    assert "calibrateImage" in message and f"visit={bad_visit}" in message
    assert f"-p site={site} -p group=g001" in message
    # The other groups finished: published and at the hub.
    for group in groups:
        done = run.ledger.is_done("step1", site, "arrive", group=group.name)
        assert done == (group.index != 1), group.label
    failed = run.ledger.get("step1", site, "submit", group="g001")
    assert failed is not None and failed.state == "FAILED"
    assert run.ledger.get("step1", site, "publish", group="g001") is None
