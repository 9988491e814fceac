"""Campaign spec: the YAML file that describes one multi-site DRP campaign.

The format is DESIGN.md section 7. This module holds the pydantic models and a loader whose errors
are written for the operator who has to fix the file: every problem names the file, the key path
(``sites.FrDF.share``, ``steps[2].placement``), the bad value and the fix, and all problems in a
file are reported together so that one edit fixes them all.

The module is pure (pydantic, PyYAML and the standard library only). The only file access is what
the format itself requires: reading the spec, checking the header line of a visits CSV, and, when
asked with ``check_files=True``, checking that the pipeline YAML exists.

Path resolution
---------------
``survey.visits: path/to/visits.csv`` is relative to the directory of the spec file.
``survey.butler: REPO`` names a Butler repository: a URI with a scheme (``postgresql://...``,
``s3://...``, ``file://...``) is kept as written; anything else is a path (the repository root or
its ``butler.yaml``), relative to the directory of the spec file, and is resolved into
``survey.butler_uri``. The repository is not opened here (this module does no registry I/O):
``drp_campaign.backends.registry_survey`` does, and reports what it cannot read the same way.
``pipeline.yaml`` is looked up relative to the spec's directory first and then in each parent
directory up to and including the repository root (the nearest ancestor holding a
``pyproject.toml``); the first existing file wins. This lets the shipped specs under
``deployments/campaigns/`` say ``pipelines/DRP-mock.yaml`` as DESIGN.md does (relative to the
repository root). If no candidate exists, the path is taken relative to the repository root (or to
the spec's directory when no repository root is found); ``check_files=True`` then reports it.
A spec parsed from text without a source file resolves relative to the current directory.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .skyconfig import CELL_BORDER, CELL_INNER, builder_defaults, cell_layout

if TYPE_CHECKING:
    from .survey import VisitsCsvError

__all__ = [
    "INSTRUMENTS",
    "MAX_SITES",
    "SHARE_TOLERANCE",
    "SURVEY_PRESETS",
    "SURVEY_SOURCES",
    "VISITS_CSV_COLUMNS",
    "CampaignSpec",
    "InputsSpec",
    "PartitionSpec",
    "PipelineSpec",
    "Problem",
    "ResolvedInputs",
    "SiteSpec",
    "SkymapSpec",
    "SpecError",
    "GroupSpec",
    "StepSpec",
    "SurveySpec",
    "load_spec",
    "parse_spec",
    "visits_csv_problem",
    "resolve_butler",
]

INSTRUMENTS: tuple[str, ...] = ("LSSTCam", "LSSTCam-imSim", "LSSTComCam")
SURVEY_PRESETS: tuple[str, ...] = ("dc2-test-med-1", "dp0.2", "dr1")
VISITS_CSV_COLUMNS: tuple[str, ...] = ("visit", "band", "ra", "dec", "rotation")
#: The keys of ``survey`` that each name a visit source; a survey has exactly one.
SURVEY_SOURCES: tuple[str, ...] = ("preset", "visits", "butler")
# A URI scheme (RFC 3986), as in postgresql://, s3://, file://; a Windows drive letter is a path.
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
MAX_SITES = 8
SHARE_TOLERANCE = 1e-6  # the messages say "within 1e-6"; keep them in step

_CAMPAIGN_RE = re.compile(r"[a-z0-9-]+")
_SITE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
# Marker put in the validation context by the loader: it runs the cross-field checks itself so it
# can point at the exact key, so the model validators must not report the same problems again.
_LOADER_CONTEXT = "drp_campaign.model.spec.loader"
_SHOW_LIMIT = 80


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_UNSET: Any = object()


def _show(value: object) -> str:
    """Render a value as the operator wrote it in YAML, shortened if long."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 3] + "..."
    return text


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec.

    Parameters
    ----------
    key : `str`
        Dotted key path (``sites.FrDF.share``, ``steps[2].placement``), a position such as
        ``line 3, column 5`` for YAML syntax errors, or ``""`` for the whole file.
    reason : `str`
        What is wrong, without a trailing period.
    fix : `str`
        What to change, as a sentence ending with a period.
    value : `object`
        The offending value; left unset when there is none (a missing key, a syntax error).
    shown : `str` or `None`
        Text that replaces the rendering of ``value`` (for summaries such as a sum of shares).
    rename_to : `str` or `None`
        For an unknown key with a close match: the key path it probably meant (the loader then
        does not also report that key as missing).
    """

    key: str
    reason: str
    fix: str
    value: object = _UNSET
    shown: str | None = None
    rename_to: str | None = None  # for an unknown key: the key path it probably meant

    @property
    def has_value(self) -> bool:
        """Whether the problem is about a value (rather than a missing or unknown key)."""
        return self.value is not _UNSET or self.shown is not None

    def __str__(self) -> str:
        prefix = f"{self.key}: " if self.key else ""
        if self.has_value:
            shown = self.shown if self.shown is not None else _show(self.value)
            return f"{prefix}{shown} is not valid: {self.reason}. Fix: {self.fix}"
        return f"{prefix}{self.reason}. Fix: {self.fix}"


class SpecError(ValueError):
    """A campaign spec is invalid.

    The message has a fixed format, one problem per line::

        <file>: <key>: <value> is not valid: <reason>. Fix: <fix>

    With more than one problem the first line is ``<file>: <n> problems:`` and each problem follows
    on its own indented line. ``path``, ``key``, ``value`` and ``fix`` describe the first problem;
    ``problems`` lists them all.

    Parameters
    ----------
    problems : `list` [`Problem`]
        Everything wrong with the spec, at least one.
    path : `str` or `None`
        The spec file as the caller named it; `None` for text without a file.
    """

    def __init__(self, problems: Iterable[Problem], path: str | Path | None = None) -> None:
        self.problems: list[Problem] = list(problems)
        if not self.problems:
            raise ValueError("SpecError needs at least one problem")
        self.path: str | None = None if path is None else str(path)
        first = self.problems[0]
        self.key: str = first.key
        self.value: object = None if first.value is _UNSET else first.value
        self.fix: str = first.fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path if self.path is not None else "<spec>"
        if len(self.problems) == 1:
            return f"{where}: {self.problems[0]}"
        lines = [f"{where}: {len(self.problems)} problems:"]
        lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)


def _did_you_mean(word: object, choices: Iterable[str]) -> str | None:
    """Closest choice to ``word`` (case-insensitive), or `None`."""
    if not isinstance(word, str):
        return None
    options = list(choices)
    lowered = {choice.lower(): choice for choice in options}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[matches[0]] if matches else None


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _Model(BaseModel):
    # strict: YAML already gives typed scalars, so "120" for rings or `yes` for a share is a
    # mistake to report, not something to coerce. frozen: a loaded spec is a plan input and must
    # not change under the planner.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _from_loader(info: ValidationInfo) -> bool:
    context = info.context
    return isinstance(context, dict) and bool(context.get(_LOADER_CONTEXT))


class SkymapSpec(_Model):
    """The skymap: a RingsSkyMap (DESIGN.md sections 3 and 10).

    ``name``, ``rings`` and ``builder`` plus the rest of the RingsSkyMap config, which decides the
    geometry and the lsst.skymap hash a registered skymap must match. An optional key left out
    (`None`) means the builder's default (`drp_campaign.model.skyconfig.builder_defaults`).
    Float keys accept YAML integers (``pixel_scale: 1``): strict mode still takes an int for a
    float, and the geometry converts it, so ``1`` and ``1.0`` are the same skymap.
    """

    name: str = Field(min_length=1)
    rings: int = Field(default=120, ge=1)
    builder: Literal["cells", "legacy"] = "cells"
    pixel_scale: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    tract_overlap: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    ra_start: float | None = Field(default=None, ge=0, lt=360, allow_inf_nan=False)
    patch_inner: int | None = Field(default=None, gt=0)
    patch_border: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _whole_cells(self, info: ValidationInfo) -> Self:
        if not _from_loader(info):
            _raise_if(_skymap_problems(self.model_dump(), "skymap"))
        return self


class SurveySpec(_Model):
    """Which visits the campaign processes.

    Either ``preset`` (optionally with ``visits: <count>`` to sub-sample it) or ``visits:
    <path to CSV>``; the loader resolves the CSV path into ``visits_csv``. Or ``butler: REPO``
    (with an optional ``where``, a Butler query expression): the visits and their detector
    regions exactly as a registry stores them (DESIGN.md section 10); the loader resolves REPO
    into ``butler_uri``.
    """

    preset: Literal["dc2-test-med-1", "dp0.2", "dr1"] | None = None
    seed: int = 1
    visits: int | str | None = None
    visits_csv: Path | None = Field(default=None, strict=False)
    butler: str | None = Field(default=None, min_length=1)
    where: str | None = None
    butler_uri: str | None = None

    @property
    def is_registry(self) -> bool:
        """Whether the visits come from a Butler registry (``butler: REPO``)."""
        return self.butler is not None

    @field_validator("visits")
    @classmethod
    def _positive_count(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("the visit count must be positive")
        if isinstance(value, str) and not value.strip():
            raise ValueError("the visits CSV path is empty")
        return value

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> Self:
        if not _from_loader(info):
            # The registry keys are left out when unset so that messages about the other
            # sources show the survey as the operator wrote it.
            unset = {name for name in ("butler", "where") if getattr(self, name) is None}
            data = self.model_dump(exclude={"visits_csv", "butler_uri", *unset})
            _raise_if(_survey_problems(data, "survey"))
        return self


class SiteSpec(_Model):
    """One data facility; its name is the key under ``sites``."""

    compute_site: str
    cloud: str = Field(min_length=1)
    share: float = Field(gt=0, le=1)


class PartitionSpec(_Model):
    """How patches are divided between the sites (DESIGN.md section 4)."""

    policy: Literal["dec-bands", "patch-bands"] = "dec-bands"


class PipelineSpec(_Model):
    """The pipeline YAML; the loader resolves ``yaml`` into ``yaml_path``."""

    yaml: str = Field(min_length=1)
    yaml_path: Path | None = Field(default=None, strict=False)

    @property
    def uri(self) -> str:
        """The pipeline file to read: the resolved path, else ``yaml`` as written."""
        return str(self.yaml_path or self.yaml)


class InputsSpec(_Model):
    """The hub's input collections (DESIGN.md section 10).

    What the campaign replicates is what the pipeline reads from these: the raws of each site's
    visits from ``raws``, every calibration the pipeline reads from ``calibs`` (certified at the
    sites with the hub's validity ranges), and every other overall input found in ``extra``.
    `None` means the embedded default's name for the spec's instrument.
    """

    raws: str | None = Field(default=None, min_length=1)
    calibs: str | None = Field(default=None, min_length=1)
    extra: tuple[str, ...] = Field(default=("skymaps",), strict=False)

    def collections(self, instrument: str) -> ResolvedInputs:
        """The input collections with the defaults of ``instrument`` filled in.

        Parameters
        ----------
        instrument : `str`
            The spec's instrument.

        Returns
        -------
        inputs : `ResolvedInputs`
        """
        return ResolvedInputs(
            raws=self.raws or f"{instrument}/raw/all",
            calibs=self.calibs or f"{instrument}/calib",
            extra=tuple(self.extra),
        )


@dataclass(frozen=True)
class ResolvedInputs:
    """The hub's input collections, defaults resolved: raws, calibs, then the extra ones."""

    raws: str
    calibs: str
    extra: tuple[str, ...]

    @property
    def all(self) -> list[str]:
        """Every input collection, in search order."""
        return list(dict.fromkeys([self.raws, self.calibs, *self.extra]))


class GroupSpec(_Model):
    """How a step's work at a site is cut into groups (`drp_campaign.model.groups`).

    Exactly one bound: ``visits`` for a visit-sharded step, ``tracts`` or ``patches`` for a
    tract-sharded one.
    """

    visits: int | None = Field(default=None, ge=1)
    tracts: int | None = Field(default=None, ge=1)
    patches: int | None = Field(default=None, ge=1)


class StepSpec(_Model):
    """One step: a pipeline subset run per site (or once, gathered), cut into groups."""

    name: str = Field(min_length=1)
    subset: str = Field(min_length=1)
    shard: Literal["visit", "tract", "none"]
    placement: Literal["per-site", "gather"]
    # Left out: the defaults of drp_campaign.model.groups (500 visits, 10 tracts).
    group: GroupSpec | None = None


# What the emulated DRP pipeline (pipelines/DRP-mock.yaml) calls its temporaries and its PVI:
# only the defaults of the spec keys ``temporaries`` and ``pvi``; a real pipeline's spec names
# its own (drp_pipe: post_isr_image, direct_warp, psf_matched_warp; preliminary_visit_image).
EMULATED_TEMPORARIES: tuple[str, ...] = ("postISRCCD", "directWarp", "psfMatchedWarp")
EMULATED_PVI = "pvi"


class CampaignSpec(_Model):
    """A whole campaign spec (DESIGN.md section 7)."""

    campaign: str = Field(pattern=r"^[a-z0-9-]+$")
    # One of INSTRUMENTS (our focal-plane models) unless the survey is a registry, which carries
    # its own detector regions: then any instrument registered there. Checked in _cross_problems.
    instrument: str = Field(min_length=1)
    skymap: SkymapSpec
    survey: SurveySpec
    hub: str
    sites: dict[str, SiteSpec]
    partition: PartitionSpec = PartitionSpec()
    pipeline: PipelineSpec
    steps: list[StepSpec] = Field(min_length=1)
    inputs: InputsSpec = InputsSpec()
    # Dataset types that never leave the site that made them (DESIGN.md section 5); the
    # pipeline's, so the spec says them and the engine names none. The default is the emulated
    # pipeline's, which the shipped specs run.
    temporaries: tuple[str, ...] = Field(default=EMULATED_TEMPORARIES, strict=False)
    # The pipeline's processed visit image: the overlap transfers the plan predicts, which the
    # milestone report compares one by one with what moved (unchecked if null).
    pvi: str | None = Field(default=EMULATED_PVI, min_length=1)
    source: Path | None = Field(default=None, strict=False)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Self:
        # Built in code rather than loaded: apply the same rules the loader applies.
        if not _from_loader(info):
            _raise_if(_cross_problems(self.model_dump(exclude={"source"})))
        return self

    @property
    def input_collections(self) -> ResolvedInputs:
        """The hub's input collections (`InputsSpec.collections` for this instrument)."""
        return self.inputs.collections(self.instrument)

    @property
    def site_names(self) -> list[str]:
        """Site names in spec order."""
        return list(self.sites)

    @property
    def shares(self) -> dict[str, float]:
        """Each site's share of the work, in spec order."""
        return {name: site.share for name, site in self.sites.items()}

    @property
    def step_names(self) -> list[str]:
        """Step names in spec order."""
        return [step.name for step in self.steps]

    def step(self, name: str) -> StepSpec:
        """Return the step called ``name``.

        Parameters
        ----------
        name : `str`
            A step name from the spec.

        Returns
        -------
        step : `StepSpec`
            The step.

        Raises
        ------
        KeyError
            If there is no such step; the message suggests the closest name.
        """
        for step in self.steps:
            if step.name == name:
                return step
        hint = _did_you_mean(name, self.step_names)
        suffix = f"; did you mean {hint!r}?" if hint else ""
        raise KeyError(f"no step {name!r} in campaign {self.campaign!r}{suffix}")

    def site(self, name: str) -> SiteSpec:
        """Return the site called ``name``.

        Parameters
        ----------
        name : `str`
            A site name from the spec.

        Returns
        -------
        site : `SiteSpec`
            The site.

        Raises
        ------
        KeyError
            If there is no such site; the message suggests the closest name.
        """
        if name in self.sites:
            return self.sites[name]
        hint = _did_you_mean(name, self.sites)
        suffix = f"; did you mean {hint!r}?" if hint else ""
        raise KeyError(f"no site {name!r} in campaign {self.campaign!r}{suffix}")


def _raise_if(problems: list[Problem]) -> None:
    # Inside a model validator pydantic turns a ValueError into a ValidationError entry.
    if problems:
        raise ValueError("; ".join(str(problem) for problem in problems))


# --------------------------------------------------------------------------------------------
# What each key means: used for unknown keys, missing keys and bad values alike
# --------------------------------------------------------------------------------------------

# Keys an operator may write at each level (computed fields such as visits_csv are not input).
_ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "campaign",
        "instrument",
        "skymap",
        "survey",
        "hub",
        "sites",
        "partition",
        "pipeline",
        "steps",
        "inputs",
        "temporaries",
        "pvi",
    ),
    "skymap": (
        "name",
        "rings",
        "builder",
        "pixel_scale",
        "tract_overlap",
        "ra_start",
        "patch_inner",
        "patch_border",
    ),
    "survey": ("preset", "seed", "visits", "butler", "where"),
    "sites.*": ("compute_site", "cloud", "share"),
    "partition": ("policy",),
    "pipeline": ("yaml",),
    "inputs": ("raws", "calibs", "extra"),
    "steps[]": ("name", "subset", "shard", "placement", "group"),
    "steps[].group": ("visits", "tracts", "patches"),
}


@dataclass(frozen=True)
class _Help:
    expect: str  # what a valid value looks like ("must be ...")
    example: str  # a line to add when the key is missing
    fix: str  # how to fix a bad value


_SHARE_FIX = "set each site's share to its fraction of the work; the shares must sum to 1."

_HELP: dict[str, _Help] = {
    "": _Help(
        "the top level must be a mapping of the keys " + ", ".join(_ALLOWED_KEYS[""]),
        "",
        "write the spec as in DESIGN.md section 7, starting with 'campaign: <name>'.",
    ),
    "campaign": _Help(
        "must be lower-case letters, digits and '-' only",
        "campaign: dc2-test-med-1",
        "rename the campaign using only a-z, 0-9 and '-', e.g. 'dc2-test-med-1'.",
    ),
    "instrument": _Help(
        "must be one of " + ", ".join(INSTRUMENTS),
        "instrument: LSSTCam",
        "set instrument to " + ", ".join(INSTRUMENTS[:-1]) + " or " + INSTRUMENTS[-1] + ", or "
        "read the survey from a registry ('survey: {butler: REPO}') to plan any instrument "
        "registered there.",
    ),
    "skymap": _Help(
        "must be a mapping {name, rings, builder} (optionally pixel_scale, tract_overlap, "
        "ra_start, patch_inner, patch_border)",
        "skymap: {name: lsst_cells_v1, rings: 120, builder: cells}",
        "write it as e.g. '{name: lsst_cells_v1, rings: 120, builder: cells}'.",
    ),
    "skymap.name": _Help(
        "must be a non-empty string",
        "name: lsst_cells_v1",
        "set it to the skymap's name, e.g. 'lsst_cells_v1' or 'DC2_cells_v1'.",
    ),
    "skymap.rings": _Help(
        "must be a whole number >= 1",
        "rings: 120",
        "set it to the skymap's numRings (120 for lsst_cells_v1 and DC2_cells_v1).",
    ),
    "skymap.builder": _Help(
        "must be 'cells' or 'legacy'",
        "builder: cells",
        "use 'cells' for the *_cells_v1 skymaps (10x10 patches) or 'legacy' (7x7 patches).",
    ),
    "skymap.pixel_scale": _Help(
        "must be a number > 0 (arcseconds per pixel)",
        "pixel_scale: 0.2",
        "set it to the skymap's pixelScale in arcsec, e.g. 0.2 (the default) or 0.168 (HSC), "
        "or leave it out.",
    ),
    "skymap.tract_overlap": _Help(
        "must be a number >= 0 (degrees)",
        "tract_overlap: 0.016666666666666666",
        "set it to the skymap's tractOverlap in degrees; the default 1/60 is "
        "0.016666666666666666 (write all the digits: the hash uses the exact float), or leave "
        "it out.",
    ),
    "skymap.ra_start": _Help(
        "must be a number in [0, 360) (degrees)",
        "ra_start: 0.0",
        "set it to the skymap's raStart in degrees, e.g. 0.0 (the default), or leave it out.",
    ),
    "skymap.patch_inner": _Help(
        "must be a whole number > 0 (pixels)",
        "patch_inner: 4000",
        "set it to the patch inner size in pixels (defaults: 3000 cells, 4000 legacy), or leave "
        "it out.",
    ),
    "skymap.patch_border": _Help(
        "must be a whole number >= 0 (pixels)",
        "patch_border: 100",
        "set it to the patch border in pixels (defaults: 200 cells, 100 legacy), or leave it out.",
    ),
    "survey": _Help(
        "must be a mapping {preset, seed, visits}",
        "survey: {preset: dc2-test-med-1, seed: 1}",
        "write it as e.g. '{preset: dc2-test-med-1, seed: 1}' or '{visits: path/to/visits.csv}'.",
    ),
    "survey.preset": _Help(
        "must be one of " + ", ".join(SURVEY_PRESETS),
        "preset: dc2-test-med-1",
        "use one of " + ", ".join(SURVEY_PRESETS) + ", or give 'visits: path/to/visits.csv'.",
    ),
    "survey.seed": _Help(
        "must be a whole number",
        "seed: 1",
        "set seed to a whole number such as 1.",
    ),
    "survey.visits": _Help(
        "must be a positive whole number (to sub-sample a preset) or the path of a visits CSV",
        "visits: path/to/visits.csv",
        "give a visit count such as 240000 with a preset, or a CSV path relative to the spec.",
    ),
    "survey.butler": _Help(
        "must be a Butler repository: a path relative to the spec, or a URI",
        "butler: path/to/repo",
        "give the repository root (or its butler.yaml) relative to the spec, or a URI such as "
        "'postgresql://host/db' or 's3://bucket/repo/butler.yaml'.",
    ),
    "survey.where": _Help(
        "must be a Butler query expression",
        "where: \"band IN ('g', 'r')\"",
        "write a daf_butler query expression, e.g. \"band = 'r' AND visit > 1000\", or remove "
        "'where' to take every visit of the instrument.",
    ),
    "hub": _Help(
        "must be the name of one of the sites",
        "hub: USDF",
        "set hub to the site that gathers and holds every published product.",
    ),
    "sites": _Help(
        "must be a mapping of site name to {compute_site, cloud, share}",
        "sites: {USDF: {compute_site: SLAC, cloud: US, share: 1.0}}",
        "write one entry per site, e.g. 'USDF: {compute_site: SLAC, cloud: US, share: 0.35}'.",
    ),
    "sites.*": _Help(
        "must be a mapping {compute_site, cloud, share}",
        "",
        "write it as e.g. '{compute_site: SLAC, cloud: US, share: 0.35}'.",
    ),
    "sites.*.compute_site": _Help(
        "must be a string",
        "compute_site: SLAC",
        "set it to the site's BPS computeSite, e.g. SLAC, CC-IN2P3, LANCS or RAL.",
    ),
    "sites.*.cloud": _Help(
        "must be a non-empty string",
        "cloud: US",
        "set it to the site's BPS computeCloud, e.g. US or EU.",
    ),
    "sites.*.share": _Help(
        "must be a number in (0, 1]",
        "share: 0.35",
        _SHARE_FIX,
    ),
    "partition": _Help(
        "must be a mapping {policy}",
        "partition: {policy: dec-bands}",
        "write it as '{policy: dec-bands}' or '{policy: patch-bands}'.",
    ),
    "partition.policy": _Help(
        "must be 'dec-bands' or 'patch-bands'",
        "policy: dec-bands",
        "use 'dec-bands' (whole tracts in declination bands) or 'patch-bands'.",
    ),
    "pipeline": _Help(
        "must be a mapping {yaml}",
        "pipeline: {yaml: pipelines/DRP-mock.yaml}",
        "write it as e.g. '{yaml: pipelines/DRP-mock.yaml}'.",
    ),
    "pipeline.yaml": _Help(
        "must be the path of the pipeline YAML",
        "yaml: pipelines/DRP-mock.yaml",
        "give the pipeline file relative to the spec or to the repository root.",
    ),
    "inputs": _Help(
        "must be a mapping {raws, calibs, extra}",
        "inputs: {raws: LSSTCam/raw/all, calibs: LSSTCam/calib, extra: [skymaps]}",
        "name the hub's input collections, e.g. '{raws: LSSTCam/raw/all, calibs: "
        "LSSTCam/calib, extra: [skymaps, refcats]}'.",
    ),
    "inputs.raws": _Help(
        "must be the name of a collection of the hub's repository",
        "raws: LSSTCam/raw/all",
        "give the hub's collection of raws, e.g. 'LSSTCam/raw/all' (default "
        "'<instrument>/raw/all').",
    ),
    "inputs.calibs": _Help(
        "must be the name of a collection of the hub's repository",
        "calibs: LSSTCam/calib",
        "give the hub's calibration collection (usually CHAINED), e.g. 'LSSTCam/calib' "
        "(default '<instrument>/calib').",
    ),
    "inputs.extra": _Help(
        "must be a list of collection names of the hub's repository",
        "extra: [skymaps]",
        "list the other input collections every site needs, e.g. '[skymaps, refcats]'.",
    ),
    "temporaries": _Help(
        "must be a list of dataset type names",
        "temporaries: [postISRCCD, directWarp]",
        "list the dataset types that stay at the site that made them (never published), "
        "e.g. '[post_isr_image, direct_warp, psf_matched_warp]'.",
    ),
    "pvi": _Help(
        "must be a dataset type name",
        "pvi: calexp",
        "name the pipeline's processed visit image dataset type (e.g. 'calexp', "
        "'preliminary_visit_image'): the overlap transfers the plan predicts.",
    ),
    "steps": _Help(
        "must be a non-empty list of steps",
        "steps: [{name: step1, subset: step1, shard: visit, placement: per-site}]",
        "list the steps in order, e.g. '- {name: step1, subset: step1, shard: visit, "
        "placement: per-site}'.",
    ),
    "steps[]": _Help(
        "must be a mapping {name, subset, shard, placement}",
        "",
        "write it as e.g. '{name: step1, subset: step1, shard: visit, placement: per-site}'.",
    ),
    "steps[].name": _Help(
        "must be a non-empty string",
        "name: step1",
        "give the step a name, e.g. 'step1'.",
    ),
    "steps[].subset": _Help(
        "must be a non-empty string",
        "subset: step1",
        "set it to the pipeline subset label the step runs, e.g. 'step1'.",
    ),
    "steps[].shard": _Help(
        "must be 'visit', 'tract' or 'none'",
        "shard: visit",
        "use 'visit' or 'tract' for per-site steps and 'none' for gathered steps.",
    ),
    "steps[].placement": _Help(
        "must be 'per-site' or 'gather'",
        "placement: per-site",
        "use 'per-site' (each site runs its share) or 'gather' (runs once at the hub).",
    ),
    "steps[].group": _Help(
        "must be a mapping with one of visits, tracts or patches",
        "group: {visits: 500}",
        "write e.g. 'group: {visits: 500}' for a visit-sharded step or 'group: {tracts: 10}' "
        "for a tract-sharded one.",
    ),
    "steps[].group.visits": _Help(
        "must be a whole number of at least 1",
        "visits: 500",
        "give the most visits one group may hold, e.g. 500.",
    ),
    "steps[].group.tracts": _Help(
        "must be a whole number of at least 1",
        "tracts: 10",
        "give the most tracts one group may hold, e.g. 10.",
    ),
    "steps[].group.patches": _Help(
        "must be a whole number of at least 1",
        "patches: 100",
        "give the most patches one group may hold, e.g. 100.",
    ),
}

# Choices for did-you-mean on enumerated values.
_CHOICES: dict[str, tuple[str, ...]] = {
    "instrument": INSTRUMENTS,
    "skymap.builder": ("cells", "legacy"),
    "survey.preset": SURVEY_PRESETS,
    "partition.policy": ("dec-bands", "patch-bands"),
    "steps[].shard": ("visit", "tract", "none"),
    "steps[].placement": ("per-site", "gather"),
}


def _key(loc: Iterable[str | int]) -> tuple[str, str]:
    """Turn a location into ``(key path, pattern)``: ``sites.FrDF.share`` / ``sites.*.share``."""
    key = ""
    pattern = ""
    parent: str | int | None = None
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            pattern += "[]"
        elif parent == "sites" and pattern == "sites":
            key += f".{part}"
            pattern += ".*"
        else:
            key += f".{part}" if key else str(part)
            pattern += f".{part}" if pattern else str(part)
        parent = part
    return key, pattern


def _missing(key: str, pattern: str) -> Problem:
    help_ = _HELP.get(pattern)
    leaf = key.rsplit(".", 1)[-1]
    parent = key[: -len(leaf) - 1] if "." in key else ""
    example = help_.example if help_ else f"{leaf}: ..."
    where = f" under '{parent}'" if parent else ""
    return Problem(key, "required key is missing", f"add '{example}'{where}.")


def _bad_value(key: str, pattern: str, value: object) -> Problem:
    help_ = _HELP.get(pattern)
    expect = help_.expect if help_ else "has the wrong type"
    fix = help_.fix if help_ else "see DESIGN.md section 7."
    hint = _did_you_mean(value, _CHOICES.get(pattern, ()))
    if hint is not None and hint != value:
        expect += f" (did you mean {hint!r}?)"
        fix = f"use {hint!r}."
    return Problem(key, expect, fix, value=value)


# --------------------------------------------------------------------------------------------
# Checks on the raw YAML data (so every problem can be reported with its exact key)
# --------------------------------------------------------------------------------------------


def _unknown_keys(data: Mapping[Any, Any]) -> list[Problem]:
    """Unknown keys at every level, each with a did-you-mean if one is close."""
    problems: list[Problem] = []

    def check(section: object, loc: tuple[str | int, ...]) -> None:
        if not isinstance(section, Mapping):
            return
        _, pattern = _key(loc)
        allowed = _ALLOWED_KEYS[pattern]
        for name in section:
            if name in allowed:
                continue
            key, _ = _key((*loc, str(name)))
            hint = _did_you_mean(name, allowed)
            if hint is not None and hint not in section:
                reason = f"unknown key {str(name)!r} (did you mean {hint!r}?)"
                fix = f"rename {str(name)!r} to {hint!r}."
            else:
                reason = f"unknown key {str(name)!r}; the keys allowed here are " + ", ".join(
                    allowed
                )
                fix = f"remove {str(name)!r} or rename it to one of the allowed keys."
            rename_to = _key((*loc, hint))[0] if hint is not None and hint not in section else None
            problems.append(Problem(key, reason, fix, rename_to=rename_to))

    check(data, ())
    for section in ("skymap", "survey", "partition", "pipeline", "inputs"):
        check(data.get(section), (section,))
    sites = data.get("sites")
    if isinstance(sites, Mapping):
        for name, site in sites.items():
            check(site, ("sites", str(name)))
    steps = data.get("steps")
    if isinstance(steps, list):
        for index, step in enumerate(steps):
            check(step, ("steps", index))
            if isinstance(step, Mapping):
                check(step.get("group"), ("steps", index, "group"))
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _survey_problems(survey: object, key: str) -> list[Problem]:
    """Exactly one visit source: a preset (optionally with a count) or a CSV path."""
    if not isinstance(survey, Mapping):
        return []
    preset = survey.get("preset")
    visits = survey.get("visits")
    butler = survey.get("butler")
    if butler is not None:
        return _registry_survey_problems(survey, key)
    if survey.get("where") is not None:
        return [
            Problem(
                f"{key}.where",
                "a query only selects visits of a Butler registry",
                "add 'butler: path/to/repo' to read the visits from a registry, or remove 'where'.",
                value=survey.get("where"),
            )
        ]
    if preset is None and visits is None:
        return [
            Problem(
                key,
                "needs a preset or a visits CSV",
                f"add 'preset: {SURVEY_PRESETS[0]}' (or {', '.join(SURVEY_PRESETS[1:])}) or "
                "'visits: path/to/visits.csv'.",
                value=dict(survey),
            )
        ]
    if preset is not None and isinstance(visits, str):
        return [
            Problem(
                key,
                "give either a preset or a visits CSV, not both",
                "remove 'preset' to use the CSV, or remove 'visits' to use the preset.",
                value=dict(survey),
            )
        ]
    if preset is None and _is_number(visits):
        return [
            Problem(
                f"{key}.visits",
                "a visit count only sub-samples a preset",
                "add 'preset: dr1' (or another preset), or give 'visits: path/to/visits.csv'.",
                value=visits,
            )
        ]
    return []


def _skymap_problems(skymap: object, key: str) -> list[Problem]:
    """Cells-builder patch sizes must be whole cells (see `skyconfig.cell_layout`)."""
    if not isinstance(skymap, Mapping) or skymap.get("builder", "cells") != "cells":
        return []
    defaults = builder_defaults("cells")
    problems: list[Problem] = []
    for name, minimum in (("patch_inner", 1), ("patch_border", 0)):
        value = skymap.get(name)
        # Only well-typed values in range: the field checks report the others.
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            continue
        sizes = {"patch_inner": int(defaults["patch_inner"])}
        sizes["patch_border"] = int(defaults["patch_border"])
        sizes[name] = value
        try:
            cell_layout(sizes["patch_inner"], sizes["patch_border"])
        except ValueError as exc:
            problems.append(
                Problem(
                    f"{key}.{name}",
                    str(exc),
                    f"use a size the cells builder can make ({CELL_INNER} px cells, "
                    f"{CELL_BORDER} px cell border), or 'builder: legacy' for other patch sizes.",
                    value=value,
                )
            )
    return problems


def _registry_survey_problems(survey: Mapping[Any, Any], key: str) -> list[Problem]:
    """A registry survey (``butler: REPO``) takes no other visit source."""
    others = [name for name in SURVEY_SOURCES if name != "butler" and survey.get(name) is not None]
    if others:
        listed = " and ".join(f"'{name}'" for name in others)
        return [
            Problem(
                key,
                "give exactly one visit source (preset, visits or butler), not "
                + " and ".join(["butler", *others]),
                f"remove {listed} to read the visits from the registry, or remove 'butler' "
                "(and 'where').",
                value=dict(survey),
            )
        ]
    where = survey.get("where")
    if isinstance(where, str) and not where.strip():
        return [
            Problem(
                f"{key}.where",
                "the query is empty",
                "remove 'where' to take every visit of the instrument, or write a query such "
                "as \"band = 'r'\".",
                value=where,
            )
        ]
    return []


def _instrument_problems(data: Mapping[Any, Any]) -> list[Problem]:
    """Presets and CSVs need one of our focal-plane models; a registry survey does not."""
    instrument = data.get("instrument")
    survey = data.get("survey")
    registry = isinstance(survey, Mapping) and survey.get("butler") is not None
    if isinstance(instrument, str) and instrument and not registry:
        if instrument not in INSTRUMENTS:
            return [_bad_value("instrument", "instrument", instrument)]
    return []


def _group_problems(steps: object) -> list[Problem]:
    """A step's ``group`` has one bound, and one that fits how the step is sharded."""
    if not isinstance(steps, list):
        return []
    problems: list[Problem] = []
    for index, step in enumerate(steps):
        if not isinstance(step, Mapping) or not isinstance(step.get("group"), Mapping):
            continue
        group = step["group"]
        key = f"steps[{index}].group"
        given = [name for name in ("visits", "tracts", "patches") if group.get(name) is not None]
        shard, placement = step.get("shard"), step.get("placement")
        fits = {"visit": ["visits"], "tract": ["tracts", "patches"]}.get(str(shard), [])
        if placement != "gather" and not fits:
            continue  # an unknown shard is reported at steps[i].shard
        if placement == "gather" or shard == "none":
            problems.append(
                Problem(
                    key,
                    "a gathered step runs as one group",
                    "remove 'group' from this step.",
                    value=dict(group),
                )
            )
        elif len(given) != 1:
            problems.append(
                Problem(
                    key,
                    "give exactly one bound, not " + (" and ".join(given) or "none"),
                    f"keep one of {', '.join(fits)}, e.g. 'group: {{{fits[0]}: "
                    f"{500 if fits[0] == 'visits' else 10}}}'.",
                    value=dict(group),
                )
            )
        elif given[0] not in fits:
            problems.append(
                Problem(
                    f"{key}.{given[0]}",
                    f"a {shard}-sharded step is cut by {' or '.join(fits)}, not {given[0]}",
                    f"use 'group: {{{fits[0]}: N}}', or change the step's shard.",
                    value=group[given[0]],
                )
            )
    return problems


def _cross_problems(data: Mapping[Any, Any]) -> list[Problem]:
    """Rules that span keys. Written against raw data so they run even if other keys are bad."""
    problems: list[Problem] = _skymap_problems(data.get("skymap"), "skymap")
    problems.extend(_instrument_problems(data))
    problems.extend(_group_problems(data.get("steps")))
    sites = data.get("sites")
    if isinstance(sites, Mapping):
        names = list(sites)
        for name in names:
            if not (isinstance(name, str) and _SITE_NAME_RE.fullmatch(name)):
                problems.append(
                    Problem(
                        f"sites.{name}",
                        "a site name must start with a letter and contain only letters, "
                        "digits, '_' and '-'",
                        "rename the site (and quote it if YAML reads it as a number or a "
                        "boolean, e.g. 'NO' or 'on').",
                        value=name,
                    )
                )
        if not 1 <= len(names) <= MAX_SITES:
            listed = f" ({', '.join(map(str, names))})" if names else ""
            problems.append(
                Problem(
                    "sites",
                    f"a campaign has 1 to {MAX_SITES} sites",
                    "add a site."
                    if not names
                    else f"merge or drop sites until {MAX_SITES} remain.",
                    shown=f"{len(names)} sites{listed}",
                )
            )
        shares = [
            site.get("share") if isinstance(site, Mapping) else None for site in sites.values()
        ]
        if names and all(_is_number(share) for share in shares):
            total = math.fsum(shares)  # type: ignore[arg-type]
            if abs(total - 1.0) > SHARE_TOLERANCE:
                terms = " + ".join(
                    f"{name} {share!r}" for name, share in zip(names, shares, strict=True)
                )
                problems.append(
                    Problem(
                        "sites",
                        "the shares must sum to 1 (within 1e-6)",
                        _SHARE_FIX,
                        shown=f"shares summing to {total:.9g} ({terms})",
                    )
                )
        hub = data.get("hub")
        if isinstance(hub, str) and names and hub not in sites:
            site_list = ", ".join(map(str, names))
            hint = _did_you_mean(hub, [name for name in names if isinstance(name, str)])
            if hint is not None:
                problems.append(
                    Problem(
                        "hub",
                        f"the hub must be one of the sites ({site_list}) (did you mean {hint!r}?)",
                        f"set hub to {hint!r}.",
                        value=hub,
                    )
                )
            else:
                problems.append(
                    Problem(
                        "hub",
                        f"the hub must be one of the sites ({site_list})",
                        "set hub to the site that gathers and holds every published product, "
                        "or add that site under 'sites'.",
                        value=hub,
                    )
                )
    problems.extend(_survey_problems(data.get("survey"), "survey"))
    steps = data.get("steps")
    if isinstance(steps, list):
        first_seen: dict[str, int] = {}
        for index, step in enumerate(steps):
            if not isinstance(step, Mapping):
                continue
            name = step.get("name")
            if isinstance(name, str):
                if name in first_seen:
                    problems.append(
                        Problem(
                            f"steps[{index}].name",
                            f"step names must be unique; steps[{first_seen[name]}] has it too",
                            "rename one of the two steps.",
                            value=name,
                        )
                    )
                else:
                    first_seen[name] = index
            shard, placement = step.get("shard"), step.get("placement")
            # Gathered steps run once at the hub on everything (DESIGN.md section 1), so they
            # have no sharding dimension, and a step without one can only run gathered.
            if placement == "gather" and shard in ("visit", "tract"):
                problems.append(
                    Problem(
                        f"steps[{index}].shard",
                        "a gather step runs once at the hub on everything, so its shard must be "
                        "'none'",
                        "set 'shard: none', or 'placement: per-site' to split the step by "
                        f"{shard}.",
                        value=shard,
                    )
                )
            elif shard == "none" and placement == "per-site":
                problems.append(
                    Problem(
                        f"steps[{index}].placement",
                        "a step with shard 'none' is global and runs once at the hub, so its "
                        "placement must be 'gather'",
                        "set 'placement: gather', or shard the step by 'visit' or 'tract'.",
                        value=placement,
                    )
                )
    return problems


def _pydantic_problems(error: ValidationError) -> list[Problem]:
    """Translate pydantic's errors into Problems with our key paths and wording."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for item in error.errors():
        loc = item["loc"]
        # Unknown keys and site-name keys are reported by our own checks, with better hints.
        if item["type"] == "extra_forbidden" or "[key]" in loc:
            continue
        # Union members add their type name to loc (visits -> int / str); the field is the key.
        if loc[:2] == ("survey", "visits"):
            loc = loc[:2]
        key, pattern = _key(loc)
        if key in seen:
            continue
        seen.add(key)
        if item["type"] == "missing":
            problems.append(_missing(key, pattern))
        else:
            problems.append(_bad_value(key, pattern, item.get("input")))
    return problems


# --------------------------------------------------------------------------------------------
# Files referenced by the spec
# --------------------------------------------------------------------------------------------


def _repo_root(start: Path) -> Path | None:
    for directory in (start, *start.parents):
        if (directory / "pyproject.toml").is_file():
            return directory
    return None


def _resolve_pipeline(yaml_name: str, base: Path) -> Path:
    """Spec directory first, then each parent up to the repository root (see module doc)."""
    relative = Path(yaml_name).expanduser()
    if relative.is_absolute():
        return relative
    root = _repo_root(base)
    candidates = [base]
    if root is not None:
        candidates.extend(parent for parent in base.parents if parent.is_relative_to(root))
    for directory in candidates:
        if (directory / relative).is_file():
            return directory / relative
    return (root if root is not None else base) / relative


def visits_csv_problem(error: VisitsCsvError, value: object) -> Problem:
    """The `Problem` at ``survey.visits`` for a bad visits CSV.

    Parameters
    ----------
    error : `drp_campaign.model.survey.VisitsCsvError`
        What `drp_campaign.model.survey.read_visits_csv` (or the header check) found.
    value : `object`
        ``survey.visits`` as the spec gives it.

    Returns
    -------
    problem : `Problem`
        Naming the CSV file, its line and column, and the fix.
    """
    return Problem("survey.visits", f"{error.where}: {error.problem}", f"{error.fix}.", value=value)


def resolve_butler(repo: str, base: Path) -> str:
    """Where ``survey.butler`` points: a URI as written, a path resolved against ``base``.

    Parameters
    ----------
    repo : `str`
        The value of ``survey.butler``: a URI with a scheme (``postgresql://``, ``s3://``,
        ``file://``, ...), or a path to a repository root or its ``butler.yaml``.
    base : `pathlib.Path`
        The directory of the spec file.

    Returns
    -------
    uri : `str`
        The URI unchanged, or the absolute path.
    """
    if _URI_RE.match(repo):
        return repo
    return str((base / Path(repo).expanduser()).resolve())


def _check_visits_csv(path: Path, value: str) -> Problem | None:
    # Only the header: the loader runs wherever a spec is loaded (every flow, every task), and
    # the whole file is checked once, before a run or plan starts (read_visits_csv). Imported
    # here: the survey module brings pandas, which loading a spec does not otherwise need.
    from .survey import VisitsCsvError, check_visits_csv_header

    try:
        check_visits_csv_header(path)
    except VisitsCsvError as error:
        return visits_csv_problem(error, value)
    return None


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: two sites with one name must not silently merge."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first[key] + 1})",
                    key_node.start_mark,
                )
            first[key] = key_node.start_mark.line
        except TypeError:
            continue  # unhashable key: construct_mapping below reports it
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> Problem:
    fix = (
        "correct the YAML there (indentation, a ':' after each key, matching brackets in "
        "{...} and [...], quotes around values containing ': ' or '#')."
    )
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{exc.context}, {problem}"
        if problem.startswith("duplicate key"):
            fix = "remove or rename one of the two entries."
        return Problem(where, f"YAML syntax error: {problem}", fix)
    return Problem("", f"YAML syntax error: {exc}", fix)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def parse_spec(
    text: str, source: str | Path | None = None, *, check_files: bool = False
) -> CampaignSpec:
    """Parse and validate a campaign spec given as YAML text.

    Parameters
    ----------
    text : `str`
        The YAML text (DESIGN.md section 7).
    source : `str` or `pathlib.Path`, optional
        The file the text came from. It names the file in error messages and is the base for
        relative paths; without it the current directory is the base.
    check_files : `bool`, optional
        Also require the pipeline YAML to exist. The visits CSV, if any, is always checked.

    Returns
    -------
    spec : `CampaignSpec`
        The validated spec, with ``survey.visits_csv``, ``pipeline.yaml_path`` and ``source``
        resolved to absolute paths.

    Raises
    ------
    SpecError
        Listing every problem found, each with its key, value and fix.
    """
    shown_path = None if source is None else str(source)
    base = Path(source).resolve().parent if source is not None else Path.cwd()

    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_problem(exc)], shown_path) from None
    if data is None:
        raise SpecError(
            [Problem("", "the file is empty", _HELP[""].fix)],
            shown_path,
        )
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the value {_show(data)}"
        raise SpecError(
            [Problem("", f"{_HELP[''].expect}, not {kind}", _HELP[""].fix)],
            shown_path,
        )

    problems = _unknown_keys(data)
    # A misspelt key also leaves the real key missing; the rename hint already covers that.
    renamed = {problem.rename_to for problem in problems if problem.rename_to}

    # Pydantic sees only known keys (reported above otherwise) and string site names (checked in
    # _cross_problems), plus the paths we resolve here.
    clean: dict[str, Any] = {k: v for k, v in data.items() if k in _ALLOWED_KEYS[""]}
    for section in ("skymap", "survey", "partition", "pipeline"):
        value = clean.get(section)
        if isinstance(value, dict):
            clean[section] = {k: v for k, v in value.items() if k in _ALLOWED_KEYS[section]}
    if isinstance(clean.get("sites"), dict):
        clean["sites"] = {
            str(name): (
                {k: v for k, v in site.items() if k in _ALLOWED_KEYS["sites.*"]}
                if isinstance(site, dict)
                else site
            )
            for name, site in clean["sites"].items()
        }
    if isinstance(clean.get("steps"), list):
        clean["steps"] = [
            {
                k: (
                    {g: n for g, n in v.items() if g in _ALLOWED_KEYS["steps[].group"]}
                    if k == "group" and isinstance(v, dict)
                    else v
                )
                for k, v in step.items()
                if k in _ALLOWED_KEYS["steps[]"]
            }
            if isinstance(step, dict)
            else step
            for step in clean["steps"]
        ]

    survey = clean.get("survey")
    if isinstance(survey, dict) and isinstance(survey.get("visits"), str):
        visits = survey["visits"]
        if visits.strip() and survey.get("preset") is None:
            csv_path = (base / Path(visits).expanduser()).resolve()
            survey["visits_csv"] = csv_path
            csv_problem = _check_visits_csv(csv_path, visits)
            if csv_problem is not None:
                problems.append(csv_problem)

    if isinstance(survey, dict) and isinstance(survey.get("butler"), str) and survey["butler"]:
        survey["butler_uri"] = resolve_butler(survey["butler"], base)

    pipeline = clean.get("pipeline")
    if isinstance(pipeline, dict) and isinstance(pipeline.get("yaml"), str) and pipeline["yaml"]:
        yaml_path = _resolve_pipeline(pipeline["yaml"], base).resolve()
        pipeline["yaml_path"] = yaml_path
        if check_files and not yaml_path.is_file():
            problems.append(
                Problem(
                    "pipeline.yaml",
                    f"file not found: {yaml_path}",
                    "give the pipeline YAML relative to the spec's directory or to the "
                    "repository root.",
                    value=pipeline["yaml"],
                )
            )
    if source is not None:
        clean["source"] = Path(source).resolve()

    spec: CampaignSpec | None = None
    try:
        spec = CampaignSpec.model_validate(clean, context={_LOADER_CONTEXT: True})
    except ValidationError as exc:
        problems.extend(
            problem
            for problem in _pydantic_problems(exc)
            if problem.has_value or problem.key not in renamed
        )
    problems.extend(_cross_problems(data))

    if problems or spec is None:
        raise SpecError(problems, shown_path)
    return spec


def load_spec(path: str | Path, *, check_files: bool = False) -> CampaignSpec:
    """Load and validate a campaign spec file.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The spec file, e.g. ``deployments/campaigns/dc2-test-med-1.yaml``. Error messages name it
        as given.
    check_files : `bool`, optional
        Also require the pipeline YAML to exist (see the module docstring for how it is found).

    Returns
    -------
    spec : `CampaignSpec`
        The validated spec; ``source`` is the absolute path of the file.

    Raises
    ------
    SpecError
        If the file cannot be read or the spec is invalid; the message lists every problem.
    """
    file = Path(path)
    if not file.is_file():
        reason = "is a directory, not a spec file" if file.is_dir() else "file not found"
        raise SpecError(
            [
                Problem(
                    "",
                    reason,
                    "check the path; the shipped specs are in deployments/campaigns/.",
                )
            ],
            str(path),
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(
            [Problem("", f"cannot read the file: {exc}", "make it a readable UTF-8 YAML file.")],
            str(path),
        ) from None
    return parse_spec(text, file, check_files=check_files)
