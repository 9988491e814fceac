"""Which steps need the staging probe: a rule on the pipeline's data flow and the spec (pure).

Before a step runs at a site, the inputs its graph needs and the site lacks must be moved
there. The general way to find them is the *probe*: build the group's graph at the hub (which
holds every published product) and compare its inputs with the site's datasets; at DR1 scale
that is a second graph per group. Most steps do not need it, and whether one does follows from
what the step reads and who made it:

- an input no step makes is a campaign input (raws, calibrations, the sky map, refcats): it
  was distributed to every site before the first step;
- an input made by an earlier per-site, visit-sharded step and read by a per-site,
  visit-sharded step was made at the same site, because visits are assigned whole;
- anything else (the overlap PVIs a tract step reads, a gathered step's outputs fanned out,
  other sites' coadd catalogs) may live elsewhere: the probe finds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .spec import CampaignSpec

__all__ = ["StepFlow", "needs_probe", "reads_only_campaign_inputs"]


@dataclass(frozen=True)
class StepFlow:
    """A step's data flow by dataset type: its overall inputs and what it writes."""

    inputs: frozenset[str]
    outputs: frozenset[str]


def needs_probe(spec: CampaignSpec, step: str, flows: Mapping[str, StepFlow]) -> bool:
    """Whether ``step`` may read, at a site, inputs that another site (or the hub) holds.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign (its steps' order, sharding and placement).
    step : `str`
        The step's name.
    flows : mapping of `str` to `StepFlow`
        Each step's data flow, keyed by its subset label
        (`drp_campaign.backends.pipeline.step_dataflow`).

    Returns
    -------
    probe : `bool`
        `False` only when every input is a campaign input or made at the same site.
    """
    names = spec.step_names
    me = spec.step(step)
    local_visit_step = me.shard == "visit" and me.placement == "per-site"
    earlier = [spec.step(s) for s in names[: names.index(step)]]
    for dataset_type in flows[me.subset].inputs:
        producers = [s for s in earlier if dataset_type in flows[s.subset].outputs]
        if not producers:
            continue  # a campaign input, distributed before the first step
        made_here = all(p.shard == "visit" and p.placement == "per-site" for p in producers)
        if not (local_visit_step and made_here):
            return True
    return False


def reads_only_campaign_inputs(
    spec: CampaignSpec, step: str, flows: Mapping[str, StepFlow]
) -> bool:
    """Whether no input of ``step`` is made by an earlier step (it reads raws, calibrations...).

    A re-plan moves raws only for the redone groups of such steps: later steps read products.
    """
    names = spec.step_names
    me = spec.step(step)
    earlier = [spec.step(s) for s in names[: names.index(step)]]
    return not any(
        dataset_type in flows[s.subset].outputs
        for dataset_type in flows[me.subset].inputs
        for s in earlier
    )
