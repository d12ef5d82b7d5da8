"""spec.py: parsing MoEDeployments into typed specs, their defaults, impossible specs, RuntimeConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from moe_operator.config import OperatorConfig, OperatorConfigError
from moe_operator.spec import (
    PRESET_SHAPES,
    DeploymentSpec,
    DeploymentStatus,
    ExpertBufferingSpec,
    GatingSpec,
    RebalancingSpec,
    RolloutSpec,
    ServingSpec,
    SpecError,
    camel,
    to_runtime_config,
)
from moe_runtime.config import (
    ExpertBufferingConfig,
    GatingConfig,
    RuntimeConfig,
    ServingConfig,
)
from moe_runtime.placement import Placement

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "moedeployments.serving.moefleet.dev.yaml"


def resource(name: str = "m", **spec) -> dict:
    return {"apiVersion": "serving.moefleet.dev/v1alpha1", "kind": "MoEDeployment",
            "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 3},
            "spec": {"model": {"preset": "tiny"}, **spec}}


def example(name: str) -> dict:
    obj = yaml.safe_load((ROOT / "examples" / name).read_text())
    obj["metadata"].update(namespace="ns", uid="uid-1")
    return obj


def spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_minimal_resource_gets_the_defaults():
    spec = DeploymentSpec.from_resource(resource())
    assert (spec.name, spec.namespace, spec.uid, spec.generation) == ("m", "ns", "uid-1", 3)
    assert (spec.replicas, spec.expert_parallel_size, spec.resources.gpus) == (1, 1, 1)
    assert spec.model.num_experts == 8 and spec.model.directory == "tiny"
    assert spec.rebalancing.mode == "Off" and not spec.rebalancing.automatic
    assert spec.slots_per_rank == 8


@pytest.mark.parametrize(("key", "cls"), [
    ("gating", GatingSpec), ("expertBuffering", ExpertBufferingSpec), ("rebalancing", RebalancingSpec),
    ("rollout", RolloutSpec), ("serving", ServingSpec),
])
def test_dataclass_defaults_equal_the_crd_schema_defaults(key, cls):
    properties = spec_schema()["properties"][key]["properties"]
    for f in dataclasses.fields(cls):
        if "default" in properties.get(camel(f.name), {}):
            assert properties[camel(f.name)]["default"] == f.default, f.name
        else:
            assert f.default is None, f"{key}.{camel(f.name)} has no schema default"


def test_top_level_defaults_equal_the_crd_schema_defaults():
    properties, defaults = spec_schema()["properties"], DeploymentSpec.from_resource(resource())
    for name in ("image_pull_policy", "replicas", "expert_parallel_size", "dtype", "revision_history_limit"):
        assert properties[camel(name)]["default"] == getattr(defaults, name), name
    assert properties["resources"]["properties"]["gpus"]["default"] == defaults.resources.gpus


@pytest.mark.parametrize(("ours", "theirs"), [
    (ServingSpec, ServingConfig), (GatingSpec, GatingConfig), (ExpertBufferingSpec, ExpertBufferingConfig),
])
def test_runtime_defaults_are_the_runtime_config_defaults(ours, theirs):
    defaults = {f.name: f.default for f in dataclasses.fields(theirs)}
    for f in dataclasses.fields(ours):
        assert defaults[f.name] == f.default, f.name
    assert DeploymentSpec.from_resource(resource()).dtype == RuntimeConfig().dtype


def test_preset_table_matches_the_runtime_presets_and_the_crd_enum():
    model = pytest.importorskip("moe_runtime.model")  # imports torch: only the test may
    for name, (experts, layers) in PRESET_SHAPES.items():
        args = model.ModelArgs.from_name(name)
        assert (args.num_experts, args.num_layers) == (experts, layers), name
    assert set(PRESET_SHAPES) == set(model.PRESETS)
    assert spec_schema()["properties"]["model"]["properties"]["preset"]["enum"] == list(PRESET_SHAPES)


def test_more_ranks_than_experts_is_an_impossible_spec_naming_the_field():
    with pytest.raises(SpecError) as info:
        DeploymentSpec.from_resource(resource(expertParallelSize=16))
    assert info.value.path == "spec.expertParallelSize"
    assert "8 experts" in str(info.value)


def test_pinned_placement_is_parsed_from_camel_case():
    pinned = {"version": 7, "numRanks": 2, "slotsPerRank": 5, "slots": [[0, 1, 2, 3, 0, 4, 5, 6, 7, 1]] * 2}
    rebalancing = {"mode": "InPlace", "pinnedPlacement": pinned}
    spec = DeploymentSpec.from_resource(resource(expertParallelSize=2, rebalancing=rebalancing))
    assert spec.rebalancing.pinned_placement == Placement(7, 2, 5, ((0, 1, 2, 3, 0, 4, 5, 6, 7, 1),) * 2)
    assert spec.slots_per_rank == 5 and spec.initial_placement().version == 7
    assert not spec.rebalancing.automatic
    shares = [[0.25, 0.5, 1, 1, 0.75, 1, 1, 1, 1, 0.5]] * 2  # expert 0: 1/4 + 3/4, expert 1: 1/2 + 1/2
    rebalancing["pinnedPlacement"] = pinned | {"shares": shares}
    spec = DeploymentSpec.from_resource(resource(expertParallelSize=2, rebalancing=rebalancing))
    assert spec.rebalancing.pinned_placement.shares == tuple(map(tuple, shares))


@pytest.mark.parametrize(("pinned", "path", "words"), [
    ({"version": 1, "numRanks": 2, "slotsPerRank": 4, "slots": [[0, 1, 2, 3, 4, 5, 6, 6]] * 2},
     "spec.rebalancing.pinnedPlacement", "not placed"),
    ({"version": 1, "numRanks": 2, "slotsPerRank": 4, "slots": [[0, 1, 2, 3, 4, 5, 6, 7]]},
     "spec.rebalancing.pinnedPlacement", "1 layers"),
    ({"version": 1, "numRanks": 1, "slotsPerRank": 8, "slots": [list(range(8))] * 2},
     "spec.rebalancing.pinnedPlacement.numRanks", "expertParallelSize"),
    ({"version": 1, "numRanks": 2, "slotsPerRank": 4, "slots": [list(range(8))] * 2, "extra": 1},
     "spec.rebalancing.pinnedPlacement", "unknown"),
])
def test_bad_pinned_placement_is_rejected_naming_the_field(pinned, path, words):
    with pytest.raises(SpecError) as info:
        DeploymentSpec.from_resource(resource(expertParallelSize=2, rebalancing={"pinnedPlacement": pinned}))
    assert info.value.path == path and words in info.value.message


@pytest.mark.parametrize(("spec", "path"), [
    ({"model": {"pvc": {"claimName": "c"}}}, "spec.model"),
    ({"model": {"preset": "tiny", "numExperts": 4}}, "spec.model.numExperts"),
    ({"model": {"preset": "tiny", "pvc": {"claimName": "c"}}}, "spec.model"),
    ({"model": {"preset": "tiny", "init": {"image": "i", "command": ["true"]}}}, "spec.model.init"),
    ({"replicas": "two"}, "spec.replicas"),
    ({"gating": {"capacityFraction": "big"}}, "spec.gating.capacityFraction"),
    ({"serving": []}, "spec.serving"),
])
def test_bad_spec_names_its_field(spec, path):
    with pytest.raises(SpecError) as info:
        DeploymentSpec.from_resource(resource(**spec))
    assert info.value.path == path


@pytest.mark.parametrize("name", ["a" * 46, "Upper", "9lives", "dotted.name"])
def test_name_that_cannot_name_services_and_pods_is_rejected(name):
    with pytest.raises(SpecError) as info:
        DeploymentSpec.from_resource(resource(name=name))
    assert info.value.path == "metadata.name"


def test_image_defaults_to_the_operator_runtime_image():
    assert DeploymentSpec.from_resource(resource(), default_image="reg/rt:1").image == "reg/rt:1"
    assert DeploymentSpec.from_resource(resource(image="reg/own:2"), default_image="x").image == "reg/own:2"


@pytest.mark.parametrize("name", ["moedeployment-tiny.yaml", "moedeployment-mixtral.yaml"])
def test_runtime_config_is_accepted_by_the_runtime(name):
    config = to_runtime_config(DeploymentSpec.from_resource(example(name)))
    assert RuntimeConfig.from_dict(config).to_dict() == config  # every field, exactly RuntimeConfig's
    assert RuntimeConfig.from_dict(yaml.safe_load(yaml.safe_dump(config))).to_dict() == config


def test_runtime_config_points_at_the_mounted_model_and_placement():
    mixtral = to_runtime_config(DeploymentSpec.from_resource(example("moedeployment-mixtral.yaml")))
    assert mixtral["model"] == "/models/Mixtral-8x7B-Instruct-v0.1"
    assert mixtral["device"] == "cuda" and mixtral["dtype"] == "bfloat16"
    assert mixtral["placement_file"] == "/etc/moe/placement/placement.json"
    assert mixtral["expert_buffering"]["slots_per_layer"] == 3
    assert mixtral["serving"]["drain_grace_seconds"] == 120.0
    tiny = to_runtime_config(DeploymentSpec.from_resource(example("moedeployment-tiny.yaml")))
    assert (tiny["model"], tiny["device"]) == ("tiny", "cpu")


def test_round_robin_initial_placement_fills_every_rank():
    spec = DeploymentSpec.from_resource(example("moedeployment-tiny.yaml"))
    placement = spec.initial_placement()
    assert (placement.num_ranks, placement.slots_per_rank, placement.num_layers) == (2, 5, 2)
    placement.validate(8, 2)


def test_status_round_trips_through_camel_case():
    body = {"status": {
        "observedGeneration": 3, "replicas": 2, "readyReplicas": 1, "updatedReplicas": 2,
        "selector": "a=b", "conditions": [{"type": "Ready", "status": "False", "reason": "GroupsNotReady",
                                           "message": "1/2", "lastTransitionTime": "2026-01-01T00:00:00Z",
                                           "observedGeneration": 3}],
        "placement": {"currentVersion": 4, "targetVersion": 5, "imbalance": 1.4,
                      "history": [{"version": 4, "time": "2026-01-01T00:00:00Z", "imbalance": 1.9,
                                   "reason": "Rebalanced"}]},
        "kopf": {"progress": {}},
    }}
    status = DeploymentStatus.from_resource(body)
    assert status.condition("Ready").reason == "GroupsNotReady"
    assert status.placement.history[0].version == 4
    assert status.to_dict() == {k: v for k, v in body["status"].items() if k != "kopf"}


def test_operator_config_reads_its_environment():
    config = OperatorConfig.from_env({
        "MOE_OPERATOR_NAMESPACES": "b, a,", "MOE_OPERATOR_LOAD_POLL_SECONDS": "2.5",
        "MOE_OPERATOR_STANDALONE": "false", "MOE_OPERATOR_METRICS_PORT": "9100"})
    assert config.namespaces == ("a", "b") and not config.all_namespaces
    assert (config.load_poll_seconds, config.standalone, config.metrics_port) == (2.5, False, 9100)
    assert OperatorConfig.from_env({}) == OperatorConfig()
    assert OperatorConfig.from_env({}).liveness_endpoint == "http://0.0.0.0:8080/healthz"


@pytest.mark.parametrize(("env", "variable"), [
    ({"MOE_OPERATOR_LOAD_POLL_SECONDS": "soon"}, "MOE_OPERATOR_LOAD_POLL_SECONDS"),
    ({"MOE_OPERATOR_LOAD_POLL_SECONDS": "0"}, "MOE_OPERATOR_LOAD_POLL_SECONDS"),
    ({"MOE_OPERATOR_HEALTH_PORT": "9090"}, "MOE_OPERATOR_HEALTH_PORT"),
    ({"MOE_OPERATOR_STANDALONE": "maybe"}, "MOE_OPERATOR_STANDALONE"),
])
def test_bad_operator_environment_names_the_variable(env, variable):
    with pytest.raises(OperatorConfigError, match=variable):
        OperatorConfig.from_env(env)
