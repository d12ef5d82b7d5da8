"""Placement format (with and without replica shares), load metric and planners (issue 6): properties for
every planner, hand examples."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime import placement_planners
from moe_runtime.placement import (
    PLANNERS,
    Placement,
    PlacementError,
    add_plan_arguments,
    anti_correlation,
    balancedness,
    coactivation,
    expert_load_from_slots,
    expert_load_from_trace,
    greedy,
    imbalance,
    layer_imbalance,
    plan_main,
    plan_placement,
    rank_loads,
    rank_loads_from_slots,
    replicate_pack,
    round_robin,
    slots_per_rank_for,
)
from moe_runtime.traces import Trace, save_trace, synthetic_skewed_trace


@st.composite
def planner_inputs(draw):
    num_layers = draw(st.integers(1, 3))
    num_experts = draw(st.integers(1, 12))
    num_ranks = draw(st.integers(1, 5))
    slots = slots_per_rank_for(num_experts, num_ranks, draw(st.integers(0, 2)))
    values = st.one_of(st.just(0.0), st.floats(0, 1e4, allow_nan=False), st.integers(0, 5).map(float))
    load = np.array(
        draw(st.lists(values, min_size=num_layers * num_experts, max_size=num_layers * num_experts))
    )
    raw = np.random.default_rng(draw(st.integers(0, 2**16))).normal(
        size=(num_layers, num_experts, num_experts)
    )
    corr = np.clip((raw + raw.transpose(0, 2, 1)) / 2, -1, 1)
    return load.reshape(num_layers, num_experts), num_ranks, slots, corr


def plan(name, load, num_ranks, slots, corr, seed=0, version=3):
    return plan_placement(name, load, num_ranks, slots, version=version, coactivation=corr, seed=seed)


@pytest.mark.parametrize("name", list(PLANNERS))
@settings(max_examples=60, deadline=None)
@given(inputs=planner_inputs(), seed=st.integers(0, 3))
def test_every_expert_is_placed_at_least_once_within_the_slots_per_rank(name, inputs, seed):
    load, num_ranks, slots, corr = inputs
    placement = plan(name, load, num_ranks, slots, corr, seed)
    placement.validate(load.shape[1], load.shape[0])  # every expert placed, known ids, slot count
    assert (placement.version, placement.num_ranks, placement.slots_per_rank) == (3, num_ranks, slots)
    for layer in range(load.shape[0]):
        assert sorted(placement.replicas(layer)) == list(range(load.shape[1]))


@pytest.mark.parametrize("name", list(PLANNERS))
@settings(max_examples=30, deadline=None)
@given(inputs=planner_inputs(), seed=st.integers(0, 3))
def test_planner_is_deterministic_for_a_seed_and_round_trips_through_json(name, inputs, seed):
    load, num_ranks, slots, corr = inputs
    placement = plan(name, load, num_ranks, slots, corr, seed)
    assert plan(name, load, num_ranks, slots, corr, seed) == placement
    assert Placement.from_json(placement.to_json()) == placement
    assert Placement.from_dict(json.loads(json.dumps(placement.to_dict()))) == placement


@pytest.mark.parametrize("name", list(PLANNERS))
@settings(max_examples=100, deadline=None)
@given(inputs=planner_inputs(), seed=st.integers(0, 3))
def test_no_planner_puts_two_replicas_of_an_expert_on_one_rank_when_avoidable(name, inputs, seed):
    load, num_ranks, slots, corr = inputs
    placement = plan(name, load, num_ranks, slots, corr, seed)
    for layer in range(load.shape[0]):
        if max(len(s) for s in placement.replicas(layer).values()) > num_ranks:
            continue  # more replicas than ranks: a duplicate cannot be avoided
        for rank in range(num_ranks):
            held = placement.slots[layer][rank * slots : (rank + 1) * slots]
            assert len(set(held)) == len(held)


@settings(max_examples=60, deadline=None)
@given(inputs=planner_inputs())
def test_replicate_pack_is_never_worse_than_greedy_beyond_the_noise_of_its_fit_load(inputs):
    load, num_ranks, slots, _ = inputs
    ours = rank_loads(replicate_pack(load, num_ranks, slots, version=0), load).max(axis=1)
    paper = rank_loads(greedy(load, num_ranks, slots, version=0), load).max(axis=1)
    # loads are token-slot counts: a change gaining less than 2 sqrt(load) is not taken, which bounds the gap
    assert (ours <= paper + 2 * np.sqrt(paper + 1) + 2 + 1e-9).all()


@settings(max_examples=60, deadline=None)
@given(inputs=planner_inputs())
def test_replicate_pack_shares_lower_the_fit_loads_maximum_or_cost_at_most_their_noise_margin(inputs):
    load, num_ranks, slots, _ = inputs
    placement = replicate_pack(load, num_ranks, slots, version=0)
    equal = Placement(0, num_ranks, slots, placement.slots)
    ours, split_evenly = rank_loads(placement, load).max(axis=1), rank_loads(equal, load).max(axis=1)
    # shares level load + SHARE_STANDARD_ERRORS sqrt(variance): a rank may end that much above the even split
    margin = placement_planners.SHARE_STANDARD_ERRORS * np.sqrt(split_evenly + 1) + 1e-5 * load.sum(axis=1)
    assert (ours <= split_evenly + margin).all()
    if placement.shares is not None:
        assert any(len(s) > 1 for layer in range(load.shape[0]) for s in placement.replicas(layer).values())


def test_replica_shares_level_the_ranks_where_equal_splits_cannot(monkeypatch):
    monkeypatch.setattr(placement_planners, "SHARE_STANDARD_ERRORS", 0.0)  # level the loads alone
    load = np.array([[9.0, 1.0, 3.0]])  # expert 0 on both ranks: equal halves give 5.5 and 7.5
    placement = replicate_pack(load, 2, 2, version=0)
    assert sorted(placement.replicas(0)[0]) == [0, 2] and placement.shares is not None
    assert rank_loads(placement, load) == pytest.approx(np.array([[6.5, 6.5]]), abs=1e-4)
    assert placement.slot_shares()[0, [0, 2]].sum() == pytest.approx(1.0, abs=1e-12)


def test_a_balanced_plan_carries_no_shares():
    placement = replicate_pack(np.full((2, 4), 100.0), 2, 3, version=0)
    assert placement.shares is None and '"shares"' not in placement.to_json()


def good() -> Placement:
    return Placement(version=2, num_ranks=2, slots_per_rank=2, slots=((0, 1, 2, 3), (3, 2, 1, 0)))


def shared() -> Placement:
    """Expert 0 on both ranks, its replicas taking 1/4 and 3/4 of its token-slots."""
    return Placement(3, 2, 2, ((0, 1, 0, 2),), ((0.25, 1.0, 0.75, 1.0),))


@pytest.mark.parametrize(
    ("bad", "num_experts", "message"),
    [
        (Placement(1, 2, 2, ((0, 1, 2, 9), (0, 1, 2, 3))), 4, "unknown expert 9"),
        (Placement(1, 2, 2, ((0, 1, 2, 2), (0, 1, 2, 3))), 4, r"experts \[3\] are not placed"),
        (Placement(1, 2, 2, ((0, 1, 2, 3, 0), (0, 1, 2, 3))), 4, "capacity exceeded"),
        (Placement(1, 2, 2, ((0, 1, 2), (0, 1, 2, 3))), 4, "has 3 slots, expected 4"),
        (Placement(1, 2, 2, ((0, 1, 2, 3),)), 5, "capacity exceeded: 5 experts"),
        (Placement(1, 0, 2, ((),)), 4, "num_ranks must be an integer >= 1"),
        (Placement(1, 2, 0, ((),)), 4, "slots_per_rank must be an integer >= 1"),
        (Placement(-1, 2, 2, ((0, 1, 2, 3),)), 4, "version must be an integer >= 0"),
        (Placement(1, 2, 2, ()), 4, "no layers"),
        (Placement(1, 2, 2, ((0, 1, 2, -1),)), 4, "negative expert id"),
        (good(), 0, "num_experts must be positive"),
        (Placement(1, 2, 2, ((0, 1, 0, 2),), ((0.5, 1.0, 0.6, 1.0),)), 3, "expert 0's replicas sum to 1.1"),
        (Placement(1, 2, 2, ((0, 1, 0, 2),), ((-0.5, 1.0, 1.5, 1.0),)), 3, "finite and non-negative"),
        (Placement(1, 2, 2, ((0, 1, 0, 2),), ((0.5, 1.0, 0.5),)), 3, "has 3 shares, expected 4"),
        (Placement(1, 2, 2, ((0, 1, 0, 2),), ((0.5, 1.0, 0.5, 1.0),) * 2), 3, "shares has 2 layers"),
    ],
)
def test_bad_placement_is_rejected(bad, num_experts, message):
    with pytest.raises(PlacementError, match=message):
        bad.validate(num_experts)


def test_placement_with_the_wrong_number_of_layers_is_rejected():
    with pytest.raises(PlacementError, match="placement has 2 layers, the model has 3"):
        good().validate(4, num_layers=3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"num_ranks": 2, "slots": [[0, 1]], "version": 0}', r"missing \['slots_per_rank'\]"),
        (
            '{"num_ranks": 2, "slots": [[0, 1]], "slots_per_rank": 1, "version": 0, "x": 1}',
            r"unknown \['x'\]",
        ),
        (
            '{"num_ranks": "2", "slots": [[0, 1]], "slots_per_rank": 1, "version": 0}',
            "num_ranks must be an int",
        ),
        ('{"num_ranks": 2, "slots": [0, 1], "slots_per_rank": 1, "version": 0}', "list of layers"),
        ('{"num_ranks": 2, "slots": [[0, 1.5]], "slots_per_rank": 1, "version": 0}', "integer expert ids"),
        (
            '{"num_ranks": 2, "slots": [[0, 1, 2]], "slots_per_rank": 1, "version": 0}',
            "has 3 slots, expected 2",
        ),
        ('{"num_ranks": 2, "slots": [[0, 1]], "slots_per_rank": 1, "version": -4}', "version must be"),
        (
            '{"num_ranks": 2, "shares": [[1, "x"]], "slots": [[0, 1]], "slots_per_rank": 1, "version": 0}',
            "shares must be a list of layers",
        ),
        (
            '{"num_ranks": 2, "shares": [[1, 0.5]], "slots": [[0, 1]], "slots_per_rank": 1, "version": 0}',
            "expert 1's replicas sum to 0.5",
        ),
    ],
)
def test_malformed_placement_json_is_rejected_naming_the_problem(text, message):
    with pytest.raises(PlacementError, match=message):
        Placement.from_json(text)


def test_placement_json_is_stable_sorted_and_one_layer_per_line():
    assert good().to_json() == (
        '{\n  "num_ranks": 2,\n  "slots": [\n    [0, 1, 2, 3],\n    [3, 2, 1, 0]\n  ],\n'
        '  "slots_per_rank": 2,\n  "version": 2\n}\n'
    )
    assert list(json.loads(good().to_json())) == sorted(good().to_dict())


def test_placement_with_shares_round_trips_and_one_without_reads_and_hashes_as_before_shares():
    placement = shared()
    assert Placement.from_json(placement.to_json()) == placement
    assert Placement.from_proto(placement.to_proto()) == placement
    assert list(json.loads(placement.to_json())) == sorted(placement.to_dict())
    assert '\n  "shares": [\n    [0.25, 1.0, 0.75, 1.0]\n  ],\n' in placement.to_json()
    old = good()  # what every placement.json written before shares looks like
    assert Placement.from_json(old.to_json()).shares is None and Placement.from_proto(old.to_proto()) == old
    assert old.digest() == "5fc2427012f6688a"  # the digest the operator annotated before shares existed
    unshared = Placement(3, 2, 2, placement.slots)
    assert unshared.digest() != placement.digest() and not unshared.same_body(placement)
    assert unshared.slot_shares().tolist() == [[0.5, 1.0, 0.5, 1.0]]


def test_same_body_with_another_version_has_the_same_digest():
    placement = good()
    newer = placement.with_version(7)
    assert newer.version == 7 and newer.same_body(placement) and newer != placement
    assert newer.digest() == placement.digest() and len(placement.digest()) == 16
    other = Placement(2, 2, 2, ((0, 1, 2, 3), (0, 1, 2, 3)))
    assert not other.same_body(placement) and other.digest() != placement.digest()
    assert Placement(2, 4, 1, placement.slots).digest() != placement.digest()


def test_replicas_and_rank_of_slot_follow_the_rank_major_layout():
    placement = Placement(0, 2, 3, ((0, 1, 0, 2, 1, 3),))
    assert placement.replicas(0) == {0: [0, 2], 1: [1, 4], 2: [3], 3: [5]}
    assert [placement.rank_of_slot(p) for p in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(PlacementError, match="out of range"):
        placement.rank_of_slot(6)


def test_round_robin_fills_extra_slots_with_replicas_in_order():
    placement = round_robin(num_layers=2, num_experts=5, num_ranks=2)
    assert placement.slots_per_rank == 3 and placement.slots == ((0, 1, 2, 3, 4, 0),) * 2
    assert round_robin(1, 4, 2, slots_per_rank=3, version=5).slots == ((0, 1, 2, 3, 0, 1),)
    with pytest.raises(PlacementError, match="capacity exceeded"):
        round_robin(1, 8, 2, slots_per_rank=3)


def test_imbalance_of_a_perfectly_balanced_load_is_one():
    placement = round_robin(3, 8, 4)
    load = np.full((3, 8), 10.0)
    assert imbalance(rank_loads(placement, load)) == 1.0
    assert balancedness(rank_loads(placement, load)) == 1.0
    assert imbalance(np.zeros((2, 4))) == 1.0  # an idle window counts as balanced


def test_imbalance_is_max_over_mean_per_layer_averaged_over_layers():
    rank_load = np.array([[4.0, 0.0], [3.0, 1.0]])  # layer imbalance 2.0 and 1.5
    assert layer_imbalance(rank_load).tolist() == [2.0, 1.5]
    assert imbalance(rank_load) == 1.75 and balancedness(rank_load) == pytest.approx(1 / 1.75)


def test_an_expert_load_is_split_evenly_over_its_replicas():
    placement = Placement(0, 2, 2, ((0, 1, 0, 2),))
    assert rank_loads(placement, np.array([[8.0, 1.0, 3.0]])).tolist() == [[5.0, 7.0]]
    per_batch = np.array([[[8.0, 1.0, 3.0]], [[0.0, 2.0, 2.0]]])  # [B, L, E]
    assert rank_loads(placement, per_batch).tolist() == [[[5.0, 7.0]], [[2.0, 2.0]]]
    slot_load = np.array([[4.0, 1.0, 4.0, 3.0]])
    assert rank_loads_from_slots(placement, slot_load).tolist() == [[5.0, 7.0]]
    assert expert_load_from_slots(placement, slot_load, 3).tolist() == [[8.0, 1.0, 3.0]]


def test_an_expert_load_is_split_over_its_replicas_by_their_shares():
    assert rank_loads(shared(), np.array([[8.0, 1.0, 3.0]])).tolist() == [[3.0, 9.0]]  # 2 + 1, 6 + 3


def test_greedy_reproduces_lpt_on_a_hand_example():
    load = np.array([[3.0, 7.0, 2.0, 6.0, 4.0, 5.0]])
    # LPT: 7->r0, 6->r1, 5->r1 (11), 4->r0 (11), 3->r0 (tie: lowest rank, 14, full), 2->r1 (13)
    placement = greedy(load, 2, 3, version=0)
    assert [sorted(placement.slots[0][:3]), sorted(placement.slots[0][3:])] == [[0, 1, 4], [2, 3, 5]]
    assert rank_loads(placement, load).tolist() == [[14.0, 13.0]]


@pytest.mark.parametrize("seed", range(8))
def test_anti_correlation_separates_two_perfectly_coactivated_experts_when_loads_tie(seed):
    # every token routes to the pair {0, 1} or to the pair {2, 3}, half the tokens each: all loads tie
    pair = np.random.default_rng(seed).permutation(np.repeat([0, 1], 256))
    trace = Trace(np.stack([2 * pair, 2 * pair + 1], axis=1)[:, None, :], None, num_experts=4)  # [N, 1, 2]
    load, corr = expert_load_from_trace(trace), coactivation(trace, batch_tokens=8)
    assert np.ptp(load) == 0 and corr[0, 0, 1] == pytest.approx(1.0)
    placement = anti_correlation(load, 2, 2, version=0, coactivation=corr, seed=seed)
    rank = {e: placement.rank_of_slot(slots[0]) for e, slots in placement.replicas(0).items()}
    assert rank[0] != rank[1] and rank[2] != rank[3]


def test_anti_correlation_needs_coactivation():
    with pytest.raises(PlacementError, match="needs coactivation"):
        anti_correlation(np.ones((1, 4)), 2, 2, version=0)


def test_replicate_pack_with_one_redundant_slot_per_rank_beats_greedy_on_a_skewed_load():
    load = 1e5 * (np.arange(1, 17, dtype=float) ** -1.2)[None]  # token-slots, Zipf over 16 experts
    slots = slots_per_rank_for(16, 4, redundant_slots=1)
    ours = imbalance(rank_loads(replicate_pack(load, 4, slots, version=0), load))
    paper = imbalance(rank_loads(greedy(load, 4, slots, version=0), load))
    assert ours < paper and ours < 1.05


def test_unknown_planner_is_rejected_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: round_robin, greedy, anti_correlation, replicate_pack"):
        plan_placement("magic", np.ones((1, 4)), 2, 2, version=0)


@pytest.mark.parametrize(
    ("load", "ranks", "slots", "message"),
    [
        (np.ones((1, 5)), 2, 2, "capacity exceeded"),
        (-np.ones((1, 4)), 2, 2, "non-negative"),
        (np.ones(4), 2, 2, r"\[layers, experts\]"),
        (np.ones((1, 4)), 0, 2, "both must be positive"),
    ],
)
def test_bad_planner_input_is_rejected(load, ranks, slots, message):
    with pytest.raises(PlacementError, match=message):
        replicate_pack(load, ranks, slots, version=0)


def test_expert_load_and_coactivation_are_counted_from_a_trace():
    ids = np.array([[[0, 1]], [[0, 1]], [[2, 3]], [[2, 3]], [[0, 2]]])  # [N=5, L=1, K=2]
    trace = Trace(ids, None, num_experts=4)
    assert expert_load_from_trace(trace).tolist() == [[3.0, 2.0, 3.0, 2.0]]
    assert expert_load_from_trace(trace, batch_tokens=2).shape == (2, 1, 4)  # the partial batch is dropped
    corr = coactivation(trace, batch_tokens=1)
    assert corr.shape == (1, 4, 4) and corr[0, 0, 1] > 0.5 and corr[0, 0, 3] < -0.5
    assert np.allclose(np.diagonal(corr[0]), 1.0) and np.allclose(corr, corr.transpose(0, 2, 1))


def test_plan_command_writes_a_valid_placement_and_reports_the_predicted_imbalance(tmp_path, capsys):
    trace = synthetic_skewed_trace(512, 2, 8, 2, seed=1)
    save_trace(tmp_path / "t.npz", trace)
    out = tmp_path / "placement.json"
    flags = ["--ranks", "4", "--redundant-slots", "1", "--version", "4", "--window", "256", "--out", str(out)]
    args = add_plan_arguments(argparse.ArgumentParser()).parse_args([str(tmp_path / "t.npz"), *flags])
    assert plan_main(args) == 0
    placement = Placement.from_json(out.read_text())
    placement.validate(8, 2)
    assert (placement.version, placement.slots_per_rank) == (4, 3)
    assert "predicted imbalance on these tokens" in capsys.readouterr().err


def test_plan_command_fails_cleanly_on_a_missing_trace(tmp_path, capsys):
    args = add_plan_arguments(argparse.ArgumentParser()).parse_args(
        [str(tmp_path / "nope.npz"), "--ranks", "2"]
    )
    assert plan_main(args) == 2
    assert "moe-runtime plan: error: cannot read trace" in capsys.readouterr().err
