"""Checks of what a campaign spec refers to, run before a plan or a run starts.

Loading a spec (`drp_campaign.model.spec.load_spec`) validates the YAML and, cheaply, the header
of a visits CSV; it runs in every flow and task. `preflight` checks the rest once, before
anything is written or moved: every line of the visits CSV (or the preset's visit count), the
pipeline file and the subset of every step. Its errors are `SpecError`, like the loader's, so
``drp-campaign validate``, ``plan`` and ``run`` exit 2 with the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .backends.pipeline import check_pipeline
from .model.spec import CampaignSpec, Problem, SpecError, visits_csv_problem
from .model.survey import VisitsCsvError, survey_from_spec

__all__ = ["preflight"]


def preflight(spec: CampaignSpec, path: str | Path | None = None) -> pd.DataFrame | None:
    """Check the spec's visit table and pipeline; return the visit table.

    Parameters
    ----------
    spec : `CampaignSpec`
        A loaded spec.
    path : `str` or `pathlib.Path`, optional
        The spec file as the operator named it, for the messages; default ``spec.source``.

    Returns
    -------
    visits : `pandas.DataFrame` or `None`
        The campaign's visit table (`drp_campaign.model.survey.survey_from_spec`), so that a
        caller that plans need not read the CSV again; `None` for a registry survey, which the
        planner reads (and checks) itself, in pages.

    Raises
    ------
    SpecError
        Listing every problem: a bad line of the visits CSV (file, line, column and fix) or a
        preset count out of range at ``survey.visits``, a missing or unreadable pipeline at
        ``pipeline.yaml``, a subset the pipeline lacks at ``steps[i].subset``.
    """
    problems: list[Problem] = []
    visits: pd.DataFrame | None = None
    try:
        if not spec.survey.is_registry:
            visits = survey_from_spec(spec)
    except VisitsCsvError as exc:
        problems.append(visits_csv_problem(exc, spec.survey.visits))
    except ValueError as exc:  # make_survey: a count the preset cannot give
        reason, _, fix = str(exc).partition("; fix: ")
        problems.append(
            Problem(
                "survey.visits",
                reason,
                f"{fix}." if fix else "see DESIGN.md section 7.",
                value=spec.survey.visits,
            )
        )
    problems.extend(check_pipeline(spec))
    if problems:
        raise SpecError(problems, path if path is not None else spec.source)
    return visits
