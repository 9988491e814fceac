"""The stages of one group of a site-step, one small module each, and their scheduler.

Each stage is a function of the `drp_campaign.campaign.CampaignRun` (the repositories,
catalog, workload services and ledger) and one `drp_campaign.model.units.WorkUnit` (the
group's query, names and paths, resolved once). `sitestep.run_site_step` runs a site-step's
groups: their graphs are built on the Dask client while earlier groups run, with at most the
site's ``groups_in_flight`` submitted at once.

==========  ===============================================================================
stage       `inputs.stage_inputs`: the inputs the group's graph needs that the site lacks.
bps         `bps.write_submit`: the group's BPS submit file.
build       `build.build_graph`: the group's QuantumGraph, built against the site's repo.
submit      `submit.submit_and_wait`: the workload service runs it; a rerun polls it.
publish     `publish.publish`: the group's products registered, with a rule to the hub.
arrive      `publish.arrive`: closed loop, until the hub has ingested every product.
==========  ===============================================================================
"""

from .errors import GroupFailure, Skip
from .sitestep import PHASES, STAGES, run_site_step

__all__ = ["PHASES", "STAGES", "GroupFailure", "Skip", "run_site_step"]
