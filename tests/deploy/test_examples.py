"""The examples validate as the API server would validate them: the CRD's structural schema (with
kubectl's strict field validation), its defaults, then its CEL rules; invalid CRs name their field."""

from __future__ import annotations

import copy
from pathlib import Path

import celpy
import jsonschema
import pytest
import yaml

from moe_operator.spec import DeploymentSpec

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "moedeployments.serving.moefleet.dev.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def apply_defaults(value, schema: dict):
    """Schema defaults, recursively, as the API server applies them before validation."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])
    return value


def strict(schema: dict) -> dict:
    """The schema with unknown fields rejected (kubectl's default --validate=strict) where not preserved."""
    out = {k: strict(v) if isinstance(v, dict) and k in ("items", "additionalProperties") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    return out


def cel_errors(value, schema: dict, path: str = "") -> list[str]:
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, celpy.CELEvalError) or not bool(result):
            errors.append(f"{path + rule.get('fieldPath', '')}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += cel_errors(value[key], sub, f"{path}.{key}" if path else key)
    return errors


def validation_errors(obj: dict) -> list[str]:
    """What the API server would say, as `path: message` lines (schema first; CEL only if it passes)."""
    schema = crd_schema()
    obj = apply_defaults(copy.deepcopy(obj), schema)
    body = {k: v for k, v in obj.items() if k != "metadata"}
    validator = jsonschema.Draft4Validator(strict({**schema, "properties": {
        k: v for k, v in schema["properties"].items() if k != "metadata"}}))
    errors = [".".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(body)]
    return errors or cel_errors(body, schema)


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def test_there_are_examples_for_a_preset_and_a_pvc_model():
    names = [p.name for p in EXAMPLES]
    assert "moedeployment-tiny.yaml" in names and "moedeployment-mixtral.yaml" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_crd_schema_and_cel_rules(path):
    assert validation_errors(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_servable_spec(path):
    obj = apply_defaults(yaml.safe_load(path.read_text()), crd_schema())
    spec = DeploymentSpec.from_resource({**obj, "metadata": {**obj["metadata"], "uid": "u"}})
    assert spec.name == obj["metadata"]["name"]


def test_every_cel_rule_compiles():
    env, rules, stack = celpy.Environment(), [], [crd_schema()]
    while stack:
        node = stack.pop()
        rules += [r["rule"] for r in node.get("x-kubernetes-validations", [])]
        stack += list(node.get("properties", {}).values())
        stack += [node[k] for k in ("items", "additionalProperties") if isinstance(node.get(k), dict)]
    assert len(rules) >= 8
    for rule in rules:
        env.compile(rule)


def test_lists_and_strings_walked_by_cel_rules_are_bounded():
    rebalancing = crd_schema()["properties"]["spec"]["properties"]["rebalancing"]
    placement = rebalancing["properties"]["pinnedPlacement"]
    assert placement["properties"]["slots"]["maxItems"] <= 256
    assert placement["properties"]["slots"]["items"]["maxItems"] <= 8192


def _tiny(**spec) -> dict:
    obj = example("moedeployment-tiny.yaml")
    obj["spec"].update(spec)
    return obj


def _pinned(num_ranks: int, slots_per_rank: int, slots: list) -> dict:
    return {"pinnedPlacement": {"version": 1, "numRanks": num_ranks, "slotsPerRank": slots_per_rank,
                                "slots": slots}}


@pytest.mark.parametrize(("patch", "expected"), [
    ({"model": {"preset": "tiny", "pvc": {"claimName": "c"}}},
     "spec.model: exactly one of model.preset or model.pvc"),
    ({"model": {}}, "spec.model: exactly one of model.preset or model.pvc"),
    ({"model": {"pvc": {"claimName": "c"}}}, "spec.model: a pvc model needs numExperts and numLayers"),
    ({"model": {"preset": "tiny", "init": {"image": "i", "command": ["true"]}}},
     "spec.model: model.init fills a volume"),
    ({"expertBuffering": {"enabled": True}},
     "spec.expertBuffering: enabled requires slotsPerLayer or gpuMemoryBytes"),
    ({"expertBuffering": {"slotsPerLayer": 2, "gpuMemoryBytes": 10}},
     "spec.expertBuffering: set at most one"),
    ({"serving": {"grpcPort": 8002}}, "spec.serving: grpcPort, metricsPort and adminPort must differ"),
    ({"serving": {"adminPort": 29500}}, "spec.serving: port 29500 is the rendezvous port"),
    ({"rebalancing": _pinned(1, 8, [list(range(8))] * 2)},
     "spec.rebalancing.pinnedPlacement.numRanks: rebalancing.pinnedPlacement.numRanks must equal"),
    ({"rebalancing": _pinned(2, 4, [[0, 1, 2]])},
     "spec.rebalancing.pinnedPlacement.slots: every layer of slots must hold numRanks * slotsPerRank"),
])
def test_invalid_cr_is_rejected_by_a_cel_rule_naming_the_field(patch, expected):
    errors = validation_errors(_tiny(**patch))
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize(("patch", "field"), [
    ({"rebalancing": {"mode": "Sometimes"}}, "spec.rebalancing.mode"),
    ({"gating": {"capacityFraction": 0}}, "spec.gating.capacityFraction"),
    ({"expertParallelSize": 0}, "spec.expertParallelSize"),
    ({"replicas": "two"}, "spec.replicas"),
    ({"resources": {"requests": {"memory": "lots"}}}, "spec.resources.requests.memory"),
    ({"rebalancing": {"imbalanceThreshold": 0.5}}, "spec.rebalancing.imbalanceThreshold"),
    ({"expertParalelSize": 2}, "spec"),
    ({"model": {"preset": "gpt-5"}}, "spec.model.preset"),
])
def test_invalid_cr_is_rejected_by_the_schema_naming_the_field(patch, field):
    errors = validation_errors(_tiny(**patch))
    assert any(e.split(":")[0] == field for e in errors), errors


def test_defaults_fill_nested_objects_so_rules_see_them():
    obj = apply_defaults({"spec": {"model": {"preset": "tiny"}}}, crd_schema())
    assert obj["spec"]["expertBuffering"] == {"enabled": False, "policy": "lifo", "prefetch": True}
    assert obj["spec"]["rebalancing"]["mode"] == "Off"
    assert validation_errors({"apiVersion": "serving.moefleet.dev/v1alpha1", "kind": "MoEDeployment",
                              "metadata": {"name": "m"}, "spec": {"model": {"preset": "tiny"}}}) == []
