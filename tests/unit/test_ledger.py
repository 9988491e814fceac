"""The campaign ledger: stage records, names, and one holder per site-step."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest

from drp_campaign.ledger import Ledger, SiteStepBusy, StageState


def test_stages_record_state_figures_and_attempts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.get("step1", "USDF", "build") is None
    before = ledger.start("step1", "USDF", "build")
    assert before.state == "NEW" and before.attempts == 0
    assert ledger.get("step1", "USDF", "build").state == StageState.RUNNING  # type: ignore[union-attr]
    ledger.fail("step1", "USDF", "build", "boom")
    again = ledger.start("step1", "USDF", "build")
    assert again.state == StageState.FAILED and again.error == "boom"
    ledger.finish("step1", "USDF", "build", {"n_quanta": 12})
    record = ledger.get("step1", "USDF", "build")
    assert record is not None and record.done and record.attempts == 2
    assert record.figures == {"n_quanta": 12} and record.error is None
    assert record.seconds is not None and record.seconds >= 0
    ledger.start("step1", "USDF", "stage")
    ledger.finish("step1", "USDF", "stage", skipped=True)
    assert ledger.is_done("step1", "USDF", "stage")
    # A second Ledger on the same file (another process after a crash) sees the same rows.
    other = Ledger(tmp_path / "ledger.sqlite")
    assert [(r.stage, r.state) for r in other.records("step1", "USDF")] == [
        ("build", StageState.DONE),
        ("stage", StageState.SKIPPED),
    ]
    assert other.reset("step1", "USDF", ["build"]) == 1
    assert not other.is_done("step1", "USDF", "build")


def test_names_are_kept_and_overwritten(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.name("step3", "FrDF", "run_id") is None
    ledger.set_name("step3", "FrDF", "run_id", "101")
    ledger.set_name("step3", "FrDF", "run_id", "102")  # a restart's new id wins
    ledger.set_name("step3", "FrDF", "rule", "abc")
    assert ledger.names("step3", "FrDF") == {"rule": "abc", "run_id": "102"}
    assert ledger.names() == {"step3/FrDF/rule": "abc", "step3/FrDF/run_id": "102"}
    # A fresh attempt forgets the old submission's names, and only that site-step's.
    ledger.set_name("step3", "UKDF", "run_id", "201")
    assert ledger.delete_names("step3", "FrDF", ["run_id"]) == 1
    assert ledger.names("step3", "FrDF") == {"rule": "abc"}
    assert ledger.delete_names("step3", "FrDF") == 1
    assert ledger.names() == {"step3/UKDF/run_id": "201"}


def _hold(path: str, ready: mp.synchronize.Event, release: mp.synchronize.Event) -> None:
    with Ledger(path).claim("step3", "FrDF"):
        ready.set()
        release.wait(60)


def test_a_live_holder_blocks_a_second_run(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sqlite")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(
            SiteStepBusy, match=f"step3 at FrDF is already being run by process {holder.pid}"
        ):
            with Ledger(path).claim("step3", "FrDF"):
                pass
        # Another site-step is free.
        with Ledger(path).claim("step3", "UKDF"):
            pass
    finally:
        release.set()
        holder.join(60)
    with Ledger(path).claim("step3", "FrDF"):  # released on exit
        pass


def test_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sqlite")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(path, ready, release))
    holder.start()
    assert ready.wait(60)
    assert holder.pid is not None
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the lease row stays
    holder.join(60)
    with Ledger(path).claim("step3", "FrDF"):
        pass


def test_another_thread_of_the_same_process_is_busy(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    errors: list[BaseException] = []
    with ledger.claim("step1", "USDF"):

        def second() -> None:
            try:
                with ledger.claim("step1", "USDF"):
                    pass
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], SiteStepBusy)


def test_groups_have_their_own_rows_and_names(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start("step1", "FrDF", "build", group="g000")
    ledger.finish("step1", "FrDF", "build", {"n_quanta": 3}, group="g000")
    ledger.start("step1", "FrDF", "build", group="g001")
    ledger.set_name("step1", "FrDF", "run_id", "r1", group="g001")
    assert ledger.is_done("step1", "FrDF", "build", group="g000")
    assert not ledger.is_done("step1", "FrDF", "build", group="g001")
    assert ledger.get("step1", "FrDF", "build") is None  # the site-step's own row: none
    assert ledger.groups("step1", "FrDF") == ["g000", "g001"]
    assert [r.group for r in ledger.records("step1", "FrDF")] == ["g000", "g001"]
    assert ledger.names() == {"step1/FrDF/g001/run_id": "r1"}
    assert ledger.reset("step1", "FrDF", group="g001") == 1
    assert [r.group for r in ledger.records("step1", "FrDF")] == ["g000"]


def test_a_ledger_from_before_groups_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as c:
        c.executescript(
            "CREATE TABLE stages (step TEXT NOT NULL, site TEXT NOT NULL, stage TEXT NOT NULL,"
            " state TEXT NOT NULL, started REAL, finished REAL, figures TEXT NOT NULL DEFAULT"
            " '{}', error TEXT, attempts INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL,"
            " PRIMARY KEY (step, site, stage));"
            "CREATE TABLE names (step TEXT NOT NULL, site TEXT NOT NULL, key TEXT NOT NULL,"
            " value TEXT NOT NULL, PRIMARY KEY (step, site, key));"
            "INSERT INTO stages VALUES ('*', '*', 'plan', 'DONE', 1, 2, '{}', NULL, 1, 1);"
            "INSERT INTO names VALUES ('step1', 'FrDF', 'run_id', 'r0');"
        )
    ledger = Ledger(path)
    assert ledger.is_done("*", "*", "plan")
    assert ledger.name("step1", "FrDF", "run_id") == "r0"
    ledger.set_name("step1", "FrDF", "run_id", "r1", group="g000")  # the new key works
    assert ledger.name("step1", "FrDF", "run_id") == "r0"
