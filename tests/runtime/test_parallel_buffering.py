"""Expert buffering under expert parallelism (parallel_buffering): each rank buffers its own slots (issue 5).

The group runs are 2 gloo processes on loopback (FileStore rendezvous), as in test_parallel.py; a failing
rank makes mp.spawn stop the others, and collectives time out after a minute.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_runtime.config import ExpertBufferingConfig, ServingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.model import ModelArgs
from moe_runtime.parallel import ExpertParallel, Lockstep, ParallelConfig, init_group
from moe_runtime.placement import Placement, round_robin
from moe_runtime.scheduler import Engine, Request
from moe_runtime.weights import init_random

# L layers, E experts, S slots per rank, W ranks

ARGS = ModelArgs.from_name("tiny")  # E=8, top-2, 2 layers
WORLD, PER_RANK = 2, 5  # one redundant slot per rank: rank 0 holds experts 0-4, rank 1 holds 5, 6, 7, 0, 1
EXPERT_BYTES = ARGS.expert_bytes(torch.float32)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [60, 61], [7, 9, 11, 13]]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
SCENARIOS = [  # (config, slots per layer): every online policy, with and without prefetch, slots and budget
    ({"policy": "lifo", "slots_per_layer": 2, "prefetch": True}, 2),
    ({"policy": "lru", "gpu_memory_bytes": 7 * EXPERT_BYTES + EXPERT_BYTES // 2, "prefetch": False}, 3),
    ({"policy": "lfu", "slots_per_layer": 3, "prefetch": True}, 3),
    ({"policy": "fifo", "slots_per_layer": 4, "prefetch": False}, 4),
]


def buffering(**fields) -> ExpertBufferingConfig:
    return ExpertBufferingConfig(**{"enabled": True, "policy": "lifo", **fields})


def packed(model, layer: int, expert: int) -> torch.Tensor:
    """One expert of an unbuffered model as the one row [3FH] its master holds."""
    moe = model.layers[layer].moe
    return torch.cat([moe.w13[expert].reshape(-1), moe.w2[expert].reshape(-1)])


def moved_placement() -> Placement:
    """Every expert changes rank and expert 0 gains a replica (as test_parallel's re-placement)."""
    slots = []
    for layer in range(ARGS.num_layers):
        order = [(e + 3 + layer) % ARGS.num_experts for e in range(ARGS.num_experts)][::-1]
        slots.append(tuple(order + [order[-1]] * (WORLD * PER_RANK - ARGS.num_experts)))
    return Placement(1, WORLD, PER_RANK, tuple(slots))


# -- one process: set-up, budget, re-placement bookkeeping (no collectives run) ------------------------


def test_fewer_slots_than_top_k_under_expert_parallelism_is_a_config_error():
    placement = round_robin(ARGS.num_layers, ARGS.num_experts, WORLD, PER_RANK)
    with pytest.raises(ConfigError, match=r"slots_per_layer=1 is fewer than top_k=2"):
        ExpertParallel(init_random(ARGS, seed=0), placement, 0, WORLD, buffering=buffering(slots_per_layer=1))
    with pytest.raises(ConfigError, match=r"gpu_memory_bytes=.* holds 1 slot\(s\) per layer.*top_k=2"):
        ExpertParallel(init_random(ARGS, seed=0), placement, 1, WORLD,
                       buffering=buffering(gpu_memory_bytes=3 * EXPERT_BYTES))


@pytest.mark.parametrize(("budget_experts", "slots"), [(4, 2), (7, 3), (40, PER_RANK)])  # clamped to S
def test_a_rank_pools_only_its_own_slots_within_the_budget(budget_experts, slots):
    reference, model = init_random(ARGS, seed=0), init_random(ARGS, seed=0)
    budget = budget_experts * EXPERT_BYTES + EXPERT_BYTES // 2
    placement = round_robin(ARGS.num_layers, ARGS.num_experts, WORLD, PER_RANK)
    ep = ExpertParallel(model, placement, 1, WORLD, buffering=buffering(gpu_memory_bytes=budget))
    stats = model.expert_cache_stats()
    assert stats.slots_per_layer == slots and stats.hits == [0, 0]
    assert stats.resident_bytes == ARGS.num_layers * slots * EXPERT_BYTES <= budget
    assert ep.store is None and all(moe.w13.numel() == 0 and moe.w2.numel() == 0 for moe in model.moe_blocks)
    for layer, masters in enumerate(ep.buffering.masters):  # rank 1's slots hold experts 5, 6, 7, 0, 1
        assert len(masters) == PER_RANK
        assert all(torch.equal(m, packed(reference, layer, e)) for m, e in zip(masters, (5, 6, 7, 0, 1)))


def test_a_replacement_repoints_the_masters_and_forgets_only_changed_slots():
    reference, model = init_random(ARGS, seed=0), init_random(ARGS, seed=0)
    placement = round_robin(ARGS.num_layers, ARGS.num_experts, WORLD, PER_RANK)  # rank 0: 0, 1, 2, 3, 4
    ep = ExpertParallel(model, placement, 0, WORLD, buffering=buffering(slots_per_layer=3, prefetch=False))
    for cache in ep.buffering.caches:
        cache.prefetch([0, 1, 2])  # local slots 0-2 resident, copied from experts 0-2
    moved = Placement(1, WORLD, PER_RANK, ((0, 5, 2, 6, 4, 1, 3, 7, 0, 1),) * ARGS.num_layers)
    resident = [cache.policy.resident for cache in ep.buffering.caches]
    assert ep.apply(moved) == 0  # nothing is copied at the switch: slot 1 now loads expert 5 on demand
    for layer, cache in enumerate(ep.buffering.caches):
        assert cache.policy.resident == {s: resident[layer][s] for s in (0, 2)}  # slot 1 changed: forgotten
        assert all(torch.equal(m, packed(reference, layer, e)) for m, e in zip(cache.masters, (0, 5, 2, 6, 4)))
        assert torch.equal(cache.pool[resident[layer][2]], packed(reference, layer, 2))  # kept, still valid
    assert ep.buffering.slots_of[0] == {0: [0], 5: [1], 2: [2], 6: [3], 4: [4]}
    assert model.expert_cache_stats().prefetch_loads == [3, 3]  # the counters survive the switch


# -- two gloo ranks: outputs, counters and budget through a live re-placement --------------------------


def _worker(rank: int, store: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.manual_seed(0)
    init_group(ParallelConfig(rank, WORLD, f"file://{store}"), timeout_s=60)
    reference = init_random(ARGS, seed=0)
    expected = [c.output_ids for c in generate(reference, PROMPTS, GREEDY)] if rank == 0 else None
    reports = [_scenario(rank, reference, expected, config) for config, _ in SCENARIOS]
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(reports, f)


def _scenario(rank: int, reference, expected, config: dict) -> dict:
    """One buffered group, run to the leader's shutdown; this rank's counters and invariants."""
    model = init_random(ARGS, seed=0)
    placement = round_robin(ARGS.num_layers, ARGS.num_experts, WORLD, PER_RANK)
    ep = ExpertParallel(model, placement, rank, WORLD, buffering=buffering(**config))
    report = {"needed": [0] * ARGS.num_layers, "switch": []}
    _observe(ep.buffering, report)
    lockstep = Lockstep(model, ep)
    if rank == 0:
        lockstep.lead()
        report |= _lead(model, lockstep, reference, expected)
        lockstep.shutdown()
    else:
        lockstep.follow()
    stats = model.expert_cache_stats()
    pools = ep.buffering.caches
    held = [ep.placement.slots[layer][rank * PER_RANK:(rank + 1) * PER_RANK] for layer in range(ARGS.num_layers)]
    return report | {
        "stats": stats.to_dict(), "version": ep.placement.version,
        "pool_bytes": sum(c.pool.numel() * c.pool.element_size() for c in pools),
        "pools_hold_their_masters": all(torch.equal(c.pool[p], c.masters[s])
                                        for c in pools for s, p in c.policy.resident.items()),
        "masters_are_the_placed_experts": all(torch.equal(m, packed(reference, layer, e))
                                              for layer, c in enumerate(pools) for m, e in zip(c.masters, held[layer])),
        "experts_off_the_device": all(moe.w13.numel() == 0 for moe in model.moe_blocks),
    }


def _observe(buffering, report: dict) -> None:
    """Count the distinct local slots each step of each layer needs on this rank, and what a switch keeps."""
    run, place = buffering.run, buffering.place

    def counted_run(layer, xr, local_ids, counts):
        report["needed"][layer] += len(set(local_ids.tolist()))
        return run(layer, xr, local_ids, counts)

    def observed_place(placement):
        before = [(c.policy.resident, held) for c, held in zip(buffering.caches, buffering.held)]
        place(placement)
        for (resident, old), cache, new in zip(before, buffering.caches, buffering.held):
            same = {s for s in range(len(new)) if s < len(old) and old[s] == new[s]}
            report["switch"].append({"forgotten": sorted(set(resident) - same),
                                     "stale": sorted(set(cache.policy.resident) - same),
                                     "kept": {s: p for s, p in resident.items() if s in same}
                                     == cache.policy.resident})

    buffering.run, buffering.place = counted_run, observed_place


def _logit_diff(model, reference) -> float:
    """Largest logit difference on a prefill of every prompt token (most experts of every layer run)."""
    tokens = torch.tensor([[t for prompt in PROMPTS for t in prompt]])
    pos = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        return float((reference(tokens, pos, kv_len=tokens.shape[1])
                      - model(tokens, pos, kv_len=tokens.shape[1])).abs().max())


def _lead(model, lockstep, reference, expected) -> dict:
    logit_diff = _logit_diff(model, reference)
    engine = Engine(model, ServingConfig(max_running_sequences=4))
    outputs, finished = {i: [] for i in range(len(PROMPTS))}, []
    for i, prompt in enumerate(PROMPTS):
        engine.submit(Request(prompt, GREEDY, lambda ev, i=i: (outputs[i].extend(ev.token_ids),
                                                               ev.finish_reason and finished.append(i))))
    steps, copied = 0, None
    while len(finished) < len(PROMPTS):
        engine.step()
        steps += 1
        if steps == 4:  # between decode steps of running generations
            copied = lockstep.apply(moved_placement())
    logit_diff = max(logit_diff, _logit_diff(model, reference))  # after the switch too
    return {"logit_diff": logit_diff, "expected": expected, "got": [outputs[i] for i in range(len(PROMPTS))],
            "copied": copied}


@pytest.mark.timeout(240)
def test_buffered_ranks_match_unbuffered_outputs_through_a_live_replacement(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for i, (config, slots) in enumerate(SCENARIOS):
        leader, reports = ranks[0][i], [ranks[r][i] for r in range(WORLD)]
        assert leader["got"] == leader["expected"], config  # the unbuffered single-process tokens
        assert leader["logit_diff"] < 1e-4, config
        assert leader["copied"] == 0  # buffered: the switch copies nothing, new experts load on demand
        for report in reports:
            stats = report["stats"]
            assert report["version"] == 1 and stats["slots_per_layer"] == slots, config
            assert stats["resident_bytes"] == report["pool_bytes"] == ARGS.num_layers * slots * EXPERT_BYTES
            assert stats["resident_bytes"] <= config.get("gpu_memory_bytes", stats["resident_bytes"])
            # This rank's counters: one access per distinct local slot a step needed here.
            assert [h + m for h, m in zip(stats["hits"], stats["misses"])] == report["needed"], config
            assert sum(stats["misses"]) > 0 and sum(stats["hits"]) > 0, config
            assert stats["copied_bytes"] == (sum(stats["misses"]) + sum(stats["prefetch_loads"])) * EXPERT_BYTES
            assert (stats["prefetch_recall"] is not None) == config["prefetch"], config
            assert report["pools_hold_their_masters"] and report["masters_are_the_placed_experts"], config
            assert report["experts_off_the_device"], config
            assert len(report["switch"]) == ARGS.num_layers, config  # the live re-placement, once per layer
            assert all(s["stale"] == [] and s["kept"] for s in report["switch"]), config
        assert any(s["forgotten"] for r in reports for s in r["switch"]), config  # the switch had work to do
