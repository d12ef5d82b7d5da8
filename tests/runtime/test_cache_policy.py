"""Eviction policies (cache_policy) and the trace replay behind `moe-runtime cache-sim` (cache_sim)."""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.cache_policy import (
    ONLINE_POLICIES,
    POLICIES,
    Load,
    make_policy,
    next_use_table,
    validate_slots,
)
from moe_runtime.cache_sim import (
    add_cache_sim_arguments,
    cache_sim_main,
    format_miss_rates,
    prefetch_recall,
    simulate,
)
from moe_runtime.traces import Trace, save_trace, synthetic_skewed_trace

# N tokens, L layers, K top-k, P predictions per token, E experts


def one_layer(*tokens: int | tuple[int, ...], num_experts: int | None = None) -> Trace:
    """A one-layer trace from per-token expert ids (an int is a top-1 token)."""
    rows = [(t,) if isinstance(t, int) else t for t in tokens]
    return Trace(np.array(rows, dtype=np.int64)[:, None, :], None, num_experts)  # [N, 1, K]


def evictions(policy: str, slots: int, steps: list[list[int]]) -> list[int]:
    pool = make_policy(policy, slots, future=steps if policy == "belady" else None)
    return [load.evicted for step in steps for load in pool.access(step).loads if load.evicted is not None]


# -- the paper's LIFO ------------------------------------------------------------------------------


def test_paper_example_lifo_evicts_the_last_loaded_expert():
    # Seed paper, section 4: E = 4, 2 slots, experts {1, 2, 3} needed: load 1 and 2, evict 2 to load 3,
    # because expert 1 runs first in the next batch.
    pool = make_policy("lifo", 2)
    plan = pool.access([3, 1, 2])
    assert plan.loads == (Load(1, 0, None), Load(2, 1, None), Load(3, 1, 2))
    assert pool.resident == {1: 0, 3: 1}
    assert pool.access([1, 2]).hits == ((1, 0),)


def test_lifo_evicts_inactive_experts_first():
    pool = make_policy("lifo", 2)
    pool.access([0])
    pool.access([1])  # 1 is the last in, but the next step needs it
    assert pool.access([1, 2]).loads == (Load(2, 0, 0),)


def test_lifo_evicts_the_last_loaded_of_the_inactive_experts():
    pool = make_policy("lifo", 3)
    pool.access([0, 1])
    pool.access([2])
    assert pool.access([0, 3]).loads == (Load(3, 2, 2),)  # inactive: 1 and 2; 2 came last


# -- every policy ------------------------------------------------------------------------------------


def test_expert_is_evicted_when_cache_is_full():
    for policy in ONLINE_POLICIES:
        pool = make_policy(policy, 2)
        assert pool.access([0, 1]).loads == (Load(0, 0, None), Load(1, 1, None))
        plan = pool.access([2])
        assert plan.misses == (2,) and plan.loads[0].evicted in (0, 1), policy
        assert len(pool.resident) == 2


# Slots 3, one expert per step. At step 6 (expert 3) the pool holds 0, 1, 2: 0 was loaded first,
# 1 was used longest ago and 2 least often, so FIFO, LRU and LFU each evict a different expert.
SEPARATING = [[0], [1], [1], [1], [2], [0], [3], [0], [1], [2]]


@pytest.mark.parametrize(
    ("policy", "evicted", "misses"),
    [
        ("fifo", [0, 1, 2, 3], 7),
        ("lru", [1, 2, 3], 6),
        ("lfu", [2, 3], 5),
        ("lifo", [2, 3], 5),
        ("belady", [2, 0], 5),  # at the end nothing is used again: ties go to the lower id
    ],
)
def test_policies_evict_as_their_definitions_say_on_a_separating_trace(policy, evicted, misses):
    assert evictions(policy, 3, SEPARATING) == evicted
    result = simulate(one_layer(*(s[0] for s in SEPARATING)), 3, policy)
    assert (result.misses.tolist(), result.hits.tolist(), result.accesses.tolist()) == (
        [misses],
        [10 - misses],
        [10],
    )


@pytest.mark.parametrize("policy", ONLINE_POLICIES)
def test_a_forgotten_expert_frees_its_slot_and_misses_next_time(policy):
    pool = make_policy(policy, 2)
    pool.access([0, 1])
    pool.forget(1)  # expert 1's id now names other weights (a re-placed slot under expert parallelism)
    pool.forget(5)  # never resident: nothing to free
    assert pool.resident == {0: 0}
    plan = pool.access([1, 2])  # the freed slot is reused; no resident expert is evicted for it
    assert plan.misses == (1, 2) and plan.loads[0] == Load(1, 1, None) and plan.loads[1].evicted == 0
    assert (pool.hits, pool.misses, pool.evictions) == (0, 4, 1)  # the counters survive a forget


def test_lfu_forgets_the_uses_of_a_forgotten_expert():
    pool = make_policy("lfu", 2)
    for step in ([0], [0], [0], [1], [2], [2]):  # 0 has 3 uses, 2 has 2; 1 was evicted for 2
        pool.access(step)
    pool.forget(0)
    pool.access([0])  # reloaded with 1 use: its 3 earlier uses were another expert's
    assert pool.access([3]).loads[0].evicted == 0


def test_lfu_counts_uses_since_the_start_not_since_loaded():
    # 0 is evicted at step 7 and reloaded at step 8 with 4 uses in all; 1 also has 4 but is older.
    steps = [[0], [0], [0], [1], [1], [1], [1], [2], [0], [3]]
    assert evictions("lfu", 2, steps) == [0, 2, 1]


def test_lru_keeps_the_expert_a_hit_refreshed():
    assert evictions("lru", 2, [[0], [1], [0], [2]]) == [1]
    assert evictions("fifo", 2, [[0], [1], [0], [2]]) == [0]


def test_belady_evicts_the_expert_used_farthest_in_the_future():
    assert evictions("belady", 2, [[0], [1], [2], [1], [0], [2]]) == [0, 1]  # 1: never used again
    assert evictions("belady", 2, [[0], [1], [2], [0], [1], [0]]) == [1, 2]


steps_strategy = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=4), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(steps=steps_strategy, slots=st.integers(1, 4), policy=st.sampled_from(POLICIES))
def test_experts_needed_by_the_step_are_never_evicted(steps, slots, policy):
    pool = make_policy(policy, slots, future=steps if policy == "belady" else None)
    for step in steps:
        before = pool.resident
        plan = pool.access(step)
        need = set(step)
        assert {e for e, _ in plan.hits} == need & before.keys()
        assert set(plan.misses) == need - before.keys()
        for load in plan.loads:
            # A needed expert is evicted only in waves: when the step needs more than the pool holds.
            assert load.evicted not in need or len(need) > slots
        assert len(pool.resident) <= slots and len(set(pool.resident.values())) == len(pool.resident)
        if len(need) <= slots:
            assert need <= pool.resident.keys()


def test_a_step_needing_more_experts_than_slots_runs_in_waves():
    for policy in POLICIES:
        pool = make_policy(policy, 2, future=[[0, 1, 2, 3]])
        plan = pool.access([0, 1, 2, 3])
        assert sorted(plan.misses) == [0, 1, 2, 3] and len(pool.resident) == 2, policy
        evicted = [load.evicted for load in plan.loads if load.evicted is not None]
        assert len(evicted) == 2 and set(evicted) <= {0, 1, 2}, policy  # each after it ran


# -- Belady: the optimum -----------------------------------------------------------------------------


def brute_force_misses(steps: list[list[int]], slots: int, *, stream: bool) -> int:
    """Fewest misses over every set of experts a pool can hold after each step, whatever the order
    of its loads: `slots` of those resident or needed (fewer only before it has seen that many), the
    whole step when it fits; when it does not, at least one of the step's misses (the last expert
    loaded stays) unless `stream` (Belady's relaxation)."""

    @functools.cache
    def cost(t: int, resident: frozenset) -> int:
        if t == len(steps):
            return 0
        need = frozenset(steps[t])
        misses = need - resident
        seen = sorted(resident | need)
        ends = [frozenset(end) for end in itertools.combinations(seen, min(slots, len(seen)))]
        if len(need) <= slots:
            ends = [end for end in ends if need <= end]
        elif misses and not stream:
            ends = [end for end in ends if misses & end]
        return len(misses) + min(cost(t + 1, end) for end in ends)

    return cost(0, frozenset())


tiny_steps = st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3), min_size=1, max_size=9)


@settings(max_examples=60, deadline=None)
@given(steps=tiny_steps, slots=st.integers(1, 3))
def test_belady_equals_a_brute_force_optimum_on_tiny_traces(steps, slots):
    pool = make_policy("belady", slots, future=steps)
    for step in steps:
        pool.access(step)
    assert pool.misses == brute_force_misses(steps, slots, stream=True)
    if all(len(set(step)) <= slots for step in steps):  # no waves: nothing to relax
        assert pool.misses == brute_force_misses(steps, slots, stream=False)
    else:
        assert pool.misses <= brute_force_misses(steps, slots, stream=False)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_experts=st.integers(2, 8),
    top_k=st.integers(1, 2),
    tokens=st.integers(1, 60),
    batch=st.integers(1, 3),
    data=st.data(),
)
def test_belady_never_misses_more_than_an_online_policy(seed, num_experts, top_k, tokens, batch, data):
    top_k = min(top_k, num_experts)
    slots = data.draw(st.integers(top_k, num_experts))
    trace = synthetic_skewed_trace(tokens, 2, num_experts, top_k, seed=seed)
    best = simulate(trace, slots, "belady", batch).misses
    for policy in ONLINE_POLICIES:
        assert (best <= simulate(trace, slots, policy, batch).misses).all(), policy


def test_next_use_table_gives_the_first_step_at_or_after_each_step():
    table = next_use_table([[0], [1, 2], [0]])
    assert table.tolist() == [[0, 1, 1], [2, 1, 1], [2, 3, 3], [3, 3, 3]]


# -- configuration errors ------------------------------------------------------------------------------


def test_fewer_slots_than_top_k_is_rejected_naming_both_numbers():
    with pytest.raises(ValueError, match=r"top_k=2.*slots=1"):
        validate_slots(1, 2, 8)
    with pytest.raises(ValueError, match=r"top_k=2.*slots=1"):
        simulate(synthetic_skewed_trace(4, 1, 8, 2), 1, "lifo")


def test_more_slots_than_experts_is_rejected():
    with pytest.raises(ValueError, match=r"slots=9 exceeds num_experts=8"):
        validate_slots(9, 2, 8)


def test_unknown_policy_is_rejected_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="lifo, lru, lfu, fifo, belady"):
        make_policy("mru", 2)
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        simulate(synthetic_skewed_trace(4, 1, 8, 2), 2, "mru")


def test_belady_needs_the_future():
    with pytest.raises(ValueError, match="offline"):
        make_policy("belady", 2)


# -- the simulator -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_a_pool_as_large_as_the_layer_misses_only_cold(batch):
    trace = synthetic_skewed_trace(200, 3, 6, 2, seed=1)
    for policy in POLICIES:
        result = simulate(trace, 6, policy, batch)
        cold = [len(np.unique(trace.topk_ids[:, layer])) for layer in range(3)]
        assert result.misses.tolist() == cold and result.evictions.sum() == 0, policy


def test_a_batch_step_needs_the_union_of_its_tokens_experts():
    # Batch 2 over 5 tokens: steps {0, 1}, {0, 2}, {3} (the last one short of a token).
    result = simulate(one_layer(0, 1, 0, 2, 3), 2, "lifo", batch=2)
    assert result.accesses.tolist() == [5]
    assert (result.hits.tolist(), result.misses.tolist(), result.evictions.tolist()) == ([1], [4], [2])


def test_layers_have_independent_pools():
    ids = np.array([[[0], [1]]] * 3)  # [N=3, L=2, K=1]: layer 0 always needs 0, layer 1 always 1
    assert simulate(Trace(ids), 1, "lru").misses.tolist() == [1, 1]


def test_simulation_is_deterministic():
    trace = synthetic_skewed_trace(300, 4, 8, 2, seed=3)
    for policy in POLICIES:
        assert simulate(trace, 4, policy, 2).to_dict() == simulate(trace, 4, policy, 2).to_dict()


def reference_replay(trace: Trace, slots: int, policy: str, batch: int, prefetch: np.ndarray | None):
    """What the live cache does: one pool per layer, access() (and prefetch()) once per step."""
    counters = []
    for layer in range(trace.num_layers):
        steps = [
            trace.topk_ids[t : t + batch, layer].ravel().tolist() for t in range(0, trace.num_tokens, batch)
        ]
        pool = make_policy(policy, slots, future=steps if policy == "belady" else None)
        for index, step in enumerate(steps):
            if prefetch is not None:
                guesses = prefetch[index * batch : (index + 1) * batch, layer]  # [B, P]
                pool.prefetch(e for e in guesses.T.ravel().tolist() if e >= 0)  # best guesses first
            pool.access(step)
        counters.append((pool.hits, pool.misses, pool.prefetch_loads, pool.evictions))
    return counters


@pytest.mark.parametrize("with_prefetch", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_simulate_counts_what_a_live_pool_counts(policy, with_prefetch):
    trace = synthetic_skewed_trace(150, 3, 8, 2, seed=4)
    guesses = synthetic_skewed_trace(150, 3, 8, 3, seed=5).topk_ids if with_prefetch else None
    result = simulate(trace, 4, policy, 3, guesses)
    got = list(
        zip(*(c.tolist() for c in (result.hits, result.misses, result.prefetch_loads, result.evictions)))
    )
    assert got == reference_replay(trace, 4, policy, 3, guesses)


# -- prefetch ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_a_perfect_predictor_turns_every_miss_into_a_prefetch_load(policy):
    trace = synthetic_skewed_trace(400, 3, 8, 2, seed=6)
    demand = simulate(trace, 4, policy)
    perfect = simulate(trace, 4, policy, prefetch=trace.topk_ids)
    assert perfect.misses.sum() == 0
    assert perfect.prefetch_loads.tolist() == demand.misses.tolist()


def test_a_perfect_predictor_leaves_only_the_experts_that_do_not_fit():
    trace = synthetic_skewed_trace(400, 2, 8, 2, seed=7)
    result = simulate(trace, 3, "lru", batch=4, prefetch=trace.topk_ids)
    for layer in range(2):
        steps = trace.topk_ids[:, layer].reshape(100, 8)
        overflow = sum(max(0, len(set(step.tolist())) - 3) for step in steps)
        assert result.misses[layer] == overflow


def test_a_wrong_prediction_costs_a_demand_miss():
    # Step 0 is predicted right; step 1's guess (expert 2) evicts 0, which step 1 then needs.
    guesses = np.array([[[0, 1]], [[2, -1]]])  # [N=2, L=1, P=2]; -1: no prediction
    result = simulate(one_layer((0, 1), (0, 1), num_experts=3), 2, "lru", prefetch=guesses)
    assert (result.prefetch_loads.tolist(), result.misses.tolist(), result.hits.tolist()) == ([3], [1], [3])
    assert result.loads.tolist() == [4] and result.evictions.tolist() == [2]


def test_prefetch_never_evicts_a_predicted_expert():
    pool = make_policy("lifo", 2)
    pool.access([0, 1])
    assert pool.prefetch([1, 2, 3]) == (Load(2, 0, 0),)  # only the first `slots` guesses count
    assert pool.resident == {1: 1, 2: 0}


def test_prefetch_recall_is_the_fraction_of_needed_experts_predicted():
    predicted = np.array([[[0, 1]], [[2, -1]]])  # [N, L, P]
    actual = np.array([[[1, 0]], [[0, 1]]])  # [N, L, K]
    assert prefetch_recall(predicted, actual) == 0.5
    assert prefetch_recall(actual, actual) == 1.0


def test_prefetch_must_match_the_trace():
    trace = synthetic_skewed_trace(10, 2, 8, 2)
    with pytest.raises(ValueError, match=r"tokens=10, layers=2"):
        simulate(trace, 2, "lru", prefetch=np.zeros((10, 3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="8 experts"):
        simulate(trace, 2, "lru", prefetch=np.full((10, 2, 2), 8))
    with pytest.raises(ValueError, match="differ"):
        prefetch_recall(np.zeros((3, 2, 1)), np.zeros((3, 1, 2)))


# -- the table and the command ---------------------------------------------------------------------


def test_miss_rate_table_has_a_row_per_policy_and_a_column_per_slot_count():
    trace = one_layer(0, 1, 2, 0, num_experts=4)
    table = format_miss_rates([simulate(trace, s, p) for s in (1, 2) for p in ("lru", "belady")])
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()]
    assert cells[0] == ["policy", "slots=1", "slots=2"] and set("".join(cells[1])) == {"-"}
    assert cells[2:] == [
        ["lru", "100.0% (100.0%)", "100.0% (100.0%)"],
        ["belady", "100.0% (100.0%)", "75.0% (75.0%)"],
    ]


def run_cache_sim(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="moe-runtime cache-sim")
    add_cache_sim_arguments(parser)
    status = cache_sim_main(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "skewed.npz"
    save_trace(path, synthetic_skewed_trace(256, 2, 8, 2, seed=8))
    return path


def test_cache_sim_prints_miss_rates_with_belady(trace_file, capsys):
    status, out, _ = run_cache_sim([str(trace_file), "--slots", "2,4,6", "--policy", "lifo,fifo"], capsys)
    assert status == 0
    rows = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")}
    assert rows == {"policy", "lifo", "fifo", "belady"}
    assert "slots=6" in out and "256 tokens, 2 layers, top_k=2, 8 experts" in out


def test_cache_sim_json_is_one_object(trace_file, tmp_path, capsys):
    guesses = tmp_path / "guesses.npz"
    save_trace(guesses, synthetic_skewed_trace(256, 2, 8, 3, seed=9))
    argv = [str(trace_file), "--slots", "4", "--batch", "2", "--prefetch-trace", str(guesses), "--json"]
    status, out, _ = run_cache_sim(argv, capsys)
    report = json.loads(out)
    assert status == 0 and report["batch"] == 2 and 0.0 <= report["prefetch_recall"] <= 1.0
    labels = [(r["policy"], r["prefetch"]) for r in report["results"]]
    assert labels == [(p, pf) for p in ONLINE_POLICIES for pf in (False, True)] + [("belady", False)]
    assert all(len(r["layers"]["miss_rate"]) == 2 for r in report["results"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--slots", "1"], "top_k=2"),
        (["--policy", "lifo,mru"], "expected one of: lifo, lru, lfu, fifo, belady"),
        (["--batch", "0"], "batch must be >= 1"),
    ],
)
def test_cache_sim_rejects_bad_input_with_a_message(trace_file, capsys, argv, message):
    status, out, err = run_cache_sim([str(trace_file), *argv], capsys)
    assert status == 2 and out == "" and message in err


def test_cache_sim_reports_an_unreadable_trace(tmp_path, capsys):
    (tmp_path / "junk.npz").write_bytes(b"not a trace")
    for path in (tmp_path / "junk.npz", tmp_path / "missing.npz"):
        status, _, err = run_cache_sim([str(path)], capsys)
        assert status == 2 and "cannot read trace" in err


def test_policy_and_simulator_modules_do_not_import_torch():
    code = "import sys, moe_runtime.cache_sim; assert 'torch' not in sys.modules"
    runtime = os.path.join(os.path.dirname(__file__), "..", "..", "runtime")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": runtime})
