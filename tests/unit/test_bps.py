"""BPS submit YAMLs: the values BPS itself looks up, queue boundaries, names, queries, goldens.

Every rendered file is loaded with the real ``lsst.ctrl.bps.BpsConfig`` (with ctrl_bps's packaged
``bps_defaults.yaml``, as ``bps submit`` does) and read back with the searches BPS makes when it
builds jobs (``BpsConfig.get_search_opts`` plus ``curr_pipetask`` for a pipetask, the PanDA
plugin's ``curr_cluster``/``curr_site`` search, and ``searchobj`` for the final job).

Golden files
------------
``tests/unit/golden/bps/<site>-<step>.yaml`` hold the PanDA submit files of the dc2-test-med-1
spec for the small fake plan below; the test compares the rendered text to them byte for byte.
After an intended change to the rendering, regenerate them with::

    DRP_UPDATE_GOLDEN=1 pytest tests/unit/test_bps.py -p no:cacheprovider

and review the diff.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from lsst.ctrl.bps import BPS_DEFAULTS, BPS_SEARCH_ORDER, BpsConfig

from drp_campaign.model.bps import (
    LOCAL_WMS_SERVICE_CLASS,
    PANDA_WMS_SERVICE_CLASS,
    ClusterSpec,
    SiteStepSubmit,
    data_query,
    final_queue,
    input_collections,
    output_collection,
    output_run,
    payload_name,
    queue_for_memory,
    render_submit_yaml,
    submits_for_campaign,
)
from drp_campaign.model.spec import CampaignSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO / "deployments" / "campaigns" / "dc2-test-med-1.yaml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "bps"

# The fake plan: small and deterministic (lists deliberately unsorted and with a duplicate).
VISITS = {"USDF": [2, 1], "FrDF": [3], "UKDF": [5, 4, 5]}
TRACTS = {"USDF": [3828], "FrDF": [3829], "UKDF": [3830]}
REPOS = {site: f"/repos/{site}/butler.yaml" for site in VISITS}
# One label per side of every queue boundary; "consolidateVisitSummary" is not listed and gets
# the 2048 MB default.
TASK_MEMORY = {
    "isr": 2048,
    "calibrateImage": 4096,
    "finalizeCharacterization": 4097,
    "isolatedStarAssociation": 8192,
    "makeDirectWarp": 8193,
    "assembleDeepCoadd": 18432,
    "detectCoaddPeaks": 18433,
    "forcedPhotObjectDetector": 225280,
}
LABELS = {
    "step1": ["isr", "calibrateImage"],
    "step2": ["finalizeCharacterization", "consolidateVisitSummary"],
    "step2c": ["isolatedStarAssociation"],
    "step3": ["makeDirectWarp", "assembleDeepCoadd", "detectCoaddPeaks"],
    "step4": ["forcedPhotObjectDetector"],
}
EXPECTED_QUEUE_SUFFIX = {
    2048: "_Rubin",
    4096: "_Rubin",
    4097: "_Rubin_Medium",
    8192: "_Rubin_Medium",
    8193: "_Rubin_Himem",
    18432: "_Rubin_Himem",
    18433: "_Rubin_Extra_Himem",
    225280: "_Rubin_Extra_Himem",
}
COMPUTE = {"USDF": ("SLAC", "US"), "FrDF": ("CC-IN2P3", "EU"), "UKDF": ("LANCS", "EU")}

# Loading with `defaults` makes BpsConfig import the file's wmsServiceClass to ask it for plugin
# defaults. Importing lsst.ctrl.bps.panda imports pandaclient, which does a DNS lookup at import
# time (fails offline), and the local service class may not exist yet. Neither PanDAService nor
# the base class has plugin defaults, so loading through the importable base class gives the same
# config as `bps submit` would; the file's own wmsServiceClass still wins (it is applied last).
NO_PLUGIN_DEFAULTS = "lsst.ctrl.bps.wms_service.BaseWmsService"


@pytest.fixture(scope="module")
def spec() -> CampaignSpec:
    return load_spec(SPEC_PATH)


def make_submits(
    spec: CampaignSpec, workload: Literal["local", "panda"] = "panda", **kwargs: Any
) -> list[SiteStepSubmit]:
    return submits_for_campaign(
        spec,
        VISITS,
        TRACTS,
        REPOS,
        TASK_MEMORY,
        workload=workload,
        labels_by_subset=LABELS,
        pipeline_yaml=spec.pipeline.yaml,  # as written in the spec: no machine-specific path
        **kwargs,
    )


def load_bps(text: str, tmp_path: Path, name: str = "submit.yaml") -> BpsConfig:
    path = tmp_path / name
    path.write_text(text)
    return BpsConfig(
        str(path),
        search_order=BPS_SEARCH_ORDER,
        defaults=BPS_DEFAULTS,
        wms_service_class_fqn=NO_PLUGIN_DEFAULTS,
    )


def pipetask_value(config: BpsConfig, label: str, key: str) -> Any:
    """What ctrl_bps's transform finds for a quantum of ``label`` (single-quantum clustering)."""
    opts = config.get_search_opts(label)
    opts["curvals"]["curr_pipetask"] = label
    opts.update(
        {"replaceVars": False, "expandEnvVars": False, "replaceEnvVars": True, "required": False}
    )
    found, value = config.search(key, opt=opts)
    assert found, f"{key} not found for {label}"
    return value


def panda_compute_site(config: BpsConfig, label: str) -> str:
    """What the PanDA plugin finds as PandaSite for a job of ``label`` (utils._make_doma_work)."""
    _, site = config.search(
        "computeSite", opt={"curvals": {"curr_cluster": label}, "required": True}
    )
    return site


def final_value(config: BpsConfig, key: str) -> Any:
    """What ctrl_bps's create_final_job finds for the final job."""
    opts: dict[str, Any] = {"searchobj": config["finalJob"], "curvals": {}, "default": None}
    found, site = config.search("computeSite", opt=opts)
    if found:
        opts["curvals"]["curr_site"] = site
    _, value = config.search(key, opt=opts)
    return value


# --------------------------------------------------------------------------------------------
# Queues and names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("memory", "suffix"), sorted(EXPECTED_QUEUE_SUFFIX.items()))
def test_queue_boundaries(memory: int, suffix: str) -> None:
    assert queue_for_memory("SLAC", memory) == f"SLAC{suffix}"


def test_queue_smallest_and_site_names() -> None:
    assert queue_for_memory("CC-IN2P3", 1) == "CC-IN2P3_Rubin"
    assert queue_for_memory("LANCS", 10000) == "LANCS_Rubin_Himem"
    assert final_queue("CC-IN2P3") == "CC-IN2P3_Rubin_Merge"


def test_queue_memory_too_large_names_label_and_limit() -> None:
    with pytest.raises(ValueError, match=r"pipetask 'bigTask' requests 225281 MB.*225280 MB"):
        queue_for_memory("SLAC", 225281, label="bigTask")


@pytest.mark.parametrize("memory", [0, -1, 1.5, True, "4096"])
def test_queue_bad_memory(memory: Any) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        queue_for_memory("SLAC", memory)


def test_submit_with_bad_memory_raises() -> None:
    with pytest.raises(ValueError, match="'makeWarp' requests 300000 MB"):
        dataclasses.replace(_one_submit(), task_memory_mb={"makeWarp": 300000})


def test_names() -> None:
    assert output_run("dc2-test-med-1", "step1", "FrDF") == "dc2-test-med-1/step1/FrDF/run"
    assert output_run("dc2-test-med-1", "step1", "FrDF", 2) == (
        "dc2-test-med-1/step1/FrDF/run-attempt2"
    )
    assert output_collection("dc2-test-med-1", "FrDF") == "dc2-test-med-1/FrDF/output"
    assert input_collections("dc2-test-med-1") == ["dc2-test-med-1/inputs"]
    assert payload_name("dc2-test-med-1", "step1", "FrDF") == "dc2-test-med-1-step1-FrDF"


@pytest.mark.parametrize("bad", ["a/b", "x y", "{x}", "", "-x"])
def test_names_reject_unsafe_parts(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be used"):
        output_run("dc2-test-med-1", bad, "FrDF")
    with pytest.raises(ValueError, match="cannot be used"):
        output_collection("dc2-test-med-1", bad)


def test_attempt_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match="attempt"):
        output_run("c", "s", "S", -1)


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------


def test_query_visits_sorted_and_unique() -> None:
    assert data_query("LSSTCam-imSim", "DC2_cells_v1", "visit", visits=[5, 1, 3, 1]) == (
        "instrument='LSSTCam-imSim' AND skymap='DC2_cells_v1' AND visit IN (1, 3, 5)"
    )


def test_query_tracts() -> None:
    assert data_query("LSSTCam", "lsst_cells_v1", "tract", tracts=[9, 2]) == (
        "instrument='LSSTCam' AND skymap='lsst_cells_v1' AND tract IN (2, 9)"
    )


def test_query_split_tracts() -> None:
    query = data_query("LSSTCam", "s", "tract", tracts={9: None, 2: None, 5: [7, 3]})
    assert query == (
        "instrument='LSSTCam' AND skymap='s' AND "
        "(tract IN (2, 9) OR (tract = 5 AND patch IN (3, 7)))"
    )
    only_split = data_query("LSSTCam", "s", "tract", tracts={5: [3]})
    assert only_split == "instrument='LSSTCam' AND skymap='s' AND tract = 5 AND patch IN (3)"
    assert data_query("LSSTCam", "s", "tract", tracts={5: None}) == (
        "instrument='LSSTCam' AND skymap='s' AND tract IN (5)"
    )


def test_query_gathered() -> None:
    assert data_query("LSSTCam", "s", "none") == "instrument='LSSTCam' AND skymap='s'"


@pytest.mark.parametrize(
    ("shard", "kwargs", "message"),
    [
        ("visit", {}, "at least one visit"),
        ("visit", {"visits": []}, "at least one visit"),
        ("visit", {"tracts": [1]}, "takes visits"),
        ("tract", {}, "at least one tract"),
        ("tract", {"tracts": {}}, "at least one tract"),
        ("tract", {"tracts": {1: []}}, "lists no patches"),
        ("tract", {"visits": [1]}, "takes tracts"),
        ("none", {"visits": [1]}, "neither"),
        ("visit", {"visits": [-1]}, "non-negative"),
        ("patch", {}, "shard must be"),
    ],
)
def test_query_errors(shard: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        data_query("LSSTCam", "s", shard, **kwargs)


def test_query_rejects_quotes() -> None:
    with pytest.raises(ValueError, match="without quotes"):
        data_query("LSST'Cam", "s", "none")


# --------------------------------------------------------------------------------------------
# The campaign's submits, read back through BpsConfig
# --------------------------------------------------------------------------------------------


def test_submits_cover_every_site_and_step(spec: CampaignSpec) -> None:
    submits = make_submits(spec)
    pairs = [(s.step, s.site) for s in submits]
    per_site = [(step, site) for step in ("step1", "step2") for site in spec.site_names]
    per_site_late = [(step, site) for step in ("step3", "step4") for site in spec.site_names]
    assert pairs == [*per_site, ("step2c", "USDF"), *per_site_late]


def test_every_file_as_bps_reads_it(spec: CampaignSpec, tmp_path: Path) -> None:
    for submit in make_submits(spec):
        text = render_submit_yaml(submit)
        config = load_bps(text, tmp_path, submit.file_name)
        site, step = submit.site, submit.step
        compute_site, cloud = COMPUTE[site]
        where = f"{site}-{step}"

        assert config["wmsServiceClass"] == PANDA_WMS_SERVICE_CLASS, where
        assert config["pipelineYaml"] == f"pipelines/DRP-mock.yaml#{step}", where
        assert config["computeSite"] == compute_site, where
        assert config["computeCloud"] == cloud, where
        assert config["requestMemory"] == 2048, where
        assert config["campaign"] == "dc2-test-med-1", where
        assert config["operator"] == "drp-campaign", where

        # payload values (BPS searches the payload section first).
        assert config["payloadName"] == f"dc2-test-med-1-{step}-{site}", where
        assert config["butlerConfig"] == REPOS[site], where
        assert config["inCollection"] == ("dc2-test-med-1/inputs"), where
        assert config["output"] == f"dc2-test-med-1/{site}/output", where
        assert config["outputRun"] == f"dc2-test-med-1/{step}/{site}/run", where
        base = "instrument='LSSTCam-imSim' AND skymap='DC2_cells_v1'"
        expected_query = {
            "step1": f"{base} AND visit IN ({', '.join(map(str, sorted(set(VISITS[site]))))})",
            "step2c": base,
            "step3": f"{base} AND tract IN ({TRACTS[site][0]})",
        }
        expected_query["step2"] = expected_query["step4"] = expected_query["step1"]
        assert config["dataQuery"] == expected_query[step], where

        # Per pipetask label: memory and the queue chosen by it.
        for label in LABELS[step]:
            memory = TASK_MEMORY.get(label, 2048)
            assert pipetask_value(config, label, "requestMemory") == memory, (where, label)
            queue = f"{compute_site}{EXPECTED_QUEUE_SUFFIX[memory]}"
            assert pipetask_value(config, label, "queue") == queue, (where, label)
            assert pipetask_value(config, label, "computeSite") == compute_site
            assert pipetask_value(config, label, "computeCloud") == cloud
            assert panda_compute_site(config, label) == compute_site
        # BPS's own init job and any label not listed: the default memory and its queue.
        assert pipetask_value(config, "pipetaskInit", "queue") == f"{compute_site}_Rubin"
        assert pipetask_value(config, "notInThisStep", "requestMemory") == 2048

        # The final job: the merge queue, and not BPS's default 16 CPUs / 32 GB.
        assert final_value(config, "queue") == f"{compute_site}_Rubin_Merge", where
        assert final_value(config, "requestMemory") == 4096, where
        assert final_value(config, "requestCpus") == 1, where
        # ctrl_bps defaults are still there (we only override).
        assert final_value(config, "whenRun") == "ALWAYS", where

        # What the PanDA plugin needs from config/bps_panda*.yaml, which the wheel lacks.
        assert config["placeholderParams"] == ["qgraphNodeId", "qgraphId"], where
        _, endpoint = config.search("fileDistributionEndPoint", opt={"replaceVars": False})
        assert endpoint.endswith("/"), where
        _, runner = config.search(
            "runnerCommand", opt={"replaceEnvVars": False, "expandEnvVars": False}
        )
        assert "python3 -m lsst.ctrl.bps.panda.edgenode.cmd_line_decoder _cmd_line_" in runner
        # Fully expanded (only shell ${...} left), and no EUPS path.
        assert "CTRL_BPS_PANDA_DIR" not in runner and not re.search(r"(?<!\$)\{", runner), runner
        assert config["memoryMultiplier"] == 1, where


def test_local_workload(spec: CampaignSpec, tmp_path: Path) -> None:
    submits = make_submits(spec, workload="local")
    for submit in submits:
        text = render_submit_yaml(submit)
        config = load_bps(text, tmp_path, submit.file_name)
        assert config["wmsServiceClass"] == LOCAL_WMS_SERVICE_CLASS
        assert "placeholderParams" not in config
        assert "runnerCommand" not in config
        assert final_value(config, "queue") == f"{COMPUTE[submit.site][0]}_Rubin_Merge"
        assert final_value(config, "requestCpus") == 1
        # BPS's default automatic memory scaling stays on for the local workload.
        assert config["memoryMultiplier"] == 2


def test_bps_init_submission_accepts_file(spec: CampaignSpec, tmp_path: Path) -> None:
    """``bps submit``'s first stage (init_submission) loads a file and fills in its names."""
    from lsst.ctrl.bps.initialize import init_submission

    submit = dataclasses.replace(
        make_submits(spec)[1], submit_path=str(tmp_path / "submit" / "{outputRun}")
    )
    path = tmp_path / submit.file_name
    path.write_text(render_submit_yaml(submit))
    config = init_submission(str(path), wms_service=NO_PLUGIN_DEFAULTS)
    assert config["outputRun"] == "dc2-test-med-1/step1/FrDF/run"
    assert config["uniqProcName"] == "dc2-test-med-1_step1_FrDF_run"
    assert config["operator"] == "drp-campaign"
    assert Path(config["submitPath"]) == tmp_path / "submit" / "dc2-test-med-1/step1/FrDF/run"
    assert config["fileDistributionEndPoint"].endswith(
        "/panda_cache_box/payload/dc2-test-med-1_step1_FrDF_run/"
    )


def test_clusters_carry_site_memory_and_queue(tmp_path: Path) -> None:
    submit = dataclasses.replace(
        _one_submit(),
        task_memory_mb={"isr": 2048, "calibrateImage": 6000},
        clusters={"visitCluster": ClusterSpec(("isr", "calibrateImage"), ("visit",))},
    )
    config = load_bps(render_submit_yaml(submit), tmp_path)
    assert config["clusterAlgorithm"].endswith("dimension_clustering")
    cluster = config["cluster"]["visitCluster"]
    assert cluster["pipetasks"] == "isr, calibrateImage"
    assert cluster["dimensions"] == "visit"
    # The cluster's job takes these from the cluster section (per-task computeSite is ignored).
    opts = config.get_search_opts("visitCluster")
    assert config.search("computeSite", opt=opts)[1] == "CC-IN2P3"
    assert cluster["queue"] == "CC-IN2P3_Rubin_Medium"
    assert cluster["requestMemory"] == 6000
    assert panda_compute_site(config, "visitCluster") == "CC-IN2P3"


def test_clusters_reject_label_twice() -> None:
    with pytest.raises(ValueError, match="one cluster only"):
        dataclasses.replace(
            _one_submit(),
            clusters={"a": ClusterSpec(("isr",), ("visit",)), "b": ClusterSpec(("isr",), ("x",))},
        )


def test_panda_options(tmp_path: Path) -> None:
    submit = dataclasses.replace(
        _one_submit(),
        idds_server="https://idds.example/idds",
        file_distribution_end_point="/cache/{uniqProcName}/",
        setup_command="source /opt/venv/bin/activate;",
    )
    config = load_bps(render_submit_yaml(submit), tmp_path)
    assert config["iddsServer"] == "https://idds.example/idds"
    assert config.search("fileDistributionEndPoint", opt={"replaceVars": False})[1] == (
        "/cache/{uniqProcName}/"
    )
    _, payload = config.search(
        "payloadCommand", opt={"replaceEnvVars": False, "expandEnvVars": False}
    )
    assert "source /opt/venv/bin/activate;" in payload


def test_gather_step_runs_at_hub_unrestricted(spec: CampaignSpec) -> None:
    (gather,) = [s for s in make_submits(spec) if s.step == "step2c"]
    assert gather.site == spec.hub == "USDF"
    assert gather.compute_site == "SLAC"
    assert gather.data_query == "instrument='LSSTCam-imSim' AND skymap='DC2_cells_v1'"
    assert gather.output_run == "dc2-test-med-1/step2c/USDF/run"


def test_site_without_work_gets_no_submit(spec: CampaignSpec) -> None:
    submits = submits_for_campaign(
        spec, {**VISITS, "UKDF": []}, {**TRACTS, "FrDF": []}, REPOS, TASK_MEMORY
    )
    pairs = {(s.step, s.site) for s in submits}
    assert ("step1", "UKDF") not in pairs and ("step3", "FrDF") not in pairs
    assert ("step3", "UKDF") in pairs
    assert all(s.workload == "local" for s in submits)


def test_missing_site_in_plan_or_repos(spec: CampaignSpec) -> None:
    with pytest.raises(ValueError, match="no visits given for site 'UKDF'"):
        submits_for_campaign(spec, {"USDF": [1], "FrDF": [2]}, TRACTS, REPOS)
    with pytest.raises(ValueError, match="no repository given for site 'FrDF'"):
        submits_for_campaign(spec, VISITS, TRACTS, {"USDF": "a", "UKDF": "b"})


def test_default_pipeline_is_the_resolved_path(spec: CampaignSpec) -> None:
    submit = submits_for_campaign(spec, VISITS, TRACTS, REPOS)[0]
    assert submit.pipeline_yaml == str(spec.pipeline.yaml_path)
    # Without labels_by_subset, every step lists every label given.
    every = submits_for_campaign(spec, VISITS, TRACTS, REPOS, TASK_MEMORY)[0]
    assert dict(every.task_memory_mb) == TASK_MEMORY


def test_attempt_changes_only_the_run(spec: CampaignSpec) -> None:
    first, again = make_submits(spec)[0], make_submits(spec, attempt=1)[0]
    assert again.output_run == "dc2-test-med-1/step1/USDF/run-attempt1"
    assert dataclasses.replace(again, output_run=first.output_run) == first


def test_rendering_is_deterministic(spec: CampaignSpec) -> None:
    first = [render_submit_yaml(s) for s in make_submits(spec)]
    second = [render_submit_yaml(s) for s in make_submits(spec)]
    assert first == second
    # Input order of the plan does not matter.
    reordered = {site: list(reversed(visits)) for site, visits in VISITS.items()}
    third = submits_for_campaign(
        spec,
        reordered,
        TRACTS,
        REPOS,
        dict(reversed(list(TASK_MEMORY.items()))),
        workload="panda",
        labels_by_subset=LABELS,
        pipeline_yaml=spec.pipeline.yaml,
    )
    assert [render_submit_yaml(s) for s in third] == first


def test_header_and_plain_yaml(spec: CampaignSpec) -> None:
    text = render_submit_yaml(make_submits(spec)[0])
    assert text.startswith("# Generated by drp_campaign.model.bps; do not edit")
    assert all(len(line) <= 100 for line in text.splitlines()[:4])
    doc = yaml.safe_load(text)
    assert list(doc)[:4] == ["project", "campaign", "operator", "pipelineYaml"]


# --------------------------------------------------------------------------------------------
# Golden files
# --------------------------------------------------------------------------------------------


def test_golden_files(spec: CampaignSpec) -> None:
    rendered = {s.file_name: render_submit_yaml(s) for s in make_submits(spec)}
    if os.environ.get("DRP_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for old in GOLDEN.glob("*.yaml"):
            if old.name not in rendered:
                old.unlink()
        for name, text in rendered.items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
    on_disk = sorted(path.name for path in GOLDEN.glob("*.yaml"))
    assert on_disk == sorted(rendered), "regenerate with DRP_UPDATE_GOLDEN=1 (see module doc)"
    for name, text in rendered.items():
        golden = (GOLDEN / name).read_text(encoding="utf-8")
        assert text == golden, f"{name} differs from its golden file; see the module docstring"


def _one_submit() -> SiteStepSubmit:
    return SiteStepSubmit(
        campaign="c",
        step="step1",
        subset="step1",
        site="FrDF",
        compute_site="CC-IN2P3",
        cloud="EU",
        pipeline_yaml="p.yaml",
        butler_config="/repo",
        data_query="instrument='LSSTCam' AND skymap='s' AND visit IN (1)",
        input_collections=["LSSTCam/raw/all"],
        output_run=output_run("c", "step1", "FrDF"),
        output_collection=output_collection("c", "FrDF"),
        workload="panda",
    )


def test_submits_list_the_real_pipeline_labels_of_each_step(spec: CampaignSpec) -> None:
    # The labels each step's file configures are exactly the subset's tasks in the pipeline
    # the campaign runs, as pipe_base reads it.
    from lsst.pipe.base import Pipeline

    pipeline_path = REPO / "pipelines" / "DRP-mock.yaml"
    labels = {
        step.subset: sorted(Pipeline.from_uri(f"{pipeline_path}#{step.subset}").task_labels)
        for step in spec.steps
    }
    submits = submits_for_campaign(
        spec,
        {"USDF": [1], "FrDF": [2], "UKDF": [3]},
        {"USDF": [3828], "FrDF": [3829], "UKDF": [3830]},
        {s: f"/repos/{s}" for s in spec.site_names},
        labels_by_subset=labels,
    )
    for submit in submits:
        assert sorted(submit.task_memory_mb) == labels[submit.subset]
        text = render_submit_yaml(submit)
        for label in labels[submit.subset]:
            assert f"  {label}:\n" in text
