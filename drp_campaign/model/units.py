"""Units of work: one group of one step at one site, in one attempt, resolved once.

Every stage of a site-step (stage, bps, build, submit, publish, arrive) works on a `WorkUnit`:
a value that carries the group's data query and every name and relative path the stages use,
computed here from the spec, the group and the attempt number, so no stage re-derives them and
a rerun finds the same names. This module is pure: no Butler, no Prefect, no I/O.

Names (``{g}`` is the group's name, ``g000``; attempt ``n`` >= 1 adds ``-attempt{n}``):

==================  ===========================================================================
output run          ``{campaign}/{step}/{site}/{g}``, chained into ``{campaign}/{site}/output``
graph               ``graphs/{step}/{site}/{g}.qg`` in the site's repository (it ships from there)
submit file         ``submit/{site}/{site}-{step}-{g}.yaml`` in the work directory
submit path         ``submit/{site}/{step}/{g}`` (BPS's ``submitPath``)
products dataset    ``{campaign}/products/{step}/{site}/{g}`` (catalog dataset, ruled to the hub)
staged dataset      ``{campaign}/stage/{step}/{site}/{g}`` (inputs moved to the site)
==================  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .bps import data_query, output_collection, payload_name
from .groups import Group
from .spec import CampaignSpec

__all__ = ["WorkUnit", "work_unit"]


@dataclass(frozen=True)
class WorkUnit:
    """One group of one step at one site, in one attempt: its query, names and paths.

    Attributes
    ----------
    campaign, step, site : `str`
        The site-step.
    group : `Group`
        The group (its visits or patches).
    attempt : `int`
        0, then 1, 2... after each fresh resubmission.
    subset : `str`
        The pipeline subset the step runs.
    where : `str`
        The group's data query.
    """

    campaign: str
    step: str
    site: str
    group: Group
    attempt: int
    subset: str
    where: str

    @property
    def name(self) -> str:
        """The group's name (``g003``): its ledger key within the site-step."""
        return self.group.name

    @property
    def label(self) -> str:
        """How a person (and Prefect's UI) reads it: ``step1@FrDF#003``."""
        return self.group.label

    @property
    def _leaf(self) -> str:
        return self.name if self.attempt == 0 else f"{self.name}-attempt{self.attempt}"

    @property
    def output_run(self) -> str:
        """The RUN collection of this group's attempt."""
        return f"{self.campaign}/{self.step}/{self.site}/{self._leaf}"

    @property
    def output_collection(self) -> str:
        """The site's CHAINED output collection, into which every group's run is chained."""
        return output_collection(self.campaign, self.site)

    @property
    def graph_path(self) -> str:
        """The graph's path, relative to the site's repository root."""
        return f"graphs/{self.step}/{self.site}/{self._leaf}.qg"

    @property
    def probe_path(self) -> str:
        """The staging probe's graph, relative to the work directory."""
        return f"graphs/probe/{self.step}/{self.site}/{self.name}.qg"

    @property
    def probe_run(self) -> str:
        """The (never written) output run of the staging probe's graph."""
        return f"{self.campaign}/probe/{self.step}/{self.site}/{self.name}"

    @property
    def submit_file(self) -> str:
        """The BPS submit file, relative to the work directory."""
        return f"submit/{self.site}/{self.site}-{self.step}-{self._leaf}.yaml"

    @property
    def submit_path(self) -> str:
        """BPS's ``submitPath``, relative to the work directory (one per attempt)."""
        return f"submit/{self.site}/{self.step}/{self._leaf}"

    @property
    def payload_name(self) -> str:
        """BPS's ``payloadName``: ``{campaign}-{step}-{site}-{g}``."""
        return f"{payload_name(self.campaign, self.step, self.site)}-{self.name}"

    @property
    def products_dataset(self) -> str:
        """The catalog dataset of the group's products (scope added by the caller)."""
        return f"{self.campaign}/products/{self.step}/{self.site}/{self.name}"

    @property
    def staged_dataset(self) -> str:
        """The catalog dataset of the inputs staged to the site for this group."""
        return f"{self.campaign}/stage/{self.step}/{self.site}/{self.name}"

    def rerun_hint(self) -> str:
        """The command that reruns just this group."""
        return (
            f"prefect deployment run 'drp-site-step/default' -p step={self.step} "
            f"-p site={self.site} -p group={self.name}"
        )


def work_unit(
    spec: CampaignSpec,
    group: Group,
    attempt: int = 0,
    *,
    tract_sizes: Mapping[int, int] | None = None,
) -> WorkUnit:
    """Resolve a group into its `WorkUnit`.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign.
    group : `Group`
        One of the plan's groups (`drp_campaign.model.groups.plan_groups`).
    attempt : `int`, optional
        The group's attempt.
    tract_sizes : mapping of `int` to `int`, optional
        Patches per tract: a tract whose patches are all in the group is queried as a whole
        tract (a shorter query); required to do so for tract-sharded groups.

    Returns
    -------
    unit : `WorkUnit`
    """
    step = spec.step(group.step)
    instrument, skymap = spec.instrument, spec.skymap.name
    if group.visits is not None:
        where = data_query(instrument, skymap, "visit", visits=group.visits)
    elif group.patches is not None:
        by_tract: dict[int, list[int]] = {}
        for tract, patch in group.patches:
            by_tract.setdefault(tract, []).append(patch)
        tracts: dict[int, list[int] | None] = {
            tract: None if tract_sizes and len(set(p)) == tract_sizes.get(tract) else p
            for tract, p in by_tract.items()
        }
        where = data_query(instrument, skymap, "tract", tracts=tracts)
    else:
        where = data_query(instrument, skymap, "none")
    return WorkUnit(
        campaign=spec.campaign,
        step=group.step,
        site=group.site,
        group=group,
        attempt=attempt,
        subset=step.subset,
        where=where,
    )
