"""Visit tables: the pointings a campaign processes.

A visit table is a `pandas.DataFrame` with exactly the columns

========  =======  ============================================================
visit     int64    visit id, unique; the table is sorted by it (RangeIndex)
band      str      one of ``u g r i z y``
ra        float64  boresight right ascension, degrees, in [0, 360)
dec       float64  boresight declination, degrees, in [-90, 90]
rotation  float64  sky rotation angle, degrees (see `drp_campaign.model.focalplane`)
========  =======  ============================================================

Tables come from a CSV file (`read_visits_csv`) or from a deterministic synthetic preset
(`make_survey`); `survey_from_spec` picks one from a campaign spec.  This module is pure:
numpy, pandas and the standard library only.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = [
    "BANDS",
    "COLUMNS",
    "DR1_FULL_VISITS",
    "PRESETS",
    "SpecLike",
    "SurveySpecLike",
    "VisitsCsvError",
    "check_visits_csv_header",
    "make_survey",
    "read_visits_csv",
    "survey_from_spec",
    "write_visits_csv",
]

#: Column names of a visit table, in order.
COLUMNS: tuple[str, ...] = ("visit", "band", "ra", "dec", "rotation")
#: Valid bands, in wavelength order.
BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z", "y")
# Share of visits per band, close to the baseline LSST cadence (u 7 %, g 10 %, r 22 %, i 22 %,
# z 20 %, y 19 %).
_BAND_WEIGHTS = np.array([0.07, 0.10, 0.22, 0.22, 0.20, 0.19])
#: Size of the full DR1 visit list that `make_survey("dr1", visits=n)` sub-samples.
DR1_FULL_VISITS = 240_000

# DC2 test-med-1: between the centres of tracts 3828 (56.650, -36.446) and 3829 (58.477, -36.446).
_DC2_TEST_MED_1_CENTER = (57.56, -36.45)
_DC2_TEST_MED_1_RADIUS_DEG = 1.2
# DC2 (DP0.2) footprint as an RA/Dec box, ~360 deg^2 (the real footprint is ~300 deg^2 and not
# a box; a box keeps the preset simple and still spans ~150 tracts).
_DP02_RA = (50.0, 75.0)
_DP02_DEC = (-45.0, -27.0)
# DR1: the wide-fast-deep declination range, all RA.
_DR1_DEC = (-70.0, 5.0)
_DR1_FIRST_NIGHT = np.datetime64("2025-12-01", "D")
# Visits per night are drawn uniformly from this inclusive range (mean ~1000, DESIGN section 9).
_DR1_VISITS_PER_NIGHT = (800, 1200)


# --------------------------------------------------------------------------------- table building
def _frame(
    visit: npt.ArrayLike,
    band: npt.ArrayLike,
    ra: npt.ArrayLike,
    dec: npt.ArrayLike,
    rotation: npt.ArrayLike,
) -> pd.DataFrame:
    """Assemble a visit table with the canonical dtypes, sorted by visit."""
    df = pd.DataFrame(
        {
            "visit": np.asarray(visit, dtype=np.int64),
            "band": pd.Series(np.asarray(band, dtype=str), dtype=str),
            "ra": np.asarray(ra, dtype=np.float64),
            "dec": np.asarray(dec, dtype=np.float64),
            "rotation": np.asarray(rotation, dtype=np.float64),
        }
    )
    # Stable sort: callers' ties cannot happen (ids are unique) but keep the order well defined.
    return df.sort_values("visit", kind="stable", ignore_index=True)


def _sample_bands(rng: np.random.Generator, n: int) -> npt.NDArray[np.str_]:
    return np.array(BANDS)[rng.choice(len(BANDS), size=n, p=_BAND_WEIGHTS)]


def _wrap_ra(ra_deg: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    ra = np.mod(ra_deg, 360.0)
    # mod of a tiny negative number rounds to exactly 360.0; keep ra in [0, 360).
    ra[ra >= 360.0] = 0.0
    return ra


def _uniform_cap(
    rng: np.random.Generator, n: int, center: tuple[float, float], radius_deg: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Points uniform on the sphere within ``radius_deg`` of ``center`` (ra, dec degrees)."""
    # Uniform in solid angle: cos(distance) is uniform on [cos(radius), 1].
    cos_r = 1.0 - rng.random(n) * (1.0 - math.cos(math.radians(radius_deg)))
    bearing = rng.random(n) * (2.0 * math.pi)
    ra0, dec0 = (math.radians(v) for v in center)
    sin_r = np.sqrt(np.maximum(0.0, 1.0 - cos_r * cos_r))
    sin_dec = math.sin(dec0) * cos_r + math.cos(dec0) * sin_r * np.cos(bearing)
    dec = np.arcsin(np.clip(sin_dec, -1.0, 1.0))
    ra = ra0 + np.arctan2(
        np.sin(bearing) * sin_r * math.cos(dec0), cos_r - math.sin(dec0) * sin_dec
    )
    return _wrap_ra(np.degrees(ra)), np.degrees(dec)


def _uniform_box(
    rng: np.random.Generator,
    n: int,
    ra_range: tuple[float, float],
    dec_range: tuple[float, float],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Points uniform on the sphere inside an RA/Dec box (degrees)."""
    ra = ra_range[0] + rng.random(n) * (ra_range[1] - ra_range[0])
    # Uniform in solid angle: sin(dec) is uniform between the limits.
    s0, s1 = (math.sin(math.radians(d)) for d in dec_range)
    dec = np.degrees(np.arcsin(s0 + rng.random(n) * (s1 - s0)))
    return _wrap_ra(ra), dec


def _imsim_visit_ids(rng: np.random.Generator, n: int, start: int) -> npt.NDArray[np.int64]:
    # imSim visit ids are increasing integers with small gaps (not every id is observed).
    return start + np.cumsum(rng.integers(1, 9, size=n, dtype=np.int64))


def _lsstcam_visit_ids(rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
    """LSSTCam-style ids ``day_obs * 100000 + seq_num``, ~1000 visits per consecutive night."""
    lo, hi = _DR1_VISITS_PER_NIGHT
    # Enough nights for n visits even if every night has the minimum count.
    per_night = rng.integers(lo, hi + 1, size=n // lo + 1, dtype=np.int64)
    night_of_visit = np.repeat(np.arange(per_night.size), per_night)[:n]
    first_of_night = np.concatenate(([0], np.cumsum(per_night)[:-1]))
    seq_num = np.arange(n, dtype=np.int64) - first_of_night[night_of_visit] + 1
    dates = _DR1_FIRST_NIGHT + night_of_visit.astype("timedelta64[D]")
    year = dates.astype("datetime64[Y]").astype(np.int64) + 1970
    month_start = dates.astype("datetime64[M]")
    month = month_start.astype(np.int64) % 12 + 1
    day = (dates - month_start.astype("datetime64[D]")).astype(np.int64) + 1
    day_obs = year * 10000 + month * 100 + day
    return day_obs * 100_000 + seq_num


def _check_count(preset: str, visits: int | None, default: int, maximum: int | None) -> int:
    if visits is None:
        return default
    if isinstance(visits, bool) or not isinstance(visits, int | np.integer) or visits < 1:
        raise ValueError(
            f"survey preset {preset!r}: visits must be a positive integer, got {visits!r}; "
            f"fix: give a count such as {default}, or leave it out for the default"
        )
    if maximum is not None and visits > maximum:
        raise ValueError(
            f"survey preset {preset!r}: visits={visits} exceeds the {maximum} visits of the full "
            f"list; fix: ask for at most {maximum}"
        )
    return int(visits)


# --------------------------------------------------------------------------------------- presets
def _dc2_test_med_1(rng: np.random.Generator, visits: int | None) -> pd.DataFrame:
    n = _check_count("dc2-test-med-1", visits, 300, None)
    ids = _imsim_visit_ids(rng, n, 159_000)
    bands = _sample_bands(rng, n)
    ra, dec = _uniform_cap(rng, n, _DC2_TEST_MED_1_CENTER, _DC2_TEST_MED_1_RADIUS_DEG)
    rot = rng.random(n) * 360.0
    return _frame(ids, bands, ra, dec, rot)


def _dp02(rng: np.random.Generator, visits: int | None) -> pd.DataFrame:
    n = _check_count("dp0.2", visits, 20_000, None)
    ids = _imsim_visit_ids(rng, n, 200_000)
    bands = _sample_bands(rng, n)
    ra, dec = _uniform_box(rng, n, _DP02_RA, _DP02_DEC)
    rot = rng.random(n) * 360.0
    return _frame(ids, bands, ra, dec, rot)


def _dr1(rng: np.random.Generator, visits: int | None) -> pd.DataFrame:
    n_sub = _check_count("dr1", visits, DR1_FULL_VISITS, DR1_FULL_VISITS)
    # Always build the full list first, so that every sub-sample is a subset of the same survey
    # and does not depend on how many visits were asked for.
    n = DR1_FULL_VISITS
    ids = _lsstcam_visit_ids(rng, n)
    bands = _sample_bands(rng, n)
    ra, dec = _uniform_box(rng, n, (0.0, 360.0), _DR1_DEC)
    rot = rng.random(n) * 360.0
    if visits is not None:
        keep = np.sort(rng.choice(n, size=n_sub, replace=False))
        ids, bands, ra, dec, rot = ids[keep], bands[keep], ra[keep], dec[keep], rot[keep]
    return _frame(ids, bands, ra, dec, rot)


_PRESET_BUILDERS: dict[str, Callable[[np.random.Generator, int | None], pd.DataFrame]] = {
    "dc2-test-med-1": _dc2_test_med_1,
    "dp0.2": _dp02,
    "dr1": _dr1,
}
#: Names of the synthetic survey presets.
PRESETS: tuple[str, ...] = tuple(_PRESET_BUILDERS)


def make_survey(preset: str, seed: int = 1, visits: int | None = None) -> pd.DataFrame:
    """Build a deterministic synthetic visit table.

    Parameters
    ----------
    preset : str
        ``"dc2-test-med-1"``: 300 imSim-like visits (ids from ~159000) within 1.2 deg of
        (57.56, -36.45), between DC2 tracts 3828 and 3829.
        ``"dp0.2"``: 20,000 imSim-like visits (ids from ~200000) over the DC2 box
        RA 50..75, Dec -45..-27 deg.
        ``"dr1"``: 240,000 LSSTCam-like visits (ids ``day_obs * 100000 + seq_num``, nights from
        2025-12-01, ~1000 per night) over all RA, Dec -70..+5 deg.
        Positions are uniform on the sphere, rotations uniform in [0, 360), bands drawn with
        weights u 7 %, g 10 %, r 22 %, i 22 %, z 20 %, y 19 %.
    seed : int, optional
        Seed of `numpy.random.default_rng`; the same (preset, seed, visits) always gives an
        identical table.
    visits : int, optional
        Number of visits.  For ``dc2-test-med-1`` and ``dp0.2`` it replaces the default count; for
        ``dr1`` it selects that many visits of the full 240,000-visit list (without replacement),
        so every sub-sample of one seed is a subset of the same survey.

    Returns
    -------
    table : `pandas.DataFrame`
        Columns ``visit, band, ra, dec, rotation``, sorted by visit.

    Raises
    ------
    ValueError
        If the preset is unknown or ``visits`` is not a positive integer (at most 240,000 for
        ``dr1``).
    """
    try:
        builder = _PRESET_BUILDERS[preset]
    except KeyError:
        raise ValueError(
            f"unknown survey preset {preset!r}; valid presets: {', '.join(PRESETS)}"
        ) from None
    return builder(np.random.default_rng(seed), visits)


# ------------------------------------------------------------------------------------------- CSV
# Visit ids become Butler dimension values (int64); larger ids would overflow the table.
_MAX_VISIT = 2**63 - 1
_HEADER = ",".join(COLUMNS)
_PATH_FIX = "check the path; survey.visits in a spec is relative to the spec file"
_HEADER_FIX = f"make the first line exactly '{_HEADER}' (ra, dec and rotation in degrees)"


class VisitsCsvError(ValueError):
    """A visits CSV cannot be read or has an invalid line.

    The message is ``"{path}: line {line}, column '{column}': {problem}; fix: {fix}"``; the
    line and column parts are left out when they do not apply (a file that cannot be read has
    no line, a line with too many fields no single column).

    Parameters
    ----------
    path : `pathlib.Path`
        The CSV file.
    line : `int` or `None`
        1-based line number in the file (the header is line 1).
    column : `str` or `None`
        The column at fault, one of `COLUMNS`.
    problem : `str`
        What is wrong, without a trailing period.
    fix : `str`
        What to change, without a trailing period.
    """

    def __init__(
        self, path: Path, line: int | None, column: str | None, problem: str, fix: str
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.column = column
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    @property
    def where(self) -> str:
        """``"{path}: line {line}, column '{column}'"``, without the parts that do not apply."""
        parts = [f"line {self.line}"] if self.line is not None else []
        if self.column is not None:
            parts.append(f"column {self.column!r}")
        return f"{self.path}: {', '.join(parts)}" if parts else str(self.path)

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}; fix: {self.fix}"

    def __reduce__(self) -> tuple[object, ...]:
        # Picklable with its fields (a Dask worker or a Prefect task may raise it).
        return (type(self), (self.path, self.line, self.column, self.problem, self.fix))


def _header_error(path: Path, header: list[str] | None, more: bool) -> VisitsCsvError | None:
    """The problem with a CSV's header fields, naming the first column at fault, or `None`.

    ``header`` is the fields of line 1 (`None` for a file without lines); ``more`` says whether
    anything but blank lines follows it.
    """
    if header is None or not any(field.strip() for field in header):
        if more:
            return VisitsCsvError(
                path,
                1,
                None,
                "the first line is blank",
                f"{_HEADER_FIX}, with no blank line before it",
            )
        return VisitsCsvError(
            path, 1, None, "the file is empty", f"{_HEADER_FIX}, then add one line per visit"
        )
    got = [field.strip() for field in header]
    if got == list(COLUMNS):
        return None
    shown = repr(",".join(got))
    for name in got:
        if got.count(name) > 1:
            return VisitsCsvError(
                path, 1, name, f"appears twice in the header {shown}", _HEADER_FIX
            )
    missing = [name for name in COLUMNS if name not in got]
    if missing:
        return VisitsCsvError(
            path, 1, missing[0], f"is missing from the header {shown}", _HEADER_FIX
        )
    extra = [name for name in got if name not in COLUMNS]
    if extra:
        return VisitsCsvError(
            path,
            1,
            extra[0],
            f"is not a visits column (the header is {shown})",
            f"remove the column; {_HEADER_FIX}",
        )
    # Same names in another order: a column read by position would be misread.
    first = next(want for want, have in zip(COLUMNS, got, strict=True) if want != have)
    return VisitsCsvError(
        path, 1, first, f"the header {shown} has the columns in the wrong order", _HEADER_FIX
    )


def _read_text(path: Path) -> str:
    """The whole file as text, or the `VisitsCsvError` saying why it cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VisitsCsvError(path, None, None, "file not found", _PATH_FIX) from None
    except IsADirectoryError:
        raise VisitsCsvError(path, None, None, "is a directory, not a file", _PATH_FIX) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise VisitsCsvError(
            path, None, None, f"cannot read the file: {reason}", "make the file readable"
        ) from None
    if data.startswith(codecs.BOM_UTF8):  # spreadsheets write one; it is not part of the header
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VisitsCsvError(
            path,
            data.count(b"\n", 0, exc.start) + 1,
            None,
            f"byte {data[exc.start]:#04x} is not UTF-8 text",
            "save the file as UTF-8 (or plain ASCII) CSV",
        ) from None


def _parse_float(path: Path, line: int, name: str, text: str, unit_hint: str) -> float:
    """Parse one finite float field of a CSV row, or raise the CSV error for it."""
    try:
        value = float(text)
    except ValueError:
        raise VisitsCsvError(
            path, line, name, f"{text!r} is not a number", f"write {name} as {unit_hint}"
        ) from None
    if not math.isfinite(value):
        raise VisitsCsvError(
            path, line, name, f"{text!r} is not finite", f"write {name} as {unit_hint}"
        )
    return value


def check_visits_csv_header(path: Path) -> None:
    """Check that a visits CSV can be opened and has the right header, reading only line 1.

    The spec loader calls this on every load (cheap); `read_visits_csv` checks every line.

    Parameters
    ----------
    path : `pathlib.Path`
        The CSV file.

    Raises
    ------
    VisitsCsvError
        If the file cannot be read or its header is not exactly ``visit,band,ra,dec,rotation``.
    """
    path = Path(path)
    if path.is_dir():
        raise VisitsCsvError(path, None, None, "is a directory, not a file", _PATH_FIX)
    try:
        with path.open("rb") as fh:
            first = fh.readline()
            # Only needed to tell an empty file from one with a blank first line.
            rest = fh.read(1 << 16) if not first.strip() else b""
    except FileNotFoundError:
        raise VisitsCsvError(path, None, None, "file not found", _PATH_FIX) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise VisitsCsvError(
            path, None, None, f"cannot read the file: {reason}", "make the file readable"
        ) from None
    if first.startswith(codecs.BOM_UTF8):
        first = first[len(codecs.BOM_UTF8) :]
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VisitsCsvError(
            path,
            1,
            None,
            f"byte {first[exc.start]:#04x} is not UTF-8 text",
            "save the file as UTF-8 (or plain ASCII) CSV",
        ) from None
    header = next(csv.reader([text]), None)
    error = _header_error(path, header, bool(text.strip()) or bool(rest.strip()))
    if error is not None:
        raise error


def read_visits_csv(path: Path) -> pd.DataFrame:
    """Read and validate a visit table from CSV.

    Parameters
    ----------
    path : `pathlib.Path`
        UTF-8 CSV file with the header ``visit,band,ra,dec,rotation`` (exactly these columns, in
        this order) and one visit per line; angles in degrees.  Blank lines are ignored.

    Returns
    -------
    table : `pandas.DataFrame`
        The visit table, sorted by visit.

    Raises
    ------
    VisitsCsvError
        On the first problem in file order, naming the file, the 1-based line (the header is
        line 1), the column and the fix: a file that cannot be read or is not UTF-8, an empty
        file, a missing, extra, repeated or misplaced column, a line with the wrong number of
        fields, a visit that is not a non-negative integer or repeats an earlier one, a band not
        in ``ugrizy``, ra outside [0, 360), dec outside [-90, 90], a non-numeric or non-finite
        value, or a file without visits.
    """
    path = Path(path)
    text = _read_text(path)
    visit: list[int] = []
    band: list[str] = []
    ra: list[float] = []
    dec: list[float] = []
    rot: list[float] = []
    first_line_of: dict[int, int] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        error = _header_error(path, header, bool(text.strip()))
        if error is not None:
            raise error
        for row in reader:
            line = reader.line_num
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) < len(COLUMNS):
                raise VisitsCsvError(
                    path,
                    line,
                    COLUMNS[len(row)],
                    f"the line has {len(row)} fields, so no {COLUMNS[len(row)]}",
                    f"give all {len(COLUMNS)} fields, {_HEADER}",
                )
            if len(row) > len(COLUMNS):
                raise VisitsCsvError(
                    path,
                    line,
                    None,
                    f"the line has {len(row)} fields, more than the {len(COLUMNS)} columns "
                    f"{_HEADER}",
                    "remove the extra fields (a ',' inside a value needs quotes)",
                )
            v_text, b_text, ra_text, dec_text, rot_text = (f.strip() for f in row)
            try:
                v = int(v_text)
            except ValueError:
                raise VisitsCsvError(
                    path, line, "visit", f"{v_text!r} is not an integer", "use integer visit ids"
                ) from None
            if not 0 <= v <= _MAX_VISIT:
                raise VisitsCsvError(
                    path,
                    line,
                    "visit",
                    f"{v} is outside [0, 2**63)",
                    "use the instrument's non-negative visit ids",
                )
            if v in first_line_of:
                raise VisitsCsvError(
                    path,
                    line,
                    "visit",
                    f"{v} repeats line {first_line_of[v]}",
                    "give every visit a unique id (remove or renumber one of the two lines)",
                )
            first_line_of[v] = line
            if b_text not in BANDS:
                hint = f" (did you mean {b_text.lower()!r}?)" if b_text.lower() in BANDS else ""
                raise VisitsCsvError(
                    path,
                    line,
                    "band",
                    f"{b_text!r} is not one of {', '.join(BANDS)}{hint}",
                    "use a single lower-case band letter from ugrizy",
                )
            r = _parse_float(path, line, "ra", ra_text, "degrees in [0, 360)")
            if not 0.0 <= r < 360.0:
                raise VisitsCsvError(
                    path,
                    line,
                    "ra",
                    f"{ra_text} is outside [0, 360)",
                    "wrap ra into [0, 360) degrees",
                )
            d = _parse_float(path, line, "dec", dec_text, "degrees in [-90, 90]")
            if not -90.0 <= d <= 90.0:
                raise VisitsCsvError(
                    path,
                    line,
                    "dec",
                    f"{dec_text} is outside [-90, 90]",
                    "give dec in degrees, from -90 to 90",
                )
            t = _parse_float(path, line, "rotation", rot_text, "degrees")
            visit.append(v)
            band.append(b_text)
            ra.append(r)
            dec.append(d)
            rot.append(t)
    except csv.Error as exc:  # e.g. a NUL byte or an unterminated quote
        raise VisitsCsvError(
            path, reader.line_num or 1, None, f"not valid CSV: {exc}", "fix the CSV syntax there"
        ) from None
    if not visit:
        raise VisitsCsvError(
            path, 2, None, "the file has a header but no visits", "add one line per visit after it"
        )
    return _frame(visit, band, ra, dec, rot)


def write_visits_csv(table: pd.DataFrame, path: Path) -> None:
    """Write a visit table as CSV that `read_visits_csv` reads back identically.

    Parameters
    ----------
    table : `pandas.DataFrame`
        Visit table with (at least) the columns ``visit, band, ra, dec, rotation``.
    path : `pathlib.Path`
        Destination file.
    """
    # float repr (pandas' default for float64) round-trips exactly, so no float_format.
    table.loc[:, list(COLUMNS)].to_csv(path, index=False, lineterminator="\n")


# ----------------------------------------------------------------------------------- from a spec
class SurveySpecLike(Protocol):
    """The ``survey`` section of a campaign spec, as `survey_from_spec` reads it."""

    @property
    def preset(self) -> str | None: ...

    @property
    def seed(self) -> int: ...

    @property
    def visits(self) -> int | str | None: ...

    @property
    def visits_csv(self) -> Path | None: ...


class SpecLike(Protocol):
    """Anything with a ``survey`` section (e.g. `drp_campaign.model.spec.CampaignSpec`)."""

    @property
    def survey(self) -> SurveySpecLike: ...


# Attributes a spec object may carry to say where its YAML lives; relative CSV paths are resolved
# against it.  The spec module normally resolves paths itself, this is only a fallback.
_SPEC_DIR_ATTRS = ("base_dir", "spec_dir", "source_dir")
_SPEC_FILE_ATTRS = ("source", "source_path", "spec_path", "path")


def _spec_base_dir(spec: object) -> Path | None:
    for name in _SPEC_DIR_ATTRS:
        value = getattr(spec, name, None)
        if isinstance(value, str | Path):
            return Path(value)
    for name in _SPEC_FILE_ATTRS:
        value = getattr(spec, name, None)
        if isinstance(value, str | Path):
            return Path(value).parent
    return None


def survey_from_spec(spec: SpecLike) -> pd.DataFrame:
    """Build the visit table a campaign spec asks for.

    Parameters
    ----------
    spec : `SpecLike`
        Any object whose ``survey`` has ``preset``, ``seed``, ``visits`` and ``visits_csv``.
        ``visits_csv`` (a path) wins over the preset and over a path in ``visits``: the spec
        loader sets it to ``visits`` resolved against the spec's directory.  ``visits`` may be a
        count (int, or a string of digits) for the preset, or, as in the DESIGN example
        ``{visits: path/to/visits.csv}``, a path to a CSV file, used when ``visits_csv`` is not
        set.  Relative paths are resolved against the spec's directory when the
        spec says where it lives (``base_dir``, ``spec_dir``, ``source_dir``, or the parent of
        ``source``, ``source_path``, ``spec_path`` or ``path``), else against the working directory.

    Returns
    -------
    table : `pandas.DataFrame`
        The visit table.

    Raises
    ------
    ValueError
        If neither a preset nor a CSV is given, or from `make_survey` / `read_visits_csv`.
    """
    survey = spec.survey
    if getattr(survey, "butler", None) is not None:
        # This module is pure; the registry is read by drp_campaign.backends.registry_survey.
        raise ValueError(
            "survey.butler names a registry; fix: read its visits with "
            "drp_campaign.backends.registry_survey.read_registry_visits"
        )
    csv_path: Path | None = getattr(survey, "visits_csv", None)
    raw = getattr(survey, "visits", None)
    count: int | None = None
    if isinstance(raw, str) and raw.strip().isdigit():
        count = int(raw)
    elif isinstance(raw, str | Path):
        # DESIGN form {visits: path/to/visits.csv}. The spec loader always resolves this path
        # into visits_csv as well, so both being set is the normal case, not a conflict: the
        # resolved path names the same file and wins. Only a spec object that nobody resolved
        # (built in code, a duck-typed stand-in) leaves the path to be resolved here.
        if csv_path is None:
            csv_path = Path(raw)
    elif raw is not None:
        count = raw
    if csv_path is not None:
        csv_path = Path(csv_path)
        base = _spec_base_dir(spec)
        if not csv_path.is_absolute() and base is not None:
            csv_path = base / csv_path
        return read_visits_csv(csv_path)
    preset = getattr(survey, "preset", None)
    if preset is None:
        raise ValueError(
            "survey has neither a preset nor a visits CSV; fix: set survey.preset to one of "
            f"{', '.join(PRESETS)} or survey.visits to a CSV path"
        )
    seed = getattr(survey, "seed", None)
    return make_survey(preset, seed=1 if seed is None else int(seed), visits=count)
