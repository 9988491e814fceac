"""The pipeline a campaign spec names, checked against the spec before anything runs.

The spec loader (`drp_campaign.model.spec`) is pure and only resolves ``pipeline.yaml``; whether
that file is a pipeline and has the subsets the steps run is only known to ``lsst.pipe.base``.
Without this check a wrong file or subset label fails when the first quantum graph is built,
after the raws have been distributed to the sites.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..model.spec import CampaignSpec, Problem
from ..model.staging import StepFlow

__all__ = ["check_pipeline", "pipeline_inputs", "pipeline_labels"]

_PATH_FIX = "give the pipeline YAML relative to the spec's directory or to the repository root."


def pipeline_labels(path: str | Path) -> tuple[list[str], list[str]]:
    """Read a pipeline file and return its labeled subsets and task labels.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The pipeline YAML.

    Returns
    -------
    subsets : `list` [`str`]
        Labeled subsets, in file order.
    tasks : `list` [`str`]
        Task labels, in file order.

    Raises
    ------
    Exception
        Whatever ``lsst.pipe.base.Pipeline.from_uri`` raises for a file that is not a pipeline
        (`FileNotFoundError`, a YAML error, `KeyError`, `ValueError`, ...).
    """
    # Imported here: pipe_base takes a second to import, and the planner does not need it.
    # Reading the file imports no task class (that happens when the graph is built), so the
    # mock tasks need not be registered.
    from lsst.pipe.base import Pipeline

    pipeline: Any = Pipeline.from_uri(str(path))
    return list(pipeline.subsets), list(pipeline.task_labels)


def check_pipeline(spec: CampaignSpec) -> list[Problem]:
    """Check that the spec's pipeline file loads and has every step's subset.

    Parameters
    ----------
    spec : `CampaignSpec`
        A loaded spec (``pipeline.yaml_path`` resolved by the loader).

    Returns
    -------
    problems : `list` [`Problem`]
        Empty if all is well; otherwise one problem at ``pipeline.yaml`` (the file is missing or
        not a pipeline) or one per step at ``steps[i].subset`` whose label the pipeline lacks,
        with the closest subset as a did-you-mean. A step may also name a task label: the graph
        builder accepts ``file.yaml#label`` for either.
    """
    path = spec.pipeline.yaml_path or Path(spec.pipeline.yaml)
    shown = spec.pipeline.yaml
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "file not found"
        return [Problem("pipeline.yaml", f"{reason}: {path}", _PATH_FIX, value=shown)]
    try:
        subsets, tasks = pipeline_labels(path)
    except Exception as exc:  # pipe_base raises many kinds; the message says what is wrong
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return [
            Problem(
                "pipeline.yaml",
                f"{path} is not a pipeline lsst.pipe.base can read: {detail}",
                "fix the pipeline file (see the pipe_base pipeline YAML format), or point "
                "pipeline.yaml at another one.",
                value=shown,
            )
        ]
    problems: list[Problem] = []
    listed = ", ".join(subsets) if subsets else "none"
    for index, step in enumerate(spec.steps):
        if step.subset in subsets or step.subset in tasks:
            continue
        hint = _closest(step.subset, subsets)
        reason = f"{path.name} has no subset {step.subset!r}"
        if hint is not None:
            reason += f" (did you mean {hint!r}?)"
            fix = f"use {hint!r}."
        else:
            fix = (
                f"set it to one of the pipeline's subsets, or add a subset {step.subset!r} "
                f"under 'subsets:' in {path.name}."
            )
        reason += f"; its subsets are {listed}"
        problems.append(Problem(f"steps[{index}].subset", reason, fix, value=step.subset))
    return problems


def _closest(word: str, choices: list[str]) -> str | None:
    """The closest choice (case-insensitive), or `None`."""
    lowered = {choice.lower(): choice for choice in choices}
    matches = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[matches[0]] if matches else None


def pipeline_inputs(pipeline_uri: str, subsets: Sequence[str]) -> list[str]:
    """The overall inputs of the campaign's steps: what no task of them produces.

    Parameters
    ----------
    pipeline_uri : `str`
        The pipeline YAML.
    subsets : sequence of `str`
        The steps' subset labels.

    Returns
    -------
    names : `list` [`str`]
        Dataset type names, prerequisites included, sorted.
    """
    import lsst.pipe.base.tests.mocks  # noqa: F401  (the emulated tasks' storage classes)
    from lsst.pipe.base import Pipeline

    labels = ",".join(dict.fromkeys(subsets))
    graph = Pipeline.from_uri(f"{pipeline_uri}#{labels}").to_graph()
    return sorted(name for name, _ in graph.iter_overall_inputs())


def step_dataflow(pipeline_uri: str, subsets: Sequence[str]) -> dict[str, StepFlow]:
    """What each step reads from outside itself and what it writes, by dataset type.

    Parameters
    ----------
    pipeline_uri : `str`
        The pipeline YAML.
    subsets : sequence of `str`
        The steps' subset labels.

    Returns
    -------
    flows : `dict` [`str`, `StepFlow`]
        Subset label -> its overall inputs (prerequisites included) and its outputs.
    """
    import lsst.pipe.base.tests.mocks  # noqa: F401  (the emulated tasks' storage classes)
    from lsst.pipe.base import Pipeline

    out: dict[str, StepFlow] = {}
    for subset in dict.fromkeys(subsets):
        graph = Pipeline.from_uri(f"{pipeline_uri}#{subset}").to_graph()
        inputs = frozenset(name for name, _ in graph.iter_overall_inputs())
        outputs = frozenset(
            edge.parent_dataset_type_name
            for task in graph.tasks.values()
            for edge in task.outputs.values()
        )
        out[subset] = StepFlow(inputs, outputs)
    return out
