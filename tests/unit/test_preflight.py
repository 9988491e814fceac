"""The pure parts of preflight: bytes a site must have room for, the token margin, the verdict."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from drp_campaign.model.preflight import (
    Check,
    PreflightReport,
    Status,
    bytes_into_sites,
    human_bytes,
    token_check,
)


def test_bytes_into_sites_counts_raws_away_from_the_hub_and_incoming_pvis() -> None:
    needed = bytes_into_sites(
        ["USDF", "FrDF", "UKDF"],
        "USDF",
        4_000,
        {"USDF": 5, "FrDF": 3, "UKDF": 2},
        {"USDF->FrDF": 100, "FrDF->USDF": 7, "UKDF->FrDF": 10, "FrDF->NOWHERE": 99},
    )
    # The hub holds its raws already; a link counts at its destination only.
    assert needed == {"USDF": 7, "FrDF": 3 * 4_000 + 110, "UKDF": 2 * 4_000}


def test_token_margin() -> None:
    now = datetime(2026, 12, 5, 12, tzinfo=UTC)
    margin = timedelta(hours=12)
    ok = token_check("USDF", now + timedelta(hours=13), now, margin, "renew it")
    short = token_check("USDF", now + timedelta(hours=11), now, margin, "renew it")
    unknown = token_check("USDF", None, now, margin, "renew it")
    assert (ok.status, ok.fix) == (Status.PASS, "")
    assert (short.status, short.fix) == (Status.FAIL, "renew it")
    assert "11.0 h left" in short.value
    assert unknown.status is Status.SKIP


def test_report_fails_on_any_fail_row_but_not_on_skips() -> None:
    rows = (
        Check("USDF", "butler", Status.PASS, "opened"),
        Check("FrDF", "skymap", Status.SKIP, "the repository did not open"),
    )
    assert PreflightReport(rows).passed
    bad = PreflightReport((*rows, Check("FrDF", "butler", Status.FAIL, "gone", "create it")))
    assert not bad.passed and [c.site for c in bad.failed] == ["FrDF"]
    assert bad.summary() == "1 PASS, 1 FAIL, 1 SKIP; failed: FrDF/butler"
    assert bad.rows()[2] == {
        "site": "FrDF",
        "check": "butler",
        "status": "FAIL",
        "value": "gone",
        "fix": "create it",
    }


def test_human_bytes() -> None:
    assert human_bytes(999) == "999 B"
    assert human_bytes(14_500_000_000) == "14.5 GB"
