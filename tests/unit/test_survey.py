"""Tests of drp_campaign.model.survey."""

from __future__ import annotations

import math
import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from drp_campaign.model.survey import (
    BANDS,
    COLUMNS,
    PRESETS,
    VisitsCsvError,
    check_visits_csv_header,
    make_survey,
    read_visits_csv,
    survey_from_spec,
    write_visits_csv,
)

HEADER = "visit,band,ra,dec,rotation\n"


def _check_table(df: pd.DataFrame) -> None:
    assert tuple(df.columns) == COLUMNS
    assert df["visit"].dtype == np.int64
    assert pd.api.types.is_string_dtype(df["band"])
    for col in ("ra", "dec", "rotation"):
        assert df[col].dtype == np.float64
    assert df["visit"].is_unique and df["visit"].is_monotonic_increasing
    assert isinstance(df.index, pd.RangeIndex) and df.index.start == 0
    assert set(df["band"]) <= set(BANDS)
    assert df["ra"].between(0, 360, inclusive="left").all()
    assert df["dec"].between(-90, 90).all()


def _sep_deg(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    a, d = np.radians(ra), np.radians(dec)
    a0, d0 = math.radians(ra0), math.radians(dec0)
    c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


# ---------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize(("preset", "count"), [("dc2-test-med-1", 300), ("dp0.2", 20_000)])
def test_preset_default_counts_and_determinism(preset: str, count: int) -> None:
    a = make_survey(preset)
    _check_table(a)
    assert len(a) == count
    pd.testing.assert_frame_equal(a, make_survey(preset, seed=1))
    b = make_survey(preset, seed=2)
    assert not a.equals(b)
    assert len(make_survey(preset, visits=123)) == 123


def test_dc2_test_med_1_region_and_ids() -> None:
    df = make_survey("dc2-test-med-1")
    sep = _sep_deg(df["ra"].to_numpy(), df["dec"].to_numpy(), 57.56, -36.45)
    assert sep.max() <= 1.2 + 1e-9
    assert sep.max() > 1.0  # actually fills the cap
    assert df["rotation"].between(0, 360, inclusive="left").all()
    assert 159_000 < df["visit"].iloc[0] < 159_100
    assert df["visit"].between(100_000, 999_999).all()
    assert set(df["band"]) == set(BANDS)


def test_dp02_box() -> None:
    df = make_survey("dp0.2")
    assert df["ra"].between(50.0, 75.0).all()
    assert df["dec"].between(-45.0, -27.0).all()
    assert df["visit"].iloc[0] > 200_000 and df["visit"].between(100_000, 999_999).all()
    # Uniform on the sphere: the median of sin(dec) is mid-way between the limits.
    s = np.sin(np.radians(df["dec"]))
    mid = 0.5 * (math.sin(math.radians(-45)) + math.sin(math.radians(-27)))
    assert abs(np.median(s) - mid) < 0.01


def test_dr1_full() -> None:
    start = time.perf_counter()
    df = make_survey("dr1")
    assert time.perf_counter() - start < 1.0
    _check_table(df)
    assert len(df) == 240_000
    assert df["dec"].between(-70.0, 5.0).all()
    assert df["rotation"].between(0, 360, inclusive="left").all()
    day_obs = df["visit"] // 100_000
    seq = df["visit"] % 100_000
    assert day_obs.iloc[0] == 20251201 and seq.iloc[0] == 1
    dates = pd.to_datetime(day_obs.astype(str), format="%Y%m%d")  # every day_obs is a real date
    assert (dates.diff().dropna() <= pd.Timedelta(days=1)).all()
    per_night = df.groupby(day_obs).size()
    assert per_night.iloc[:-1].between(800, 1200).all()
    assert per_night.mean() == pytest.approx(1000, rel=0.05)
    # seq_num runs 1..n within each night.
    assert (df.groupby(day_obs)["visit"].transform("size") >= seq).all()
    weights = df["band"].value_counts(normalize=True)
    expected = {"u": 0.07, "g": 0.10, "r": 0.22, "i": 0.22, "z": 0.20, "y": 0.19}
    for band, w in expected.items():
        assert weights[band] == pytest.approx(w, abs=0.005)


def test_dr1_subsample_is_subset() -> None:
    full = make_survey("dr1")
    sub = make_survey("dr1", visits=1000)
    _check_table(sub)
    assert len(sub) == 1000
    merged = sub.merge(full, on=list(COLUMNS), how="left", indicator=True)
    assert (merged["_merge"] == "both").all()
    pd.testing.assert_frame_equal(sub, make_survey("dr1", visits=1000))
    assert not sub.equals(make_survey("dr1", seed=2, visits=1000))


def test_preset_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"^unknown survey preset 'dc3'; valid presets: dc2-test-med-1, dp0\.2, dr1$",
    ):
        make_survey("dc3")
    with pytest.raises(ValueError, match="exceeds the 240000 visits"):
        make_survey("dr1", visits=240_001)
    with pytest.raises(ValueError, match="visits must be a positive integer, got 0"):
        make_survey("dp0.2", visits=0)
    assert PRESETS == ("dc2-test-med-1", "dp0.2", "dr1")


# -------------------------------------------------------------------------------------------- CSV
def test_csv_round_trip(tmp_path: Path) -> None:
    df = make_survey("dc2-test-med-1", visits=50, seed=7)
    path = tmp_path / "visits.csv"
    write_visits_csv(df, path)
    assert path.read_text().startswith(HEADER)
    pd.testing.assert_frame_equal(read_visits_csv(path), df)


def test_csv_sorts_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "v.csv"
    path.write_text(HEADER + "5,r,10.0,-3.5,0\n\n 2 , g ,359.5,90,-20\n")
    df = read_visits_csv(path)
    _check_table(df)
    assert df["visit"].tolist() == [2, 5]
    assert df["band"].tolist() == ["g", "r"]
    assert df["rotation"].tolist() == [-20.0, 0.0]


HEADER_FIX = (
    "fix: make the first line exactly 'visit,band,ra,dec,rotation' (ra, dec and rotation in "
    "degrees)"
)

# id: (file body, line, column, message after "{path}: ")
CSV_ERRORS: dict[str, tuple[str, int | None, str | None, str]] = {
    "empty-file": (
        "",
        1,
        None,
        f"line 1: the file is empty; {HEADER_FIX}, then add one line per visit",
    ),
    "blank-lines-only": (
        "\n\n",
        1,
        None,
        f"line 1: the file is empty; {HEADER_FIX}, then add one line per visit",
    ),
    "blank-first-line": (
        "\n" + HEADER + "1,r,1,2,3\n",
        1,
        None,
        f"line 1: the first line is blank; {HEADER_FIX}, with no blank line before it",
    ),
    "header-only": (
        HEADER,
        2,
        None,
        "line 2: the file has a header but no visits; fix: add one line per visit after it",
    ),
    "missing-column": (
        "visit,band,ra,dec\n1,r,1,2\n",
        1,
        "rotation",
        f"line 1, column 'rotation': is missing from the header 'visit,band,ra,dec'; {HEADER_FIX}",
    ),
    "extra-column": (
        "visit,band,ra,dec,rotation,mjd\n1,r,1,2,3,60000\n",
        1,
        "mjd",
        "line 1, column 'mjd': is not a visits column (the header is "
        f"'visit,band,ra,dec,rotation,mjd'); fix: remove the column; {HEADER_FIX[5:]}",
    ),
    "repeated-column": (
        "visit,band,ra,dec,dec\n",
        1,
        "dec",
        f"line 1, column 'dec': appears twice in the header 'visit,band,ra,dec,dec'; {HEADER_FIX}",
    ),
    "columns-out-of-order": (
        "visit,band,dec,ra,rotation\n",
        1,
        "ra",
        "line 1, column 'ra': the header 'visit,band,dec,ra,rotation' has the columns in the "
        f"wrong order; {HEADER_FIX}",
    ),
    "too-few-fields": (
        HEADER + "1,r,1,2,3\n2,r,1,2\n",
        3,
        "rotation",
        "line 3, column 'rotation': the line has 4 fields, so no rotation; "
        "fix: give all 5 fields, visit,band,ra,dec,rotation",
    ),
    "too-many-fields": (
        HEADER + "1,r,1,2,3,4\n",
        2,
        None,
        "line 2: the line has 6 fields, more than the 5 columns visit,band,ra,dec,rotation; "
        "fix: remove the extra fields (a ',' inside a value needs quotes)",
    ),
    "visit-not-integer": (
        HEADER + "1.5,r,1,2,3\n",
        2,
        "visit",
        "line 2, column 'visit': '1.5' is not an integer; fix: use integer visit ids",
    ),
    "visit-negative": (
        HEADER + "-4,r,1,2,3\n",
        2,
        "visit",
        "line 2, column 'visit': -4 is outside [0, 2**63); "
        "fix: use the instrument's non-negative visit ids",
    ),
    "duplicate-visit": (
        HEADER + "7,r,1,2,3\n8,g,1,2,3\n\n7,i,1,2,3\n",
        5,
        "visit",
        "line 5, column 'visit': 7 repeats line 2; "
        "fix: give every visit a unique id (remove or renumber one of the two lines)",
    ),
    "unknown-band": (
        HEADER + "1,w,1,2,3\n",
        2,
        "band",
        "line 2, column 'band': 'w' is not one of u, g, r, i, z, y; "
        "fix: use a single lower-case band letter from ugrizy",
    ),
    "upper-case-band": (
        HEADER + "1,R,1,2,3\n",
        2,
        "band",
        "line 2, column 'band': 'R' is not one of u, g, r, i, z, y (did you mean 'r'?); "
        "fix: use a single lower-case band letter from ugrizy",
    ),
    "ra-360": (
        HEADER + "1,r,360,2,3\n",
        2,
        "ra",
        "line 2, column 'ra': 360 is outside [0, 360); fix: wrap ra into [0, 360) degrees",
    ),
    "ra-negative": (
        HEADER + "1,r,-0.5,2,3\n",
        2,
        "ra",
        "line 2, column 'ra': -0.5 is outside [0, 360); fix: wrap ra into [0, 360) degrees",
    ),
    "ra-not-a-number": (
        HEADER + "1,r,abc,2,3\n",
        2,
        "ra",
        "line 2, column 'ra': 'abc' is not a number; fix: write ra as degrees in [0, 360)",
    ),
    "ra-empty": (
        HEADER + "1,r,,2,3\n",
        2,
        "ra",
        "line 2, column 'ra': '' is not a number; fix: write ra as degrees in [0, 360)",
    ),
    "dec-below-90": (
        HEADER + "1,r,1,-90.5,3\n",
        2,
        "dec",
        "line 2, column 'dec': -90.5 is outside [-90, 90]; "
        "fix: give dec in degrees, from -90 to 90",
    ),
    "dec-above-90": (
        HEADER + "1,r,1,91,3\n",
        2,
        "dec",
        "line 2, column 'dec': 91 is outside [-90, 90]; fix: give dec in degrees, from -90 to 90",
    ),
    "dec-not-a-number": (
        HEADER + "1,r,1,south,3\n",
        2,
        "dec",
        "line 2, column 'dec': 'south' is not a number; fix: write dec as degrees in [-90, 90]",
    ),
    "rotation-not-finite": (
        HEADER + "1,r,1,2,nan\n",
        2,
        "rotation",
        "line 2, column 'rotation': 'nan' is not finite; fix: write rotation as degrees",
    ),
}


@pytest.mark.parametrize(("body", "line", "column", "message"), CSV_ERRORS.values(), ids=CSV_ERRORS)
def test_csv_errors(
    tmp_path: Path, body: str, line: int | None, column: str | None, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(VisitsCsvError) as info:
        read_visits_csv(path)
    assert str(info.value) == f"{path}: {message}"
    assert (info.value.path, info.value.line, info.value.column) == (path, line, column)
    # A worker that raises it (Dask, Prefect) sends it back whole.
    again = pickle.loads(pickle.dumps(info.value))
    assert (str(again), again.line, again.column) == (str(info.value), line, column)
    if line == 1:  # the loader's header-only check says the same about the header
        with pytest.raises(VisitsCsvError) as header:
            check_visits_csv_header(path)
        assert str(header.value) == str(info.value)


def test_unreadable_csv(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    fix = "fix: check the path; survey.visits in a spec is relative to the spec file"
    for check in (read_visits_csv, check_visits_csv_header):
        with pytest.raises(VisitsCsvError) as info:
            check(missing)
        assert str(info.value) == f"{missing}: file not found; {fix}"
        with pytest.raises(VisitsCsvError) as info:
            check(tmp_path)
        assert str(info.value) == f"{tmp_path}: is a directory, not a file; {fix}"
    binary = tmp_path / "latin1.csv"
    binary.write_bytes(HEADER.encode() + "1,r,1,2,3\n2,\xe9,1,2,3\n".encode("latin-1"))
    with pytest.raises(VisitsCsvError) as info:
        read_visits_csv(binary)
    assert str(info.value) == (
        f"{binary}: line 3: byte 0xe9 is not UTF-8 text; "
        "fix: save the file as UTF-8 (or plain ASCII) CSV"
    )
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.csv"
        locked.write_text(HEADER + "1,r,1,2,3\n")
        locked.chmod(0)
        with pytest.raises(VisitsCsvError, match="cannot read the file: Permission denied"):
            read_visits_csv(locked)


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    # Spreadsheets save UTF-8 CSV with a BOM; it must not make the header wrong.
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "1,r,1,2,3\n").encode())
    check_visits_csv_header(path)
    assert read_visits_csv(path)["visit"].tolist() == [1]


# ------------------------------------------------------------------------------------ from a spec
def _spec(**survey: object) -> SimpleNamespace:
    fields: dict[str, object] = {"preset": None, "seed": 1, "visits": None, "visits_csv": None}
    fields.update(survey)
    return SimpleNamespace(survey=SimpleNamespace(**fields))


def test_survey_from_spec_preset() -> None:
    df = survey_from_spec(_spec(preset="dc2-test-med-1", seed=3))
    pd.testing.assert_frame_equal(df, make_survey("dc2-test-med-1", seed=3))
    assert len(survey_from_spec(_spec(preset="dr1", visits=500))) == 500
    assert len(survey_from_spec(_spec(preset="dp0.2", visits="42"))) == 42


def test_survey_from_spec_csv(tmp_path: Path) -> None:
    df = make_survey("dc2-test-med-1", visits=10)
    write_visits_csv(df, tmp_path / "visits.csv")
    by_csv = survey_from_spec(_spec(visits_csv=tmp_path / "visits.csv", preset="dr1"))
    pd.testing.assert_frame_equal(by_csv, df)
    # DESIGN form {visits: path/to/visits.csv}, relative to the spec's directory.
    spec = _spec(visits="visits.csv")
    spec.base_dir = tmp_path
    pd.testing.assert_frame_equal(survey_from_spec(spec), df)


def test_survey_from_spec_needs_a_source() -> None:
    with pytest.raises(ValueError, match="neither a preset nor a visits CSV"):
        survey_from_spec(_spec())


def test_survey_from_a_loaded_csv_spec(tmp_path: Path) -> None:
    # The loader keeps survey.visits as written and resolves it into survey.visits_csv: both
    # set is the normal case. The spec must also give the same table after the round trips
    # it makes in a run: pickling to a Dask worker, JSON (Prefect parameters), model_copy.
    from drp_campaign.model.spec import CampaignSpec, load_spec

    df = make_survey("dc2-test-med-1", visits=10)
    (tmp_path / "data").mkdir()
    write_visits_csv(df, tmp_path / "data" / "visits.csv")
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "deployments" / "campaigns" / "dc2-test-med-1.yaml").read_text()
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        text.replace("{preset: dc2-test-med-1, seed: 1}", "{visits: data/visits.csv}", 1)
    )
    spec = load_spec(spec_path)
    assert (spec.survey.visits, spec.survey.visits_csv) == (
        "data/visits.csv",
        tmp_path / "data" / "visits.csv",
    )
    copies = {
        "loaded": spec,
        "pickled": pickle.loads(pickle.dumps(spec)),
        "model_validate": CampaignSpec.model_validate(spec.model_dump()),
        "json": CampaignSpec.model_validate_json(spec.model_dump_json()),
        "model_copy": spec.model_copy(update={"instrument": "LSSTComCam"}),
        # Built in code without the resolved path: resolved against the spec's file.
        "unresolved": CampaignSpec.model_validate(
            spec.model_dump(exclude={"survey": {"visits_csv"}})
        ),
    }
    for name, copy in copies.items():
        pd.testing.assert_frame_equal(survey_from_spec(copy), df, obj=name)
