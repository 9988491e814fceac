"""deployments/prefect.yaml: every entrypoint imports, every parameter exists, no secrets.

`prefect deploy` only warns about a parameter the flow does not take; these checks fail instead.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
EXPECTED = {"drp-campaign", "drp-step", "drp-site-step", "drp-plan", "drp-replan"}


def _deployments() -> list[dict[str, Any]]:
    return list(yaml.safe_load(PREFECT_YAML.read_text())["deployments"])


def _flow(entrypoint: str) -> Any:
    path, name = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_the_five_flows_are_deployed_as_default() -> None:
    names = {(_flow(d["entrypoint"]).name, d["name"]) for d in _deployments()}
    assert names == {(flow, "default") for flow in EXPECTED}


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["entrypoint"])
def test_entrypoint_imports_and_parameters_exist(deployment: dict[str, Any]) -> None:
    flow = _flow(deployment["entrypoint"])
    signature = inspect.signature(flow.fn)
    params = set(deployment.get("parameters") or {})
    assert params <= set(signature.parameters), (
        f"{deployment['entrypoint']}: unknown parameters {params - set(signature.parameters)}"
    )
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= params, f"{deployment['entrypoint']}: no default for {required - params}"
    # Parameters are names and paths: a secret would be visible to anyone reading the UI.
    for key, value in (deployment.get("parameters") or {}).items():
        assert not any(w in key.lower() for w in ("token", "password", "secret")), key
        assert isinstance(value, (str, int, float, bool, list)), (key, value)
    assert deployment["work_pool"]["name"] == "drp-campaign"


def test_default_parameters_point_at_real_files() -> None:
    for d in _deployments():
        spec = (d.get("parameters") or {}).get("spec")
        if spec:
            assert (ROOT / spec).is_file(), spec
