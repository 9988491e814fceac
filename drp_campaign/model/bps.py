"""BPS submit YAMLs: one per (site, step), rendered from the campaign spec and the plan.

This module is pure (PyYAML and the standard library): it builds the text of the BPS submit file
that runs one step of a campaign at one data facility (DESIGN.md section 5, step 1). Nothing here
reads or writes files; the caller writes the returned text where BPS will read it.

Naming scheme
-------------
Every name is a function of the campaign spec and the plan only, so a rerun renders the same
bytes and finds the collections of the previous run:

- ``payload.outputRun`` (a RUN): ``{campaign}/{step}/{site}/run``, e.g.
  ``dc2-test-med-1/step1/FrDF/run``; a fresh resubmission ``n`` >= 1 uses
  ``{campaign}/{step}/{site}/run-attempt{n}``.
- ``payload.output`` (a CHAINED collection): ``{campaign}/{site}/output``, e.g.
  ``dc2-test-med-1/FrDF/output``.
- ``payload.inCollection``: ``{instrument}/raw/all,{instrument}/calib,skymaps``, e.g.
  ``LSSTCam-imSim/raw/all,LSSTCam-imSim/calib,skymaps``.
- ``payload.payloadName``: ``{campaign}-{step}-{site}``, e.g. ``dc2-test-med-1-step1-FrDF``.

``site`` is the site's name in the spec (``USDF``, ``FrDF``); a gathered step runs at the hub and
is named with the hub's name. Run names are global: a product keeps its run (and so its relative
path) at every site it is copied to. ``payload.output`` is one CHAINED collection per site and
campaign; every step at that site pushes its run to the front of it, and the inputs
(``inCollection``) stay the same for every step, which is what ``pipetask`` requires of an
existing output chain. Runs arriving from other sites (gathered results fanned out, products
collected at the hub) are to be prepended to the receiving site's chain by the code that ingests
them.

Queues
------
PanDA queues are per compute site and memory class (DESIGN.md section 1): ``<site>_Rubin``
(up to 4 GB), ``<site>_Rubin_Medium`` (up to 8 GB), ``<site>_Rubin_Himem`` (up to 18 GB),
``<site>_Rubin_Extra_Himem`` (up to 220 GB), and ``<site>_Rubin_Merge`` for the final job, where
``<site>`` is the BPS ``computeSite`` (``SLAC``, ``CC-IN2P3``, ``LANCS``). Each pipetask label gets
``pipetask.<label>.{requestMemory, queue}``; labels not listed fall back to the root
``requestMemory`` and ``queue`` (the default memory and its queue), which also serve BPS's own
``pipetaskInit`` job.

What the rendered file carries
------------------------------
The ctrl_bps defaults (``bps_defaults.yaml``) stay in force except where overridden here: the
deterministic ``outputRun`` (the default has a timestamp), and the final job, which by default asks
for 16 CPUs and 32 GB and here asks for ``final_cpus`` and ``final_memory_mb``. The PyPI wheel of
lsst-ctrl-bps-panda has no ``config/bps_panda*.yaml``, so a PanDA submit file carries what those
files give (``placeholderParams``, ``maxJobsPerTask``, ``prodSourceLabel``, ``priority``,
``fileDistributionEndPoint``, ``runnerCommand`` and the pieces it is built from), with a
``runnerCommand`` that runs the edge-node decoder as a module instead of through an EUPS path.
For PanDA the automatic memory scaling on retry is switched off (``memoryMultiplier: 1``): the
queue is chosen by the requested memory, and a retry asking for more would not fit its queue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:
    from drp_campaign.model.spec import CampaignSpec

__all__ = [
    "DEFAULT_FINAL_CPUS",
    "DEFAULT_FINAL_MEMORY_MB",
    "DEFAULT_TASK_MEMORY_MB",
    "LOCAL_WMS_SERVICE_CLASS",
    "MAX_TASK_MEMORY_MB",
    "PANDA_WMS_SERVICE_CLASS",
    "QUEUE_CLASSES",
    "ClusterSpec",
    "SiteStepSubmit",
    "data_query",
    "final_queue",
    "input_chain",
    "input_collections",
    "output_collection",
    "output_run",
    "payload_name",
    "queue_for_memory",
    "render_submit_yaml",
    "submits_for_campaign",
]

Workload = Literal["local", "panda"]

#: Queue suffix and the largest memory (MB) a job in that queue may request, smallest first.
QUEUE_CLASSES: tuple[tuple[str, int], ...] = (
    ("_Rubin", 4 * 1024),
    ("_Rubin_Medium", 8 * 1024),
    ("_Rubin_Himem", 18 * 1024),
    ("_Rubin_Extra_Himem", 220 * 1024),
)
MAX_TASK_MEMORY_MB = QUEUE_CLASSES[-1][1]
MERGE_QUEUE_SUFFIX = "_Rubin_Merge"

DEFAULT_TASK_MEMORY_MB = 2048  # ctrl_bps's own default requestMemory
DEFAULT_FINAL_MEMORY_MB = 4096
DEFAULT_FINAL_CPUS = 1

PANDA_WMS_SERVICE_CLASS = "lsst.ctrl.bps.panda.PanDAService"
LOCAL_WMS_SERVICE_CLASS = "drp_campaign.backends.local.workload.LocalService"
DIMENSION_CLUSTERING = "lsst.ctrl.bps.quantum_clustering_funcs.dimension_clustering"

#: Where PanDA jobs find the QG and butler config (bps_panda_DF.yaml's value).
DEFAULT_FILE_DISTRIBUTION_END_POINT = (
    "${LSST_RUN_TEMP_SPACE}/panda_cache_box/{payloadFolder}/{uniqProcName}/"
)

#: Where jobs find the graph and butler config when ``LSST_RUN_TEMP_SPACE`` is unset: what
#: ctrl_bps_panda's per-site configs (``bps_panda_DF.yaml``) give, absent from the PyPI wheel.
#: BPS falls back to it and fails in ``add_decoder_prefix`` when it is missing.
FILE_DISTRIBUTION_END_POINT_DEFAULTS = {
    "SLAC": (
        "/sdf/data/rubin/panda_jobs/panda_cache/panda_cache_box/{payloadFolder}/{uniqProcName}/"
    ),
    "CC-IN2P3": "/sps/lsst/users/lsstgrid/panda_cache_box/{payloadFolder}/{uniqProcName}/",
    "LANCS": "/cephfs/pool/rubin/panda_cache_box/{payloadFolder}/{uniqProcName}/",
}

# A name that goes into a collection name or a BPS value: no '/', whitespace, quotes, or braces
# (BPS would read "{x}" as a variable).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_LABEL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTE_FREE_RE = re.compile(r"[^'\"\\\s{}]+")


# --------------------------------------------------------------------------------------------
# Queues
# --------------------------------------------------------------------------------------------


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} cannot be used in a collection or BPS name: use letters, digits "
            "and '_', '-', '.', '+' only, starting with a letter or digit"
        )
    return value


def queue_for_memory(compute_site: str, memory_mb: int, *, label: str | None = None) -> str:
    """Return the PanDA queue of ``compute_site`` for a job requesting ``memory_mb``.

    Parameters
    ----------
    compute_site : `str`
        The BPS ``computeSite`` (``SLAC``, ``CC-IN2P3``, ``LANCS``, ...).
    memory_mb : `int`
        The job's ``requestMemory`` in MB.
    label : `str`, optional
        The pipetask label the memory is for; named in the error message.

    Returns
    -------
    queue : `str`
        ``<compute_site>_Rubin`` (up to 4096 MB), ``_Rubin_Medium`` (up to 8192),
        ``_Rubin_Himem`` (up to 18432) or ``_Rubin_Extra_Himem`` (up to 225280).

    Raises
    ------
    ValueError
        If the memory is not a positive integer or is above the largest queue's limit.
    """
    who = f"pipetask {label!r}" if label else "a job"
    if not isinstance(compute_site, str) or not compute_site.strip():
        raise ValueError(f"compute_site must be a non-empty string, not {compute_site!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
        raise ValueError(
            f"{who} requests {memory_mb!r} MB of memory; the request must be a positive "
            "integer number of MB"
        )
    for suffix, limit in QUEUE_CLASSES:
        if memory_mb <= limit:
            return f"{compute_site}{suffix}"
    raise ValueError(
        f"{who} requests {memory_mb} MB of memory, above the {MAX_TASK_MEMORY_MB} MB limit of "
        f"the largest queue {compute_site}{QUEUE_CLASSES[-1][0]}; lower its memory request or "
        "split the task"
    )


def final_queue(compute_site: str) -> str:
    """Return the queue of the final (merge) job at ``compute_site``.

    Parameters
    ----------
    compute_site : `str`
        The BPS ``computeSite``.

    Returns
    -------
    queue : `str`
        ``<compute_site>_Rubin_Merge``.
    """
    if not isinstance(compute_site, str) or not compute_site.strip():
        raise ValueError(f"compute_site must be a non-empty string, not {compute_site!r}")
    return f"{compute_site}{MERGE_QUEUE_SUFFIX}"


# --------------------------------------------------------------------------------------------
# Deterministic names
# --------------------------------------------------------------------------------------------


def output_run(campaign: str, step: str, site: str, attempt: int = 0) -> str:
    """Return the RUN collection of one step at one site.

    Parameters
    ----------
    campaign : `str`
        The campaign name.
    step : `str`
        The step name.
    site : `str`
        The site's name in the spec (the hub's name for a gathered step).
    attempt : `int`, optional
        0 for the first submission; ``n`` >= 1 for the n-th fresh resubmission, which needs a
        new run.

    Returns
    -------
    run : `str`
        ``{campaign}/{step}/{site}/run``, or ``{campaign}/{step}/{site}/run-attempt{n}``.

    Raises
    ------
    ValueError
        If a name contains characters unfit for a collection name or ``attempt`` is negative.
    """
    parts = [_check_name(kind, value) for kind, value in (("campaign", campaign), ("step", step))]
    parts.append(_check_name("site", site))
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise ValueError(f"attempt must be a non-negative integer, not {attempt!r}")
    leaf = "run" if attempt == 0 else f"run-attempt{attempt}"
    return "/".join([*parts, leaf])


def output_collection(campaign: str, site: str) -> str:
    """Return the CHAINED output collection of a campaign at one site.

    Parameters
    ----------
    campaign : `str`
        The campaign name.
    site : `str`
        The site's name in the spec.

    Returns
    -------
    collection : `str`
        ``{campaign}/{site}/output``.
    """
    return f"{_check_name('campaign', campaign)}/{_check_name('site', site)}/output"


def input_chain(campaign: str) -> str:
    """Return the campaign's CHAINED input collection at every site: ``{campaign}/inputs``.

    Setup defines it at each site as the spec's input collections (raws, calibrations, extra),
    so every step's graph reads the same inputs wherever it runs.

    Parameters
    ----------
    campaign : `str`
        The campaign name.

    Returns
    -------
    collection : `str`
        ``{campaign}/inputs``.
    """
    return f"{_check_name('campaign', campaign)}/inputs"


def input_collections(campaign: str) -> list[str]:
    """Return the input collections of a site's first step, in search order.

    Parameters
    ----------
    campaign : `str`
        The campaign name.

    Returns
    -------
    collections : `list` [`str`]
        ``[{campaign}/inputs]`` (`input_chain`).
    """
    return [input_chain(campaign)]


def payload_name(campaign: str, step: str, site: str) -> str:
    """Return the BPS ``payloadName`` (shown by ``bps report``) of one step at one site.

    Parameters
    ----------
    campaign : `str`
        The campaign name.
    step : `str`
        The step name.
    site : `str`
        The site's name in the spec.

    Returns
    -------
    name : `str`
        ``{campaign}-{step}-{site}``.
    """
    names = (("campaign", campaign), ("step", step), ("site", site))
    return "-".join(_check_name(kind, value) for kind, value in names)


# --------------------------------------------------------------------------------------------
# Data queries
# --------------------------------------------------------------------------------------------


def _ids(kind: str, values: Iterable[int]) -> list[int]:
    result = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{kind} ids must be non-negative integers, not {value!r}")
        result.add(value)
    return sorted(result)


def _in(dimension: str, ids: Sequence[int]) -> str:
    return f"{dimension} IN ({', '.join(str(i) for i in ids)})"


def _quoted(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _QUOTE_FREE_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be a non-empty name without quotes or spaces")
    return f"'{value}'"


def data_query(
    instrument: str,
    skymap: str,
    shard: Literal["visit", "tract", "none"],
    *,
    visits: Iterable[int] | None = None,
    tracts: Iterable[int] | Mapping[int, Iterable[int] | None] | None = None,
) -> str:
    """Build the BPS ``dataQuery`` of one step at one site.

    Every query constrains ``instrument`` and ``skymap`` explicitly, as the Butler query system
    requires. Ids are de-duplicated and sorted, so the same plan gives the same string.

    Parameters
    ----------
    instrument : `str`
        The instrument name.
    skymap : `str`
        The skymap name.
    shard : {``"visit"``, ``"tract"``, ``"none"``}
        The step's sharding dimension; ``"none"`` is a gathered step run on everything.
    visits : iterable of `int`, optional
        The site's visits; required (and non-empty) for ``shard="visit"``.
    tracts : iterable of `int` or mapping of `int` to iterable of `int` or `None`, optional
        The site's tracts; required (and non-empty) for ``shard="tract"``. A mapping gives, per
        tract, the patches of that tract the site owns, or `None` for the whole tract.

    Returns
    -------
    query : `str`
        ``instrument='X' AND skymap='S' AND visit IN (1, 2)``,
        ``instrument='X' AND skymap='S' AND tract IN (1, 2)``,
        ``instrument='X' AND skymap='S' AND (tract IN (1) OR (tract = 2 AND patch IN (3, 4)))``
        (when a tract is split between sites) or ``instrument='X' AND skymap='S'``.

    Raises
    ------
    ValueError
        If the ids the shard needs are missing or empty, ids for another shard are given, or an
        id or name is invalid.
    """
    base = f"instrument={_quoted('instrument', instrument)} AND skymap={_quoted('skymap', skymap)}"
    if shard == "visit":
        if tracts is not None:
            raise ValueError("a visit-sharded query takes visits, not tracts")
        ids = _ids("visit", visits if visits is not None else ())
        if not ids:
            raise ValueError("a visit-sharded query needs at least one visit")
        return f"{base} AND {_in('visit', ids)}"
    if shard == "tract":
        if visits is not None:
            raise ValueError("a tract-sharded query takes tracts, not visits")
        if tracts is None:
            raise ValueError("a tract-sharded query needs at least one tract")
        patches_by_tract: dict[int, list[int] | None] = {}
        if isinstance(tracts, Mapping):
            for tract in _ids("tract", tracts):
                patches = tracts[tract]
                if patches is None:
                    patches_by_tract[tract] = None
                else:
                    patch_ids = _ids("patch", patches)
                    if not patch_ids:
                        raise ValueError(
                            f"tract {tract} lists no patches; give None for the whole tract or "
                            "leave the tract out"
                        )
                    patches_by_tract[tract] = patch_ids
        else:
            patches_by_tract = dict.fromkeys(_ids("tract", tracts))
        if not patches_by_tract:
            raise ValueError("a tract-sharded query needs at least one tract")
        whole = [tract for tract, patches in patches_by_tract.items() if patches is None]
        split = {tract: p for tract, p in patches_by_tract.items() if p is not None}
        terms = [_in("tract", whole)] if whole else []
        terms.extend(f"tract = {tract} AND {_in('patch', p)}" for tract, p in split.items())
        if len(terms) == 1:
            return f"{base} AND {terms[0]}"
        # Parenthesise the AND terms so that the OR reads unambiguously.
        return f"{base} AND ({' OR '.join(t if ' AND ' not in t else f'({t})' for t in terms)})"
    if shard == "none":
        if visits is not None or tracts is not None:
            raise ValueError("a gathered (shard 'none') query takes neither visits nor tracts")
        return base
    raise ValueError(f"shard must be 'visit', 'tract' or 'none', not {shard!r}")


# --------------------------------------------------------------------------------------------
# Submit files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    """A BPS dimension cluster: several pipetask labels run in one job per data id.

    Parameters
    ----------
    pipetasks : `tuple` [`str`, ...]
        The pipetask labels in the cluster.
    dimensions : `tuple` [`str`, ...]
        The dimensions that divide the cluster into jobs (``("visit",)``).
    equal_dimensions : `str`, optional
        BPS ``equalDimensions`` (``"visit:exposure"``).
    """

    pipetasks: tuple[str, ...]
    dimensions: tuple[str, ...]
    equal_dimensions: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pipetasks", tuple(self.pipetasks))
        object.__setattr__(self, "dimensions", tuple(self.dimensions))
        if not self.pipetasks or not self.dimensions:
            raise ValueError("a cluster needs at least one pipetask label and one dimension")


@dataclass(frozen=True)
class SiteStepSubmit:
    """Everything needed to render the BPS submit file of one step at one site.

    Parameters
    ----------
    campaign : `str`
        The campaign name (BPS ``campaign``).
    step : `str`
        The step name.
    subset : `str`
        The pipeline subset label the step runs.
    site : `str`
        The site's name in the spec (``USDF``).
    compute_site : `str`
        The BPS ``computeSite`` (``SLAC``); also names the queues.
    cloud : `str`
        The BPS ``computeCloud`` (``US``, ``EU``).
    pipeline_yaml : `str`
        The pipeline YAML as BPS should read it (a path, possibly with ``${ENV}`` variables).
    butler_config : `str`
        The site's Butler repository (``payload.butlerConfig``).
    data_query : `str`
        The ``payload.dataQuery`` (see `data_query`).
    input_collections : sequence of `str`
        The ``payload.inCollection`` collections, in search order.
    output_run : `str`
        The ``payload.outputRun`` (see `output_run`).
    output_collection : `str`
        The ``payload.output`` chain (see `output_collection`).
    task_memory_mb : mapping of `str` to `int`, optional
        ``requestMemory`` in MB per pipetask label; each listed label gets its memory and queue.
        Unlisted labels get ``default_memory_mb``.
    workload : {``"local"``, ``"panda"``}, optional
        Which workload system runs the submission.
    operator : `str`, optional
        BPS ``operator``.
    project : `str`, optional
        BPS ``project``.
    submit_path : `str`, optional
        BPS ``submitPath``; BPS's default (``${PWD}/submit/{outputRun}``) when `None`.
    default_memory_mb : `int`, optional
        The root ``requestMemory`` (and queue) for labels not in ``task_memory_mb``.
    final_memory_mb : `int`, optional
        ``finalJob.requestMemory``.
    final_cpus : `int`, optional
        ``finalJob.requestCpus``.
    clusters : mapping of `str` to `ClusterSpec`, optional
        Dimension clusters by cluster label; none means one quantum per job.
    file_distribution_end_point : `str`, optional
        PanDA only: where jobs find the QG and butler config; bps_panda_DF.yaml's value when
        `None`.
    idds_server : `str`, optional
        PanDA only: the iDDS server; the PanDA relay's default when `None`.
    setup_command : `str`, optional
        PanDA only: shell commands, each ending with ``;``, that set up the stack on the worker
        node (e.g. ``source /path/to/venv/bin/activate;``).
    payload : `str`, optional
        The ``payloadName``; `payload_name` of the site-step when `None` (a group's submission
        adds its group, `drp_campaign.model.units.WorkUnit.payload_name`).
    """

    campaign: str
    step: str
    subset: str
    site: str
    compute_site: str
    cloud: str
    pipeline_yaml: str
    butler_config: str
    data_query: str
    input_collections: Sequence[str]
    output_run: str
    output_collection: str
    task_memory_mb: Mapping[str, int] = field(default_factory=dict)
    workload: Workload = "local"
    operator: str = "drp-campaign"
    project: str = "drp-campaign"
    submit_path: str | None = None
    default_memory_mb: int = DEFAULT_TASK_MEMORY_MB
    final_memory_mb: int = DEFAULT_FINAL_MEMORY_MB
    final_cpus: int = DEFAULT_FINAL_CPUS
    clusters: Mapping[str, ClusterSpec] = field(default_factory=dict)
    file_distribution_end_point: str | None = None
    idds_server: str | None = None
    setup_command: str = ""
    payload: str | None = None

    def __post_init__(self) -> None:
        # Freeze the containers so a submit cannot change after it was planned.
        object.__setattr__(self, "input_collections", tuple(self.input_collections))
        object.__setattr__(self, "task_memory_mb", MappingProxyType(dict(self.task_memory_mb)))
        object.__setattr__(self, "clusters", MappingProxyType(dict(self.clusters)))
        if self.workload not in ("local", "panda"):
            raise ValueError(f"workload must be 'local' or 'panda', not {self.workload!r}")
        if not self.input_collections:
            raise ValueError("a submit needs at least one input collection")
        for label in [*self.task_memory_mb, *self.clusters]:
            if not isinstance(label, str) or not _LABEL_RE.fullmatch(label):
                raise ValueError(f"{label!r} is not a valid pipetask or cluster label")
        for key in ("final_cpus", "final_memory_mb", "default_memory_mb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, not {value!r}")
        # Fails early, naming the label, when a memory request fits no queue.
        queue_for_memory(self.compute_site, self.default_memory_mb, label="(default)")
        for label, memory in self.task_memory_mb.items():
            queue_for_memory(self.compute_site, memory, label=label)
        clustered = [label for cluster in self.clusters.values() for label in cluster.pipetasks]
        if len(clustered) != len(set(clustered)):
            raise ValueError("a pipetask label may be in one cluster only")

    @property
    def wms_service_class(self) -> str:
        """The BPS ``wmsServiceClass`` of the workload."""
        return PANDA_WMS_SERVICE_CLASS if self.workload == "panda" else LOCAL_WMS_SERVICE_CLASS

    @property
    def file_name(self) -> str:
        """A file name for the rendered YAML: ``<site>-<step>.yaml``."""
        return f"{self.site}-{self.step}.yaml"

    def memory_of(self, label: str) -> int:
        """Return the ``requestMemory`` (MB) of a pipetask label.

        Parameters
        ----------
        label : `str`
            A pipetask label.

        Returns
        -------
        memory : `int`
            Its entry in ``task_memory_mb``, else ``default_memory_mb``.
        """
        return self.task_memory_mb.get(label, self.default_memory_mb)


def _panda_settings(s: SiteStepSubmit) -> dict[str, Any]:
    """What config/bps_panda.yaml and bps_panda_DF.yaml would give, for a pip environment."""
    # payloadCommand runs inside `/bin/bash -c "..."` (jobContainer), so '$' is escaped there.
    payload_command = " ".join(
        [
            "cd {jobInitDir};",
            "{setupLSSTEnv}",
            "export PANDA_BEHIND_REAL_LB=true;",
            "export RUBIN_ES_MAP_FILE=orderIdMapFilename;",
            "python3 -m lsst.ctrl.bps.panda.edgenode.cmd_line_decoder _cmd_line_;",
            "ret=\\$?;",
            "{jobCleanup}",
            "exit \\$ret;",
        ]
    )
    runner_command = " ".join(
        [
            "logDir={jobLogDir};",
            "mkdir -p ${logDir};",
            "chmod ugo+w ${logDir};",
            "{jobContainer}",
            "retStat=$?;",
            "exit $retStat",
        ]
    )
    settings: dict[str, Any] = {
        "placeholderParams": ["qgraphNodeId", "qgraphId"],
        "defaultPreCmdOpts": (
            "--long-log --log-level=VERBOSE --log-file payload-log.json "
            "--log-label REPO={butlerConfig}"
        ),
        "qgraphPreCmdOpts": "--long-log --log-level=VERBOSE",
        "maxJobsPerTask": 10000,
        "prodSourceLabel": "managed",
        "priority": 500,
        "memoryMultiplier": 1,
        "payloadFolder": "payload",
        "fileDistributionEndPoint": (
            s.file_distribution_end_point
            if s.file_distribution_end_point is not None
            else DEFAULT_FILE_DISTRIBUTION_END_POINT
        ),
    }
    default_end_point = FILE_DISTRIBUTION_END_POINT_DEFAULTS.get(s.compute_site)
    if default_end_point is not None:
        settings["fileDistributionEndPointDefault"] = default_end_point
    if s.idds_server is not None:
        settings["iddsServer"] = s.idds_server
    settings.update(
        {
            "setupLSSTEnv": s.setup_command,
            "jobInitDir": "`pwd`",
            "jobLogDir": "{jobInitDir}",
            "jobContainer": '/bin/bash -c "{payloadCommand}" >&2;',
            "jobCleanup": "rm -fr EXEC_REPO-*;",
            "payloadCommand": payload_command,
            "runnerCommand": runner_command,
        }
    )
    return settings


def _submit_dict(s: SiteStepSubmit) -> dict[str, Any]:
    compute_site, cloud = s.compute_site, s.cloud
    doc: dict[str, Any] = {
        "project": s.project,
        "campaign": s.campaign,
        "operator": s.operator,
        "pipelineYaml": f"{s.pipeline_yaml}#{s.subset}",
        "payload": {
            "payloadName": s.payload or payload_name(s.campaign, s.step, s.site),
            "butlerConfig": s.butler_config,
            "inCollection": ",".join(s.input_collections),
            "dataQuery": s.data_query,
            "output": s.output_collection,
            "outputRun": s.output_run,
        },
        "computeSite": compute_site,
        "computeCloud": cloud,
        "requestMemory": s.default_memory_mb,
        "queue": queue_for_memory(compute_site, s.default_memory_mb, label="(default)"),
        "pipetask": {
            label: {
                "requestMemory": s.task_memory_mb[label],
                "queue": queue_for_memory(compute_site, s.task_memory_mb[label], label=label),
            }
            for label in sorted(s.task_memory_mb)
        },
    }
    if s.clusters:
        doc["clusterAlgorithm"] = DIMENSION_CLUSTERING
        clusters: dict[str, Any] = {}
        for name in sorted(s.clusters):
            cluster = s.clusters[name]
            memory = max(s.memory_of(label) for label in cluster.pipetasks)
            entry: dict[str, Any] = {
                "pipetasks": ", ".join(cluster.pipetasks),
                "dimensions": ", ".join(cluster.dimensions),
            }
            if cluster.equal_dimensions:
                entry["equalDimensions"] = cluster.equal_dimensions
            # A cluster's job takes computeSite and queue from the cluster, not its pipetasks.
            entry.update(
                {
                    "computeSite": compute_site,
                    "computeCloud": cloud,
                    "requestMemory": memory,
                    "queue": queue_for_memory(compute_site, memory, label=name),
                }
            )
            clusters[name] = entry
        doc["cluster"] = clusters
    doc["finalJob"] = {
        "queue": final_queue(compute_site),
        "requestMemory": s.final_memory_mb,
        "requestCpus": s.final_cpus,
    }
    doc["wmsServiceClass"] = s.wms_service_class
    if s.workload == "panda":
        doc.update(_panda_settings(s))
    if s.submit_path is not None:
        doc["submitPath"] = s.submit_path
    return doc


class _Dumper(yaml.SafeDumper):
    """SafeDumper that indents lists under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def render_submit_yaml(s: SiteStepSubmit) -> str:
    """Render the BPS submit YAML of one step at one site.

    The output is deterministic: the same submit gives the same bytes (no timestamps; pipetask
    and cluster labels sorted).

    Parameters
    ----------
    s : `SiteStepSubmit`
        What to render.

    Returns
    -------
    text : `str`
        A complete BPS submit file, starting with a comment saying it is generated.
    """
    header = (
        "# Generated by drp_campaign.model.bps; do not edit: change the campaign spec or the\n"
        "# plan and render it again.\n"
        f"# BPS submit file for campaign {s.campaign}, step {s.step}, site {s.site}\n"
        f"# (computeSite {s.compute_site}, workload {s.workload}).\n"
    )
    body = yaml.dump(
        _submit_dict(s),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 30,  # never fold long queries
    )
    return header + body


# --------------------------------------------------------------------------------------------
# A whole campaign
# --------------------------------------------------------------------------------------------


def _lookup(plan: Mapping[str, Any], site: str, what: str) -> Any:
    if site not in plan:
        raise ValueError(f"no {what} given for site {site!r}")
    return plan[site]


def submits_for_campaign(
    spec: CampaignSpec,
    plan_visits_by_site: Mapping[str, Iterable[int]],
    plan_tracts_by_site: Mapping[str, Iterable[int] | Mapping[int, Iterable[int] | None]],
    repos: Mapping[str, str],
    task_memory_mb: Mapping[str, int] | None = None,
    workload: Workload = "local",
    operator: str = "drp-campaign",
    *,
    labels_by_subset: Mapping[str, Iterable[str]] | None = None,
    pipeline_yaml: str | None = None,
    attempt: int = 0,
    project: str = "drp-campaign",
) -> list[SiteStepSubmit]:
    """Build the submits of every step of a campaign, in spec step order then spec site order.

    A ``per-site`` step gets one submit per site whose share of the step's dimension is not
    empty (a site with no visits, or no tracts, has nothing to run for that step and gets none).
    A ``gather`` step gets one submit, at the hub, with the unrestricted query.

    Parameters
    ----------
    spec : `CampaignSpec`
        The campaign spec.
    plan_visits_by_site : mapping of `str` to iterable of `int`
        Each site's visits, for visit-sharded steps.
    plan_tracts_by_site : mapping of `str` to iterable of `int` or mapping
        Each site's tracts (or tract -> patches, `None` for a whole tract), for tract-sharded
        steps.
    repos : mapping of `str` to `str`
        Each site's Butler repository (``payload.butlerConfig``).
    task_memory_mb : mapping of `str` to `int`, optional
        ``requestMemory`` (MB) per pipetask label.
    workload : {``"local"``, ``"panda"``}, optional
        Which workload system runs the submissions.
    operator : `str`, optional
        BPS ``operator``.
    labels_by_subset : mapping of `str` to iterable of `str`, optional
        The pipetask labels of each subset. When given, each step's file lists exactly its
        subset's labels (with the default memory for labels not in ``task_memory_mb``);
        otherwise every step lists every label of ``task_memory_mb``.
    pipeline_yaml : `str`, optional
        The pipeline YAML as written in the files; the spec's resolved path when `None`.
    attempt : `int`, optional
        Resubmission number, for `output_run`.
    project : `str`, optional
        BPS ``project``.

    Returns
    -------
    submits : `list` [`SiteStepSubmit`]
        One per (step, site) to run.

    Raises
    ------
    ValueError
        If the plan or ``repos`` lacks an entry for a site, or a name or memory is invalid.
    """
    memory = dict(task_memory_mb or {})
    pipeline = pipeline_yaml
    if pipeline is None:
        path = spec.pipeline.yaml_path
        pipeline = str(path) if path is not None else spec.pipeline.yaml
    inputs = input_collections(spec.campaign)
    skymap = spec.skymap.name
    submits: list[SiteStepSubmit] = []
    for step in spec.steps:
        if labels_by_subset is not None:
            if step.subset not in labels_by_subset:
                raise ValueError(f"labels_by_subset has no entry for subset {step.subset!r}")
            step_memory = {
                label: memory.get(label, DEFAULT_TASK_MEMORY_MB)
                for label in labels_by_subset[step.subset]
            }
        else:
            step_memory = memory
        if step.placement == "gather":
            targets: list[tuple[str, str]] = [
                (spec.hub, data_query(spec.instrument, skymap, "none"))
            ]
        else:
            targets = []
            for site in spec.site_names:
                if step.shard == "visit":
                    visits = list(_lookup(plan_visits_by_site, site, "visits"))
                    if visits:
                        targets.append(
                            (site, data_query(spec.instrument, skymap, "visit", visits=visits))
                        )
                else:
                    tracts = _lookup(plan_tracts_by_site, site, "tracts")
                    if not isinstance(tracts, Mapping):
                        tracts = list(tracts)
                    if tracts:
                        targets.append(
                            (site, data_query(spec.instrument, skymap, "tract", tracts=tracts))
                        )
        for site, query in targets:
            site_spec = spec.sites[site]
            submits.append(
                SiteStepSubmit(
                    campaign=spec.campaign,
                    step=step.name,
                    subset=step.subset,
                    site=site,
                    compute_site=site_spec.compute_site,
                    cloud=site_spec.cloud,
                    pipeline_yaml=pipeline,
                    butler_config=_lookup(repos, site, "repository"),
                    data_query=query,
                    input_collections=inputs,
                    output_run=output_run(spec.campaign, step.name, site, attempt),
                    output_collection=output_collection(spec.campaign, site),
                    task_memory_mb=step_memory,
                    workload=workload,
                    operator=operator,
                    project=project,
                )
            )
    return submits
