"""Stages ``publish`` and ``arrive``: a group's products to the catalog, then to the hub.

``publish`` registers the products of the group's output run (never the spec's temporaries or
bookkeeping) as one catalog dataset with a rule to the hub. ``arrive`` closes the loop: it
returns once the hub has ingested every file, then chains the run into the hub's
``<campaign>/output`` (and its staged collection, so later steps at the hub read it).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..backends.butler import has_collection
from ..backends.ingest import register_datasets
from ..backends.interfaces import DID, rse_name

if TYPE_CHECKING:
    from ..campaign import CampaignRun
    from ..model.units import WorkUnit

__all__ = ["arrive", "publish"]


def publish(run: CampaignRun, unit: WorkUnit) -> dict[str, Any]:
    """Register the group's products in the catalog and rule them to the hub.

    Returns
    -------
    figures : `dict`
        ``files`` and ``bytes`` registered, the ``dataset``, the ``run`` and the ``rule`` id
        (none at the hub).
    """
    output = unit.output_run
    with run.butler(unit.site, writeable=False) as butler:
        refs = (
            [
                ref
                for dt in butler.registry.queryDatasetTypes()
                if run.is_product(dt.name)
                for ref in butler.query_datasets(dt, collections=output, explain=False, limit=None)
            ]
            if has_collection(butler, output)
            else []
        )
        dataset = DID(run.scope, unit.products_dataset)
        files = register_datasets(
            run.catalog,
            butler,
            refs,
            repo_root=run.repo(unit.site),
            rse=rse_name(unit.site, "butler"),
            scope=run.scope,
            dataset=dataset,
            close=True,
        )
    figures: dict[str, Any] = {
        "files": len(files),
        "bytes": sum(f.bytes for f in files),
        "dataset": str(dataset),
        "run": output,
    }
    if unit.site != run.hub and files:
        figures["rule"] = run.catalog.add_rule(dataset, rse_name(run.hub, "butler"))
        run.ledger.set_name(unit.step, unit.site, "publish_rule", figures["rule"], group=unit.name)
    return figures


def arrive(run: CampaignRun, unit: WorkUnit) -> dict[str, Any]:
    """Wait until the hub has ingested the group's products (and received its graph).

    Returns
    -------
    figures : `dict`
        ``files`` that arrived and ``wait_s``.
    """
    from ..campaign import campaign_output, staged_collection

    published = run.figures(unit, "publish")
    t0 = time.monotonic()
    rule = published.get("rule")
    n = run.wait_until_arrived(run.hub, [rule]) if rule else 0
    graph_rule = run.ledger.name(unit.step, unit.site, "graph_rule", group=unit.name)
    if graph_rule:  # a graph is not a Butler dataset: arrived when its rule is OK
        run.wait_until_arrived(run.hub, [graph_rule], ingest=False)
    if published.get("files"):
        output = str(published["run"])
        run.add_to_chain(run.hub, campaign_output(run.spec.campaign), [output])
        if unit.site != run.hub:
            run.add_to_chain(run.hub, staged_collection(run.spec.campaign, run.hub), [output])
    return {"files": n, "wait_s": time.monotonic() - t0}
